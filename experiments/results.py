"""Reading a finished run back: the parameters of the checkpoint with the best validation loss.

:func:`experiments.pipeline.make_train` keeps that checkpoint under ``<workdir>/best`` (the whole
training state); :func:`best_params` restores its parameters into the structure of ``params``
(named tuples and all), so an experiment can report early-stopped results.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from experiments import pipeline


def best_params(config: pipeline.TrainConfig, params: Any) -> tuple[Any, int] | None:
    """``(params, step)`` of the best-validation checkpoint in ``config.workdir``, or None.

    ``params`` gives the structure (e.g. the final parameters of the same run); ``config`` is
    the run's config (its optimiser fixes the shape of the saved optimiser state).
    """
    path = os.path.abspath(os.path.join(config.workdir, "best"))
    if not os.path.isdir(path):
        return None
    manager = pipeline.Checkpoints(path, 1, best=True)
    try:
        step = manager.best_step()
        if step is None:
            return None
        target = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": pipeline.make_optimizer(config).init(params),
            "key": jax.random.key_data(jax.random.key(0)),
        }
        if config.ema_decay:
            target["ema"] = params
        state = manager.restore(step, target)
    finally:
        manager.close()
    if config.ema_decay:  # evaluate the debiased average, as the pipeline does
        scale = 1.0 / (1.0 - config.ema_decay ** max(int(state["step"]), 1))
        return jax.tree.map(lambda e: e * scale, state["ema"]), step
    return state["params"], step
