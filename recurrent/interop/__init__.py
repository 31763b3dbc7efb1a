"""Weights in and out: converters between recurrent and PyTorch, Keras 3 and Flax, and from the official xLSTM.

Each converter returns ``(layer, params)`` (or ``(cell, params)``) on the way in and a peer
module (with its weights) on the way out. The peers are imported only when a converter is
called, so ``recurrent`` itself does not need them: ``pip install 'recurrent[interop]'``.
"""

from recurrent.interop._flax import from_flax, to_flax
from recurrent.interop._keras import from_keras, to_keras
from recurrent.interop._torch import carry_from_torch, carry_to_torch, from_torch, to_torch
from recurrent.interop._xlstm import from_xlstm

__all__ = [
    "carry_from_torch",
    "carry_to_torch",
    "from_flax",
    "from_keras",
    "from_torch",
    "from_xlstm",
    "to_flax",
    "to_keras",
    "to_torch",
]
