r"""Multi-step forecasting of real series with LSTM, GRU and CIFG against classical baselines.

Run ``python -m experiments.forecast`` (``--help`` lists the fields). The series ship inside
``statsmodels`` (nothing is downloaded):

- ``sunspots``: yearly sunspot numbers 1700-2008 (309 values; a cycle of about 11 years);
- ``co2``: the Mauna Loa CO2 record 1958-2001, weekly values averaged per month (526 values;
  the gaps interpolated; a 12-month season on a rising trend).

The last ``test_fraction`` of a series is held out. A model reads a window of ``window``
values and predicts the next ``horizon`` at once (a linear readout of the last hidden state:
the direct multi-step strategy). Inputs and targets are scaled by the training part's mean
and standard deviation and taken relative to the window's last value. The last 15% of the
training windows validate; the forecasts come from the checkpoint with the best validation
loss (early stopping; ``--eval_every`` steps apart). Every origin in the
held-out tail whose horizon fits is forecast from the true history before it (rolling
origins); MAE and RMSE are averaged over all origins and horizon steps, in the series' units.

Baselines: the seasonal naive forecast (the value one season earlier; for sunspots the
season is 11 years) and a classical model from statsmodels fitted once on the training part
and applied with its fixed parameters at every origin: SARIMAX (``sunspots``: ARIMA(9,0,0),
the AR(9) of the statsmodels examples; ``co2``: SARIMA(1,1,1)(0,1,1)_12, the airline model)
and Holt-Winters exponential smoothing.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import recurrent
from experiments import errors, pipeline
from experiments.pipeline import ConfigError, DataError, field
from experiments.results import best_params

SERIES = ("sunspots", "co2")
CELLS = ("lstm", "gru", "cifg_lstm")
SEASON = {"sunspots": 11, "co2": 12}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Forecasting settings; ``python -m experiments.forecast --help`` lists them."""

    # Resuming may change these too: which series and cells run, the baselines and plots.
    resume_safe = pipeline.TrainConfig.resume_safe | {"series", "cells", "baselines", "plot"}

    series: str = field("sunspots,co2", f"comma-separated series: {', '.join(SERIES)}")
    cells: str = field("lstm,gru,cifg_lstm", f"comma-separated recurrent cells: {', '.join(CELLS)}")
    window: int = field(36, "past values a model reads")
    horizon: int = field(12, "future values it predicts")
    test_fraction: float = field(0.2, "held-out tail of each series")
    hidden: int = field(32, "hidden units")
    baselines: bool = field(True, "also fit the seasonal-naive, SARIMAX and Holt-Winters baselines")
    plot: bool = field(True, "save forecast-vs-truth plots (<workdir>/<series>.png)")


def get_config() -> Config:
    """1500 Adam steps of 32 windows per model (well under a minute each on a 2-core CPU)."""
    return Config(
        steps=1500,
        batch_size=32,
        learning_rate=3e-3,
        schedule="cosine",
        pad_multiple=48,
        bucket=1,
        eval_every=100,
        checkpoint_every=500,
        log_every=100,
        workdir="runs/forecast",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(),
        series="co2",
        cells="gru",
        test_fraction=0.05,
        steps=3,
        batch_size=8,
        hidden=4,
        eval_every=0,
        checkpoint_every=3,
        log_every=1,
        progress=False,
    )


