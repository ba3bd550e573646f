"""torch.nn-compatible recurrent layers evaluated by parallel Newton solves.

``pnewton.GRU``, ``pnewton.LSTM`` and ``pnewton.RNN`` take torch.nn's constructor and
forward arguments and hold the same parameters under the same names, so state_dicts
load in both directions. Every layer and direction is one :func:`pnewton.solve` over the
whole sequence; the input projection W_ih x_t + b_ih is one GEMM before the solve.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .solve import solve

_SOLVER_OPTIONS = ("method", "max_iter", "atol", "rtol", "damping", "init", "fallback")


# Each built-in cell is a step f(s_prev, gi) on the precomputed input projection gi, with
# its analytic Jacobian ∂f/∂s: a sum of diagonally scaled recurrent weight blocks, so the
# diagonal (quasi_deer) costs O(D) per step and the dense one O(D²).
def _scaled_sum(terms, diagonal):
    """Σ diag(c) W over (c [N, D], W [D, D]) terms: the diagonals, or the [N, D, D] matrices."""
    if diagonal:
        return sum(c * W.diagonal() for c, W in terms)
    return sum(c.unsqueeze(-1) * W for c, W in terms)


class _GRUCell:
    """torch.nn.GRU's equations, gate order (r, z, n)."""

    def __init__(self, W_hh, b_hh):
        self.W_hh, self.b_hh = W_hh, b_hh

    def _gates(self, h, gi):
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = F.linear(h, self.W_hh, self.b_hh).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return r, z, torch.tanh(i_n + r * h_n), h_n

    def __call__(self, h, gi):
        r, z, n, _ = self._gates(h, gi)
        return (1 - z) * n + z * h

    def jacobian(self, h, gi, diagonal):
        r, z, n, h_n = self._gates(h, gi)
        W_r, W_z, W_n = self.W_hh.chunk(3, 0)
        dn = (1 - z) * (1 - n * n)  # ∂h'/∂(pre-activation of n)
        J = _scaled_sum([(dn * r, W_n), (dn * h_n * r * (1 - r), W_r), ((h - n) * z * (1 - z), W_z)], diagonal)
        return J + z if diagonal else J + torch.diag_embed(z)


class _LSTMCell:
    """torch.nn.LSTM's equations, gate order (i, f, g, o); the state is [h, c]."""

    def __init__(self, W_hh, b_hh, hidden):
        self.W_hh, self.b_hh, self.hidden = W_hh, b_hh, hidden

    def _gates(self, hc, gi):
        h, c = hc[:, :self.hidden], hc[:, self.hidden:]
        a_i, a_f, a_g, a_o = (gi + F.linear(h, self.W_hh, self.b_hh)).chunk(4, -1)
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        c_new = f * c + i * g
        return c, i, f, g, o, c_new, torch.tanh(c_new)

    def __call__(self, hc, gi):
        _, _, _, _, o, c_new, tc = self._gates(hc, gi)
        return torch.cat([o * tc, c_new], -1)

    def jacobian(self, hc, gi, diagonal):
        c, i, f, g, o, _, tc = self._gates(hc, gi)
        W_i, W_f, W_g, W_o = self.W_hh.chunk(4, 0)
        dc_terms = [(c * f * (1 - f), W_f), (g * i * (1 - i), W_i), (i * (1 - g * g), W_g)]
        do = o * (1 - tc * tc)  # ∂h'/∂c'
        dh_dh = _scaled_sum([(tc * o * (1 - o), W_o)] + [(do * k, W) for k, W in dc_terms], diagonal)
        if diagonal:  # ∂h'_j/∂h_j and ∂c'_j/∂c_j
            return torch.cat([dh_dh, f], -1)
        dc_dh = _scaled_sum(dc_terms, diagonal=False)
        top = torch.cat([dh_dh, torch.diag_embed(do * f)], -1)
        bottom = torch.cat([dc_dh, torch.diag_embed(f)], -1)
        return torch.cat([top, bottom], -2)


