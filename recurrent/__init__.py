"""recurrent: the LSTM family as pure cell-step functions, one scan driver and combinators.

Cells (one time step) are built by lowercase factories and are :class:`Cell` bundles of
pure functions ``init``, ``initial_carry`` and ``step``; :func:`rnn` scans a cell over a
sequence and returns a :class:`Layer` (``init``, ``apply``); :func:`bidirectional` and
:func:`stacked` combine cells and layers.

>>> import jax, jax.numpy as jnp, recurrent
>>> layer = recurrent.stacked([recurrent.bidirectional(recurrent.lstm(32)), recurrent.gru(32)])
>>> params = layer.init(jax.random.key(0), (8,))
>>> carry, ys = layer.apply(params, jnp.zeros((4, 20, 8)), lengths=jnp.array([20, 9, 3, 1]))
>>> ys.shape
(4, 20, 32)
"""

from recurrent._combinators import (
    BidirectionalParams,
    BidirectionalState,
    LearnedCarryParams,
    bidirectional,
    learned_initial_carry,
    stacked,
)
from recurrent._conv import ConvGRUParams, ConvLSTMParams, conv_gru, conv_lstm
from recurrent._core import (
    Cell,
    CellSpec,
    Layer,
    LSTMState,
    SequenceKernel,
    StepNoise,
    cell_spec,
    count_params,
    make_cell,
    noisy_input,
    zoneout,
)
from recurrent._gru import GRU_GATES, GRULayerNormParams, GRUParams, gru
from recurrent._kernels import FallbackWarning
from recurrent._lstm import (
    CIFG_GATES,
    GREFF_VARIANTS,
    LSTM_GATES,
    ChronoInit,
    LayerNormParams,
    LSTMGateState,
    LSTMParams,
    chrono_init,
    cifg_lstm,
    lstm,
    lstm_variant,
    peephole_lstm,
)
from recurrent._minrnn import MIN_GRU_GATES, MIN_LSTM_GATES, MinGRUParams, MinLSTMParams, min_gru, min_lstm
from recurrent._mlstm import MLSTM_GATES, MLSTM_PROJECTIONS, MLSTMParams, MLSTMState, mlstm
from recurrent._newton import SolverInfo
from recurrent._rnn import Trace, reverse_sequences, rnn, truncated_bptt
from recurrent._slstm import SLSTM_GATES, SLSTMParams, SLSTMState, slstm

__version__ = "0.1.0"

__all__ = [
    "BidirectionalParams",
    "BidirectionalState",
    "CIFG_GATES",
    "Cell",
    "CellSpec",
    "ChronoInit",
    "FallbackWarning",
    "ConvGRUParams",
    "ConvLSTMParams",
    "GREFF_VARIANTS",
    "GRULayerNormParams",
    "GRUParams",
    "GRU_GATES",
    "LSTMGateState",
    "LSTMParams",
    "LSTMState",
    "LSTM_GATES",
    "Layer",
    "LayerNormParams",
    "LearnedCarryParams",
    "MIN_GRU_GATES",
    "MIN_LSTM_GATES",
    "MLSTMParams",
    "MLSTMState",
    "MLSTM_GATES",
    "MLSTM_PROJECTIONS",
    "MinGRUParams",
    "MinLSTMParams",
    "SLSTMParams",
    "SLSTMState",
    "SLSTM_GATES",
    "SequenceKernel",
    "SolverInfo",
    "StepNoise",
    "Trace",
    "bidirectional",
    "cell_spec",
    "chrono_init",
    "cifg_lstm",
    "conv_gru",
    "conv_lstm",
    "count_params",
    "gru",
    "learned_initial_carry",
    "lstm",
    "lstm_variant",
    "make_cell",
    "min_gru",
    "min_lstm",
    "mlstm",
    "noisy_input",
    "peephole_lstm",
    "reverse_sequences",
    "rnn",
    "slstm",
    "stacked",
    "truncated_bptt",
    "zoneout",
]