def check_config(config: Config) -> Config:
    pipeline.choices(config.series, SERIES, "series")
    pipeline.choices(config.cells, CELLS, "cells")
    for name in ("window", "horizon", "hidden"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    if not 0 < config.test_fraction < 0.5:
        raise ConfigError(f"config field 'test_fraction' must be in (0, 0.5); got {config.test_fraction}.")
    if config.pad_multiple % (config.window + config.horizon):
        raise ConfigError(
            f"pad_multiple={config.pad_multiple} would pad the windows of {config.window + config.horizon} values.\n"
            f"  fix:      --pad_multiple={config.window + config.horizon} (window + horizon)."
        )
    return config


# --------------------------------------------------------------------------------------
# Data.


def load_series(name: str) -> np.ndarray:
    """A series from ``statsmodels.datasets`` as float64 ``(N,)``."""
    try:
        from statsmodels import datasets
    except ImportError:
        raise DataError(
            "the series ship inside statsmodels, which is not installed.\n  fix:  pip install statsmodels"
        ) from None
    if name == "sunspots":
        return datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    if name == "co2":
        weekly = datasets.co2.load_pandas().data["co2"]
        monthly = weekly.resample("MS").mean().interpolate()
        return monthly.to_numpy(np.float64)
    raise DataError(f"unknown series {name!r}; valid: {', '.join(SERIES)}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A series cut for one experiment: ``split`` is the first held-out index; ``mean``/``std``
    of the training part scale the model's inputs."""

    name: str
    values: np.ndarray
    split: int
    mean: float
    std: float

    def scaled(self) -> np.ndarray:
        return ((self.values - self.mean) / self.std).astype(np.float32)


def prepare(name: str, config: Config) -> Prepared:
    values = load_series(name)
    split = int(round(len(values) * (1 - config.test_fraction)))
    need = config.window + config.horizon
    if split < need + 2 or len(values) - split < config.horizon:
        raise ConfigError(
            f"series {name!r} ({len(values)} values, {len(values) - split} held out) is too short for "
            f"window={config.window} and horizon={config.horizon}.\n  fix:      shorten --window or --horizon."
        )
    train = values[:split]
    return Prepared(name, values, split, float(train.mean()), float(train.std()))


def windows(series: np.ndarray, starts: Sequence[int], length: int) -> list[np.ndarray]:
    return [series[s : s + length, None] for s in starts]


def held_out_origins(p: Prepared, config: Config) -> np.ndarray:
    """Forecast origins ``o`` (the first predicted index) in the held-out tail whose horizon fits."""
    return np.arange(p.split, len(p.values) - config.horizon + 1)


def make_data(p: Prepared, config: Config) -> pipeline.Data:
    """Training windows from the training part (the last 15% of its windows validate), test
    windows at every held-out origin; each window is ``(window + horizon, 1)`` scaled values."""
    s = p.scaled()
    need = config.window + config.horizon
    starts = np.arange(0, p.split - need + 1)
    n_valid = max(1, len(starts) * 15 // 100)
    test_starts = held_out_origins(p, config) - config.window
    return pipeline.Data(
        windows(s, starts[:-n_valid], need), windows(s, starts[-n_valid:], need), windows(s, test_starts, need)
    )


# --------------------------------------------------------------------------------------
# Models.


def make_model(config: Config, cell_name: str):
    cell = {"lstm": recurrent.lstm, "gru": recurrent.gru, "cifg_lstm": recurrent.cifg_lstm}[cell_name](config.hidden)
    layer = recurrent.rnn(cell)

    def init(key):
        k_rnn, k_out = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, (1,)),
            "readout": {
                "kernel": 0.1 * jax.nn.initializers.lecun_normal()(k_out, (config.hidden, config.horizon)),
                "bias": jnp.zeros((config.horizon,)),
            },
        }

    def forecast(params, history):
        """``(B, window, 1)`` scaled history -> ``(B, horizon)`` scaled forecast."""
        last = history[:, -1:, 0]
        carry, _ = layer.apply(params["rnn"], history - last[:, :, None])
        h = carry.h if hasattr(carry, "h") else carry
        return last + h @ params["readout"]["kernel"] + params["readout"]["bias"]

    return init, forecast


def make_task(config: Config, cell_name: str) -> pipeline.Task:
    init, forecast = make_model(config, cell_name)

    def loss(params, batch, key):
        xs, lengths = batch
        pred = forecast(params, xs[:, : config.window])
        err = jnp.square(pred - xs[:, config.window :, 0]).sum(-1)
        real = (lengths > 0).astype(err.dtype)
        return jnp.sum(err * real), jnp.sum(real) * config.horizon

    return pipeline.Task(init, loss)


def model_forecasts(config: Config, cell_name: str, params: Any, p: Prepared) -> np.ndarray:
    """``(origins, horizon)`` forecasts in the series' units."""
    _, forecast = make_model(config, cell_name)
    s = p.scaled()
    hist = np.stack(windows(s, held_out_origins(p, config) - config.window, config.window))
    return np.asarray(jax.jit(forecast)(params, jnp.asarray(hist))) * p.std + p.mean


def seasonal_naive(p: Prepared, config: Config) -> np.ndarray:
    """The value one season before each target, from the history before the origin."""
    m = SEASON[p.name]
    out = []
    for o in held_out_origins(p, config):
        h = np.arange(config.horizon)
        out.append(p.values[o - m + (h % m)])
    return np.stack(out)


def statistical_forecasts(p: Prepared, config: Config) -> dict[str, np.ndarray]:
    """SARIMAX and Holt-Winters fitted on the training part, applied at every origin with fixed parameters."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    train = p.values[: p.split]
    origins = held_out_origins(p, config)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        if p.name == "co2":
            spec = {"order": (1, 1, 1), "seasonal_order": (0, 1, 1, 12)}
        else:
            spec = {"order": (9, 0, 0), "trend": "c"}
        fit = SARIMAX(train, **spec).fit(disp=False)
        full = fit.apply(p.values)  # the same parameters, filtered over the whole series
        preds = []
        for o in origins:
            preds.append(full.get_prediction(start=o, end=o + config.horizon - 1, dynamic=0).predicted_mean)
        # get_prediction(dynamic=0) at start=o uses data up to o-1 only.
        out["sarimax"] = np.stack(preds)
        kind = {"trend": "add", "seasonal": "add", "seasonal_periods": SEASON[p.name]}
        if p.name == "sunspots":  # sunspot cycles are not of fixed length: damped trend, additive 11-year season
            kind["damped_trend"] = True
        hw = ExponentialSmoothing(train, **kind).fit()
        preds = []
        for o in origins:
            model = ExponentialSmoothing(p.values[:o], **kind)
            preds.append(model.predict(hw.params, start=o, end=o + config.horizon - 1))
        out["holt_winters"] = np.stack(preds)
    return out


def truth(p: Prepared, config: Config) -> np.ndarray:
    return np.stack([p.values[o : o + config.horizon] for o in held_out_origins(p, config)])


def scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = pred - target
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt(np.square(err).mean()))}


def save_plot(path: str, p: Prepared, config: Config, forecasts: dict[str, np.ndarray]) -> None:
    """The held-out tail with each method's forecasts from origins one horizon apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origins = held_out_origins(p, config)
    lo = max(0, p.split - 3 * config.horizon)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(lo, len(p.values)), p.values[lo:], color="black", lw=1.5, label="truth")
    for k, (name, pred) in enumerate(forecasts.items()):
        for j in range(0, len(origins), config.horizon):
            o = origins[j]
            ax.plot(np.arange(o, o + config.horizon), pred[j], color=f"C{k}", lw=1, label=name if j == 0 else None)
    ax.axvline(p.split, color="gray", ls=":")
    ax.set_title(f"{p.name}: {config.horizon}-step forecasts from origins {config.horizon} apart")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_train(config: Config, series: str, cell_name: str, data: pipeline.Data | None = None):
    """``train(key) -> result`` for one cell on one series, in ``<workdir>/<series>_<cell>``."""
    check_config(config)
    data = make_data(prepare(series, config), config) if data is None else data
    sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, f"{series}_{cell_name}"))
    return pipeline.make_train(sub, make_task(config, cell_name), data)