class _RNNCell:
    """torch.nn.RNN's h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""

    def __init__(self, W_hh, b_hh, nonlinearity):
        self.W_hh, self.b_hh, self.tanh = W_hh, b_hh, nonlinearity == "tanh"

    def __call__(self, h, gi):
        a = gi + F.linear(h, self.W_hh, self.b_hh)
        return torch.tanh(a) if self.tanh else torch.relu(a)

    def jacobian(self, h, gi, diagonal):
        a = gi + F.linear(h, self.W_hh, self.b_hh)
        d = 1 - torch.tanh(a) ** 2 if self.tanh else (a > 0).to(a.dtype)
        return _scaled_sum([(d, self.W_hh)], diagonal)


class _NewtonRNNBase(nn.Module):
    _gates = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, proj_size=0, **solver_options):
        super().__init__()
        if proj_size:
            raise ValueError("pnewton: proj_size is not supported (the projected LSTM has no parallel solver yet)")
        unknown = set(solver_options) - set(_SOLVER_OPTIONS)
        if unknown:
            raise TypeError(f"pnewton: unknown solver options {sorted(unknown)}; known: {_SOLVER_OPTIONS}")
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
        self._flat_weights_names = []
        for layer in range(num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                layer_in = input_size if layer == 0 else hidden_size * directions
                params = {"weight_ih": (gate, layer_in), "weight_hh": (gate, hidden_size)}
                if bias:
                    params.update({"bias_ih": (gate,), "bias_hh": (gate,)})
                for name, shape in params.items():
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name + suffix)
        self.reset_parameters()

    def reset_parameters(self):  # torch.nn's initialisation
        bound = 1.0 / self.hidden_size ** 0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def _state_size(self):
        return 2 * self.hidden_size if self.mode == "LSTM" else self.hidden_size

    def _step(self, suffix):
        W_hh = getattr(self, "weight_hh" + suffix)
        b_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
        if self.mode == "GRU":
            return _GRUCell(W_hh, b_hh)
        if self.mode == "LSTM":
            return _LSTMCell(W_hh, b_hh, self.hidden_size)
        return _RNNCell(W_hh, b_hh, "tanh" if self.mode == "RNN_TANH" else "relu")

    def _run(self, x, state0):
        """x: [B, T, input] batch-first; state0: [layers * directions, B, state]."""
        directions = 2 if self.bidirectional else 1
        finals, stats = [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                seq = x.flip(1) if direction else x
                b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
                gi = F.linear(seq, getattr(self, "weight_ih" + suffix), b_ih)  # one GEMM for all t
                cell = self._step(suffix)
                states, st = solve(cell, state0[layer * directions + direction], gi, jacobian=cell.jacobian,
                                   **self.solver_options)
                stats.append(st)
                if states.shape[1] > 0:
                    finals.append(states[:, -1])
                else:
                    finals.append(state0[layer * directions + direction])
                h = states[..., :self.hidden_size]
                outs.append(h.flip(1) if direction else h)
            x = torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        self.last_stats = _merge(stats)
        return x, torch.stack(finals, 0)

    def _forward(self, input, hx):
        if input.dim() not in (2, 3):
            raise ValueError(f"pnewton.{type(self).__name__}: input must be 2-d (unbatched) or 3-d, "
                             f"got {input.dim()}-d")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1 if not self.batch_first else 0)
            hx = None if hx is None else (tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple)
                                          else hx.unsqueeze(1))
        x = input if self.batch_first else input.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"pnewton.{type(self).__name__}: input.size(-1) must be {self.input_size}, "
                             f"got {x.shape[-1]}")
        B = x.shape[0]
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            state0 = x.new_zeros(n, B, self._state_size)
        elif self.mode == "LSTM":
            state0 = torch.cat(hx, -1)
        else:
            state0 = hx
        if state0.shape != (n, B, self._state_size):
            raise ValueError(f"pnewton.{type(self).__name__}: initial state must have shape "
                             f"{(n, B, self.hidden_size)}, got {tuple(state0.shape)}")
        out, final = self._run(x, state0)
        out = out if self.batch_first else out.transpose(0, 1)
        if self.mode == "LSTM":
            final = (final[..., :self.hidden_size].contiguous(), final[..., self.hidden_size:].contiguous())
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            final = tuple(f.squeeze(1) for f in final) if isinstance(final, tuple) else final.squeeze(1)
        return out, final

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + f", solver={self.solver_options or 'defaults'}"


def _merge(stats):
    """One SolveStats-like record for a whole layer stack: worst case over solves."""
    from .solve import SolveStats
    return SolveStats(
        iterations=torch.stack([s.iterations for s in stats]).amax(0),
        residual=torch.stack([s.residual for s in stats]).amax(0),
        converged=torch.stack([s.converged for s in stats]).all(0),
        method=",".join(sorted({s.method for s in stats})),
        fallback=any(s.fallback for s in stats),
    )


class GRU(_NewtonRNNBase):
    """Drop-in ``torch.nn.GRU`` evaluated by parallel Newton iterations.

    ``pnewton.GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, method="quasi_deer", ...)``; solver options as in
    :func:`pnewton.solve`. Diagnostics of the last call: ``module.last_stats``.
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
