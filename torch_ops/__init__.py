"""pnewton: nonlinear RNNs evaluated in parallel over time by parallel Newton methods.

Importing the package loads the operator library (``torch.ops.pnewton.*``); its meta
kernels, which ``torch.compile`` and ``torch.export`` run on fake tensors, are C++ (they
check every argument as the real kernels do).
"""
from . import _library  # noqa: F401  (loads the ops first)
from . import distributed
from ._library import built_with_cuda, cmake_prefix_path
from ._config import show_config
from .lyapunov import lyapunov
from .nn import GRU, LSTM, RNN, DiagGRU, DiagLSTM, HeadGRU, HeadLSTM, from_torch, newton_rnn
from .scan import scan_block, scan_diag
from .solve import SolveStats, solve
from . import mcmc

__all__ = ["scan_diag", "scan_block", "solve", "SolveStats", "lyapunov", "newton_rnn", "GRU", "LSTM", "RNN",
           "DiagGRU", "DiagLSTM", "HeadGRU", "HeadLSTM",
           "from_torch", "built_with_cuda", "cmake_prefix_path", "distributed", "mcmc", "show_config"]
__version__ = "0.1.0"