def run(config: Config) -> dict[str, dict[str, dict[str, float]]]:
    """Every cell (and baseline) on every series; returns ``{series: {method: {"mae", "rmse"}}}``."""
    check_config(config)
    prepared = [prepare(s, config) for s in pipeline.choices(config.series, SERIES, "series")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for p in prepared:
        target = truth(p, config)
        forecasts: dict[str, np.ndarray] = {}
        if config.baselines:
            forecasts["seasonal_naive"] = seasonal_naive(p, config)
            forecasts.update(statistical_forecasts(p, config))
        data = make_data(p, config)
        for cell_name in pipeline.choices(config.cells, CELLS, "cells"):
            result = make_train(config, p.name, cell_name, data)(jax.random.key(config.seed))
            sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, f"{p.name}_{cell_name}"))
            best = best_params(sub, result["params"])  # early stopping on the validation windows
            forecasts[cell_name] = model_forecasts(config, cell_name, best[0] if best else result["params"], p)
        table[p.name] = {name: scores(pred, target) for name, pred in forecasts.items()}
        if config.plot:
            os.makedirs(config.workdir, exist_ok=True)
            save_plot(os.path.join(config.workdir, f"{p.name}.png"), p, config, forecasts)
    print(f"\n{config.horizon}-step forecasts, held-out tail ({config.test_fraction:.0%}), rolling origins")
    print("| series | method | MAE | RMSE |\n| --- | --- | ---: | ---: |")
    for name, rows in table.items():
        for method, s in rows.items():
            print(f"| {name} | {method} | {s['mae']:.3f} | {s['rmse']:.3f} |")
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.forecast", "Multi-step forecasts of sunspots and CO2."
    )
    with errors.report():
        check_config(config)
        for s in pipeline.choices(config.series, SERIES, "series"):
            prepare(s, config)
        return run(config)


if __name__ == "__main__":
    main()
