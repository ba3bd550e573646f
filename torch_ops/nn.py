"""torch.nn-compatible recurrent layers evaluated by parallel Newton solves.

``pnewton.GRU``, ``pnewton.LSTM`` and ``pnewton.RNN`` take torch.nn's constructor and
forward arguments and hold the same parameters under the same names, so state_dicts
load in both directions. Every layer and direction is one ``torch.ops.pnewton.newton_rnn``
call over the whole sequence (the C++ solver, csrc/solver), the whole stack one
``torch.ops.pnewton.rnn_stack`` call (shared with the C++ modules); the input projection
W_ih x_t + b_ih is one GEMM before each solve. ``DiagGRU`` and ``DiagLSTM`` have per-channel
recurrent weights (vectors), so their Newton steps are exact with diagonal / 2×2 scans.
"""
import torch
from torch import nn

from .solve import SolveStats

# Solver options accepted by the layers, with their defaults (see newton_rnn in csrc/ops.cpp).
SOLVER_DEFAULTS = dict(method="auto", max_iter=None, atol=None, rtol=None, damping=0.0, clip=0.0,
                       init="zeros", fixed_iterations=False, fallback=True, adjoint="auto")


def _limits(max_iter, atol, rtol):
    """None (the per-dtype defaults) as the ops spell it: -1."""
    return (-1 if max_iter is None else max_iter, -1.0 if atol is None else atol, -1.0 if rtol is None else rtol)


def newton_rnn(cell, gi, W_hh, b_hh, s0, method="auto", max_iter=None, atol=None, rtol=None, damping=0.0,
               clip=0.0, init="zeros", init_states=None, fixed_iterations=False, fallback=True, adjoint="auto"):
    """Solve a built-in cell over a sequence: ``(states [B, T, S], SolveStats)``.

    ``cell`` is ``gru``, ``lstm``, ``rnn_tanh``, ``rnn_relu``, ``diag_gru`` or ``diag_lstm``;
    ``gi`` the input projections ``[B, T, G]``; ``s0`` ``[B, S]`` (LSTM cells: (h_i, c_i)
    interleaved, S = 2·hidden). ``method``: ``auto`` (default: the cheapest method, then
    exact Newton while the dense Jacobian fits (B·T·S² ≤ 2²⁴), then the trust-region ELK step, then the loop — see
    README "Choosing a method"), deer, quasi_deer, block_deer (LSTM cells), elk, quasi_elk,
    elk_filter, quasi_elk_filter, picard, jacobi or sequential. ``damping``: κ in [0, 1)
    scales Ã by (1 − κ); for the elk methods it is λ (0: adaptive trust region).
    ``fixed_iterations=True`` runs exactly ``max_iter``
    iterations with no host synchronisation (no fallback; check ``stats.converged``).
    ``adjoint``: how gradients solve the adjoint — auto, scan, iterative, sequential.
    """
    states, iterations, residual, converged, path = torch.ops.pnewton.newton_rnn(
        cell, gi, W_hh, b_hh, s0, method, *_limits(max_iter, atol, rtol), damping, clip, init, init_states,
        fixed_iterations, fallback, adjoint)
    return states, SolveStats(iterations, residual, converged, path, method)


class _NewtonRNNBase(nn.Module):
    _gates = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1, "DIAG_GRU": 3, "DIAG_LSTM": 4}
    _cells = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "DIAG_GRU": "diag_gru",
              "DIAG_LSTM": "diag_lstm"}

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, proj_size=0, **solver_options):
        super().__init__()
        if proj_size:
            raise ValueError("pnewton: proj_size is not supported (the projected LSTM has no parallel solver yet)")
        unknown = set(solver_options) - set(SOLVER_DEFAULTS)
        if unknown:
            raise TypeError(f"pnewton: unknown solver options {sorted(unknown)}; known: {sorted(SOLVER_DEFAULTS)}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"pnewton: dropout must be in [0, 1], got {dropout}")
        if hidden_size <= 0 or input_size <= 0 or num_layers <= 0:
            raise ValueError("pnewton: input_size, hidden_size and num_layers must be positive")
        self.mode, self.input_size, self.hidden_size = mode, input_size, hidden_size
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        self.dropout, self.bidirectional, self.proj_size = float(dropout), bidirectional, 0
        self.solver_options = dict(solver_options)
        self.last_stats = None
        factory = {"device": device, "dtype": dtype}
        gate = self._gates[mode] * hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                layer_in = input_size if layer == 0 else hidden_size * directions
                recurrent = (gate,) if mode.startswith("DIAG") else (gate, hidden_size)
                params = {"weight_ih": (gate, layer_in), "weight_hh": recurrent}
                if bias:
                    params.update({"bias_ih": (gate,), "bias_hh": (gate,)})
                for name, shape in params.items():
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self):  # torch.nn's initialisation
        bound = 1.0 / self.hidden_size ** 0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def _is_lstm(self):
        return self.mode in ("LSTM", "DIAG_LSTM")

    def _params(self):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if self.bias else ("weight_ih", "weight_hh")
        directions = 2 if self.bidirectional else 1
        return [getattr(self, f"{name}_l{layer}" + ("_reverse" if d else ""))
                for layer in range(self.num_layers) for d in range(directions) for name in names]

    def _forward(self, input, hx):
        if input.dim() not in (2, 3):
            raise ValueError(f"pnewton.{type(self).__name__}: input must be 2-d (unbatched) or 3-d, "
                             f"got {input.dim()}-d")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1 if not self.batch_first else 0)
            hx = None if hx is None else (tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple)
                                          else hx.unsqueeze(1))
        if input.shape[-1] != self.input_size:
            raise ValueError(f"pnewton.{type(self).__name__}: input.size(-1) must be {self.input_size}, "
                             f"got {input.shape[-1]}")
        B = input.shape[0 if self.batch_first else 1]
        n = self.num_layers * (2 if self.bidirectional else 1)
        expected = (n, B, self.hidden_size)
        if hx is None:
            hx = (input.new_zeros(expected), input.new_zeros(expected)) if self._is_lstm else input.new_zeros(expected)
        for name, h in zip(("h0", "c0"), hx if self._is_lstm else (hx,)):
            if tuple(h.shape) != expected:
                raise ValueError(f"pnewton.{type(self).__name__}: {name} must have shape {expected}, "
                                 f"got {tuple(h.shape)}")
        state0 = torch.stack(hx, -1).flatten(-2) if self._is_lstm else hx
        o = {**SOLVER_DEFAULTS, **self.solver_options}
        out, final, iterations, residual, converged, path = torch.ops.pnewton.rnn_stack(
            self._cells[self.mode], input, state0, self._params(), self.bias, self.num_layers, self.dropout,
            self.training, self.bidirectional, self.batch_first, o["method"],
            *_limits(o["max_iter"], o["atol"], o["rtol"]), o["damping"], o["clip"], o["init"], o["fixed_iterations"],
            o["fallback"], o["adjoint"])
        self.last_stats = SolveStats(iterations, residual, converged, path, o["method"])
        if self._is_lstm:
            pairs = final.unflatten(-1, (self.hidden_size, 2))
            final = (pairs[..., 0].contiguous(), pairs[..., 1].contiguous())
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            final = tuple(f.squeeze(1) for f in final) if isinstance(final, tuple) else final.squeeze(1)
        return out, final

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + f", solver={self.solver_options or 'defaults'}"


class GRU(_NewtonRNNBase):
    """Drop-in ``torch.nn.GRU`` evaluated by parallel Newton iterations.

    ``pnewton.GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, method="auto", ...)``; solver options as in
    :func:`pnewton.newton_rnn` (``SOLVER_DEFAULTS``). Diagnostics of the last call:
    ``module.last_stats`` (iterations, residual, converged, method, fallback).
    """

    def __init__(self, *args, **kwargs):
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None):
        return self._forward(input, hx)


class LSTM(_NewtonRNNBase):
    """Drop-in ``torch.nn.LSTM`` (no ``proj_size``); the solved state is (h, c) together."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def forward(self, input, hx=None):
        return self._forward(input, hx)


class RNN(_NewtonRNNBase):
    """Drop-in ``torch.nn.RNN`` with ``nonlinearity`` ``'tanh'`` or ``'relu'``."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", *args, **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"pnewton.RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_" + nonlinearity.upper(), input_size, hidden_size, num_layers, *args, **kwargs)

    def forward(self, input, hx=None):
        return self._forward(input, hx)


class DiagGRU(_NewtonRNNBase):
    """GRU whose recurrent weights are per-channel vectors (``weight_hh_l0``: [3·hidden]):
    r = σ(W_ir x + b_ir + w_hr ⊙ h + b_hr), likewise z, n = tanh(W_in x + b_in + r ⊙ (w_hn ⊙ h
    + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h. Its Jacobian is diagonal, so quasi_deer is Newton."""

    def __init__(self, *args, **kwargs):
        super().__init__("DIAG_GRU", *args, **kwargs)

    def forward(self, input, hx=None):
        return self._forward(input, hx)


class DiagLSTM(_NewtonRNNBase):
    """LSTM whose recurrent weights are per-channel vectors (``weight_hh_l0``: [4·hidden]);
    each channel's (h_i, c_i) evolves on its own, so block_deer (2×2 blocks) is Newton."""

    def __init__(self, *args, **kwargs):
        super().__init__("DIAG_LSTM", *args, **kwargs)

    def forward(self, input, hx=None):
        return self._forward(input, hx)


def from_torch(module, **solver_options):
    """A pnewton layer with the configuration and weights of a torch.nn GRU/LSTM/RNN."""
    common = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional,
                  proj_size=getattr(module, "proj_size", 0), **solver_options)
    p = next(module.parameters())
    factory = dict(device=p.device, dtype=p.dtype)
    if isinstance(module, nn.GRU):
        layer = GRU(module.input_size, module.hidden_size, **common, **factory)
    elif isinstance(module, nn.LSTM):
        layer = LSTM(module.input_size, module.hidden_size, **common, **factory)
    elif isinstance(module, nn.RNN):
        layer = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **common, **factory)
    else:
        raise TypeError(f"pnewton.from_torch: expected torch.nn.GRU, LSTM or RNN, got {type(module).__name__}")
    layer.load_state_dict(module.state_dict())
    return layer
