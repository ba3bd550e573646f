"""torch.nn recurrent layers evaluated by parallel Newton solves.

``pnewton.GRU``, ``pnewton.LSTM`` and ``pnewton.RNN`` derive from ``torch.nn.RNNBase``, as
torch.nn's own layers do: parameter registration, initialisation, argument checks and their
errors, ``all_weights``, state_dicts and pickling come from torch.nn; only the forward's
recurrence is replaced, and it takes torch.nn's arguments, PackedSequence included. They are
not instances of ``torch.nn.GRU`` / ``LSTM`` / ``RNN``: torch.compile refuses to trace any
such instance (a graph break, an error under fullgraph=True), and a layer that cannot be
compiled is no drop-in. Code that dispatches on type can test ``isinstance(m, nn.RNNBase)``
and ``m.mode`` (``"GRU"``, ``"LSTM"``, ``"RNN_TANH"``, ``"RNN_RELU"``). Every layer and direction is one ``torch.ops.pnewton.newton_rnn``
call over the whole sequence (the C++ solver, csrc/solver), the whole stack one
``torch.ops.pnewton.rnn_stack`` call (shared with the C++ modules); the input projection
W_ih x_t + b_ih is one GEMM before each solve. ``DiagGRU`` and ``DiagLSTM`` have per-channel
recurrent weights (vectors), so their Newton steps are exact with diagonal / 2×2 scans;
``HeadGRU`` and ``HeadLSTM`` block-diagonal ones over heads, exact with k×k block scans.
"""
import contextlib
import os
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .distributed import group_name
from .solve import SolveStats, _bit, _limits

# Solver options accepted by the layers, with their defaults (see newton_rnn in csrc/ops.cpp).
SOLVER_DEFAULTS = dict(method="auto", max_iter=None, atol=None, rtol=None, damping=0.0, clip=0.0,
                       init="zeros", fixed_iterations=False, fallback=True, adjoint="auto")


def newton_rnn(cell, gi, W_hh, b_hh, s0, method="auto", max_iter=None, atol=None, rtol=None, damping=0.0,
               clip=0.0, init="zeros", init_states=None, fixed_iterations=False, fallback=True, adjoint="auto",
               lengths=None, W_hr=None, resets=None, group=None):
    """Solve a built-in cell over a sequence: ``(states [B, T, S], SolveStats)``.

    ``cell`` is ``gru``, ``lstm``, ``rnn_tanh``, ``rnn_relu``, ``diag_gru``, ``diag_lstm``,
    ``head_gru``, ``head_lstm`` (``W_hh`` [heads, G·k, k]: :class:`HeadGRU`) or
    ``lstm_proj`` (torch.nn's projected LSTM: ``W_hr`` [P, hidden] required, state [h | c],
    S = P + hidden); ``gi`` the input projections ``[B, T, G]``; ``s0`` ``[B, S]`` (LSTM
    cells: (h_i, c_i) interleaved, S = 2·hidden). ``method``: ``auto`` (default: the cheapest method, then
    exact Newton while the dense Jacobian fits (B·T·S² ≤ 2²⁴), then the trust-region ELK step, then the loop — see
    README "Choosing a method"), deer, quasi_deer, block_deer (LSTM cells), elk, quasi_elk,
    elk_filter, quasi_elk_filter, picard, jacobi or sequential. ``damping``: κ in [0, 1)
    scales Ã by (1 − κ); for the elk methods it is λ (0: adaptive trust region).
    ``fixed_iterations=True`` runs exactly ``max_iter``
    iterations with no host synchronisation (no fallback; check ``stats.converged``).
    ``adjoint``: how gradients solve the adjoint — auto, scan, iterative, sequential.
    ``lengths`` ``[B]``: per-sequence lengths of a padded batch; steps past a length are
    padding (outside the residual and the gradients) and the states hold still there, so
    ``states[:, -1]`` is each sequence's final state. ``resets`` ``[B, T]`` (bool): several
    sequences packed end to end in a row; a true step starts a new one from ``s0``, with
    nothing carried across in the states or the gradients. The states are twice
    differentiable (the backward is itself differentiable: gradient penalties, HVPs).
    ``group`` (a ProcessGroup or 1-D DeviceMesh): sequence parallelism (:mod:`pnewton.distributed`):
    ``gi``, ``init_states``, ``resets`` and the states are this rank's time shard, ``s0`` enters
    the whole sequence; the diagnostics are the whole sequence's on every rank.
    """
    name = "" if group is None else group_name(group)
    states, iterations, residual, converged, path = torch.ops.pnewton.newton_rnn(
        cell, gi, W_hh, b_hh, s0, method, *_limits(max_iter, atol, rtol), damping, clip, init, init_states,
        fixed_iterations, fallback, adjoint, lengths, W_hr, resets, name)
    return states, SolveStats(iterations, residual, converged, path, method)


# The keyword arguments of torch.nn's recurrent layers.
_TORCH_NN_ARGUMENTS = ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
                       "bidirectional", "proj_size", "device", "dtype")


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: the gradient of an
    interleaved (h, c) state is a strided view, and torch.nn's h0/c0 gradients are contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _pop_solver_options(layer, kwargs):
    """Takes the solver options out of a constructor's keyword arguments."""
    known = set(SOLVER_DEFAULTS) | {"sequence_group"}
    unknown = set(kwargs) - known - set(_TORCH_NN_ARGUMENTS)
    if unknown:
        raise TypeError(f"pnewton.{layer}: unknown solver options {sorted(unknown)}; known: {sorted(known)}")
    return {name: kwargs.pop(name) for name in list(kwargs) if name in known}


# Below this many steps auto runs torch's fused loop without measuring (csrc/solver/auto_plan.h).
_MIN_PARALLEL_STEPS = 256
_TORCH_FORWARD = {"gru": nn.GRU.forward, "lstm": nn.LSTM.forward, "lstm_proj": nn.LSTM.forward,
                  "rnn_tanh": nn.RNN.forward, "rnn_relu": nn.RNN.forward}


class _LoopRecord:
    """The diagnostics of a call torch.nn's forward ran, made on access as rnn_stack's fused
    loop makes them (csrc/solver/rnn_stack.cpp, with_loop_stats): every step exact
    (iterations = the lengths), converged where the final states are finite, in the
    caller's order of the batch (a PackedSequence's unsorted order, as its final states)."""

    def __init__(self, input, final, steps, layer):
        # A PackedSequence's batch sizes and order, not the input itself (kept until the next call).
        packed = isinstance(input, PackedSequence)
        self.batch_sizes = input.batch_sizes if packed else None
        self.unsorted_indices = input.unsorted_indices if packed else None
        self.final, self.steps = final, steps
        self.rows = layer.num_layers * (2 if layer.bidirectional else 1)
        self.method = layer.solver_options.get("method", "auto")

    def stats(self):
        final = self.final if isinstance(self.final, tuple) else (self.final,)
        if final[0].dim() == 2:  # unbatched
            final = tuple(f.unsqueeze(1) for f in final)
        B = final[0].size(1)
        if self.batch_sizes is not None:
            steps = (self.batch_sizes.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)  # sorted order
            if self.unsorted_indices is not None:
                steps = steps.index_select(0, self.unsorted_indices.cpu())
        else:
            steps = torch.full((B,), self.steps, dtype=torch.long)
        device = final[0].device
        converged = torch.stack([f.isfinite().all(-1).all(0) for f in final]).all(0)
        residual = torch.where(converged, 0.0, float("nan")).to(final[0].dtype)
        path = torch.full((self.rows, B), _bit("fused_loop"), dtype=torch.long, device=device)
        return (steps.to(device).expand(self.rows, B), residual.expand(self.rows, B),
                converged.expand(self.rows, B), path, self.method)


_SHARDED_TRACE = ("pnewton.{layer}: a layer with a sequence_group (sequence parallelism) cannot be traced by "
                  "torch.compile or torch.export: its ranks agree on the shapes at run time; call it outside the "
                  "compiled region (torch.compiler.disable)")


# torch's packing ops read their sizes' values, which a torch.compile trace does not have
# (torch.nn's own packed forward breaks the graph there too): they run eagerly, between graphs.
@torch.compiler.disable
def _unpacked(data, batch_sizes):
    """A PackedSequence's steps as a padded time-major batch in sorted order, and its lengths."""
    return pad_packed_sequence(PackedSequence(data, batch_sizes))


@torch.compiler.disable
def _packed_data(padded, lengths):
    """The packed data of a padded time-major batch in sorted order."""
    return pack_padded_sequence(padded, lengths).data


class _Call:
    """One forward call as the stack takes it (_NewtonLayer._prepare)."""

    def __init__(self, packed):
        self.packed, self.batched, self.lengths = packed, True, None
        self.batch_sizes = self.sorted_indices = self.unsorted_indices = None
        self.x, self.batch_first, self.batch_dim, self.hx = None, False, 0, None


class _NewtonLayer:
    """What a pnewton layer adds to its torch.nn class: the solver options and a forward that
    solves every layer and direction with one ``torch.ops.pnewton.rnn_stack`` call. Listed
    before the torch.nn class in the bases, so its methods take precedence."""

    _cells = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}

    def _init_solver(self, solver_options):
        # Sequence parallelism (pnewton.distributed): the group whose ranks hold consecutive
        # time shards of every input; None: one process. Settable later, not saved.
        self.sequence_group = solver_options.pop("sequence_group", None)
        self.solver_options = dict(solver_options)
        self._checked_options()  # at construction, as torch.nn checks its own arguments
        # The last call's diagnostics, [layers·dirs, B] each, made into SolveStats on access
        # (last_stats, last_layer_stats): a call pays nothing for records nobody reads.
        self._last_raw = None
        # True: a UserWarning whenever the sequential fallback produced part of a call's
        # output (shown once per call site under Python's default warning filter). Off by
        # default: reading the flag costs a host synchronisation.
        self.warn_on_fallback = False

    def _checked_options(self):
        """Checks solver_options as every solver op does (csrc/solver/options.cpp), once per
        value of the dict: at construction, and again before a call only where it changed,
        so that a call torch.nn's forward runs checks them too, for about a microsecond."""
        if self.__dict__.get("_options_checked") == self.solver_options:
            return
        o = {**SOLVER_DEFAULTS, **self.solver_options}
        torch.ops.pnewton.check_solver_options(o["method"], *_limits(o["max_iter"], o["atol"], o["rtol"]),
                                               float(o["damping"]), float(o["clip"]), o["init"],
                                               bool(o["fixed_iterations"]), bool(o["fallback"]), o["adjoint"])
        self._options_checked = dict(self.solver_options)

    def _raw_stats(self):
        raw = self.__dict__.get("_last_raw")  # (absent from layers pickled before it existed)
        return raw.stats() if isinstance(raw, _LoopRecord) else raw

    @property
    def last_stats(self):
        """The last call's diagnostics, the worst over the layers and directions, per sequence."""
        raw = self._raw_stats()
        if raw is None:
            return None
        return SolveStats.worst_stacked(*raw)

    @property
    def last_layer_stats(self):
        """One SolveStats per (layer, direction) of the last call, in parameter order."""
        raw = self._raw_stats()
        if raw is None:
            return None
        *stats, method = raw
        return [SolveStats(*row, method) for row in zip(*stats)]

    def _sequence_group_name(self):
        group = self.__dict__.get("sequence_group")
        return "" if group is None else group_name(group)

    @property
    def _cell(self):
        return self._cells[self.mode]

    @property
    def _is_lstm(self):
        return self._cell in ("lstm", "diag_lstm", "head_lstm")

    def flatten_parameters(self):
        """A no-op: the solver reads the parameters where they are (there is no cuDNN weight
        buffer to compact)."""

    def __getstate__(self):
        # The last call's diagnostics are no part of the model: a pickled layer stays
        # loadable without allow-listing SolveStats.
        state = super().__getstate__()
        state["_last_raw"] = None
        state["sequence_group"] = None  # a process group belongs to the running processes
        return state

    def extra_repr(self):
        s = super().extra_repr()
        return s + f", solver={self.solver_options}" if self.solver_options else s

    def _check_hx_dims(self, hx, batched):
        """torch.nn's checks of the initial state's rank, with its messages."""
        want = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if self._is_lstm:
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")

    def _reshape_weight_hh(self, shape):
        """Replaces torch.nn's dense weight_hh_l{n} by parameters of `shape` (the structured
        cells) and initialises every parameter again as torch.nn does."""
        factory = {"device": self.weight_ih_l0.device, "dtype": self.weight_ih_l0.dtype}
        for name in self._flat_weights_names:
            if name.startswith("weight_hh"):
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self._init_flat_weights()
        self.reset_parameters()

    def _zero_state(self, input, batch):
        directions = 2 if self.bidirectional else 1
        h = torch.zeros(self.num_layers * directions, batch, self.proj_size or self.hidden_size, dtype=input.dtype,
                        device=input.device)
        if not self._is_lstm:
            return h
        return h, torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=input.dtype,
                              device=input.device)

    def _torch_loop_steps(self, input):
        """The steps of a call that auto (or method="sequential") would hand to torch's fused
        loop without measuring — fewer than _MIN_PARALLEL_STEPS steps, no trace, no group —
        else None. rnn_stack decides the same (csrc/solver/auto_plan.h); either way the
        result is torch.nn's, so a mismatch would cost speed only."""
        o = self.solver_options
        method = o.get("method", "auto")
        if self._cell not in _TORCH_FORWARD or self.sequence_group is not None or o.get("fixed_iterations"):
            return None
        if method not in ("auto", "sequential") or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        if isinstance(input, PackedSequence):
            steps, empty = input.batch_sizes.numel(), input.data.numel() == 0
        else:
            if input.dim() not in (2, 3):
                return None  # the full forward raises torch.nn's error
            steps, empty = input.size(1 if self.batch_first and input.dim() == 3 else 0), input.numel() == 0
        if empty or steps == 0:
            return None
        if method == "auto":
            if os.environ.get("PNEWTON_AUTO") == "parallel":
                return None
            if steps >= _MIN_PARALLEL_STEPS and not self.__dict__.get("_loop_plans", {}).get(self._plan_key(input)):
                return None
        return steps

    def _plan_key(self, input):
        """The call's shape class, rnn_stack's (auto_plan.h: T and B in powers of two, so that a
        layer called at many lengths keeps few plans) or finer."""
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        if packed:
            T, B = input.batch_sizes.numel(), int(input.batch_sizes[0])
        elif x.dim() == 3:
            T, B = (x.size(1), x.size(0)) if self.batch_first else (x.size(0), x.size(1))
        else:
            T, B = x.size(0), 1

        def bucket(n):  # ⌈log₂ n⌉, 0 for n ≤ 1 (log2_bucket in auto_plan.cpp)
            return max(n - 1, 0).bit_length()

        return (x.device, x.dtype, torch.get_num_threads(), torch.is_grad_enabled(), packed, x.dim(), bucket(T),
                bucket(B))

    def _remember_plan(self, input, path):
        """After an auto call of at least _MIN_PARALLEL_STEPS steps through rnn_stack: whether
        its measured plan was torch's loop (one host read per shape, the first time), so that
        later calls of the shape take torch.nn's forward directly."""
        if self.solver_options.get("method", "auto") != "auto" or self._torch_loop_steps(input) is not None:
            return
        plans = self.__dict__.setdefault("_loop_plans", {})
        key = self._plan_key(input)
        if key not in plans and path.numel() > 0:
            plans[key] = bool((path == _bit("fused_loop")).all())

    def forward(self, input, hx=None):
        """torch.nn's forward: ``input`` [T, B, in] ([B, T, in] if batch_first), [T, in]
        unbatched, or a PackedSequence; ``hx`` the initial state (LSTM: ``(h0, c0)``).
        Returns ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``)."""
        self._checked_options()
        steps = self._torch_loop_steps(input)
        if steps is not None:
            # torch.nn's own forward (the at::gru/at::lstm/at::rnn_* call rnn_stack makes for
            # these calls), without the wrapper's per-call cost: short sequences are common.
            out, final = _TORCH_FORWARD[self._cell](self, input, hx)
            self._last_raw = _LoopRecord(input, final, steps, self)
            return out, final
        if self.__dict__.get("sequence_group") is not None and torch.compiler.is_compiling():
            raise RuntimeError(_SHARDED_TRACE.format(layer=type(self).__name__))
        with self._raised_on_every_rank():
            call = self._prepare(input, hx)
        return self._solve(input, call)

    @contextlib.contextmanager
    def _raised_on_every_rank(self):
        """Over time shards (a sequence_group): an error of this rank's own argument checks
        (torch.nn's, made before any op) is raised on every rank of the group, in this call
        (this rank's part of the ranks' agreement in rnn_stack), so that no rank's next
        collective pairs with another call's."""
        if self.__dict__.get("sequence_group") is None:
            yield
            return
        try:
            yield
        except Exception as error:
            torch.ops.pnewton.shards_raise(self._sequence_group_name(), f"pnewton.{type(self).__name__}",
                                           f"{type(error).__name__}: {error}")
            raise  # (shards_raise raises)

    def _prepare(self, input, hx):
        """torch.nn's checks of a call, and its input as the stack takes it."""
        call = _Call(packed=isinstance(input, PackedSequence))
        if call.packed:
            data, call.batch_sizes, call.sorted_indices, call.unsorted_indices = input
            batch = int(call.batch_sizes[0])
            hx = self._zero_state(data, batch) if hx is None else self.permute_hidden(hx, call.sorted_indices)
            self.check_forward_args(data, hx, call.batch_sizes)
            call.x, call.lengths = _unpacked(data, call.batch_sizes)
            call.batch_first = False
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            call.batched = input.dim() == 3
            call.batch_dim = 0 if self.batch_first else 1
            if hx is not None:
                self._check_hx_dims(hx, call.batched)
            if not call.batched:
                input = input.unsqueeze(call.batch_dim)
                if hx is not None:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if self._is_lstm else hx.unsqueeze(1)
            if hx is None:
                hx = self._zero_state(input, input.size(call.batch_dim))
            self.check_forward_args(input, hx, None)
            call.x, call.batch_first = input, self.batch_first
        call.hx = hx
        return call

    def _solve(self, input, call):
        """The stack's solve of a prepared call, and torch.nn's outputs."""
        packed, batched, lengths, x, batch_first, hx = (call.packed, call.batched, call.lengths, call.x,
                                                        call.batch_first, call.hx)
        batch_sizes, sorted_indices, unsorted_indices = call.batch_sizes, call.sorted_indices, call.unsorted_indices
        batch_dim = call.batch_dim
        # The LSTM cells solve (h_i, c_i) interleaved per channel; the projected LSTM [h | c].
        if not self._is_lstm:
            state0 = hx
        else:
            hx = tuple(_ContiguousGrad.apply(h) if h.requires_grad else h for h in hx)
            state0 = torch.cat(hx, -1) if self.proj_size else torch.stack(hx, -1).flatten(-2)
        o = {**SOLVER_DEFAULTS, **self.solver_options}
        weights = [getattr(self, name) for name in self._flat_weights_names]
        out, final, iterations, residual, converged, path = torch.ops.pnewton.rnn_stack(
            self._cell, x, state0, weights, self.bias, self.num_layers, self.dropout, self.training,
            self.bidirectional, batch_first, o["method"], *_limits(o["max_iter"], o["atol"], o["rtol"]),
            o["damping"], o["clip"], o["init"], o["fixed_iterations"], o["fallback"], o["adjoint"], lengths, None,
            self._sequence_group_name())
        if packed and unsorted_indices is not None:  # the diagnostics in the caller's order of the batch
            iterations, residual, converged, path = (t.index_select(1, unsorted_indices)
                                                     for t in (iterations, residual, converged, path))
        self._last_raw = (iterations, residual, converged, path, o["method"])
        if not torch.compiler.is_compiling():
            self._remember_plan(input, path)
        if self.warn_on_fallback and self.last_stats.fallback:
            layers = [i for i, stats in enumerate(self.last_layer_stats) if stats.fallback]
            warnings.warn(f"pnewton.{type(self).__name__}: the sequential fallback computed "
                          f"{int(self.last_stats.fell_back.sum())} of {converged.shape[1]} sequences in "
                          f"layer·direction {layers} (path {self.last_stats.method}); see last_layer_stats",
                          stacklevel=2)
        if self.proj_size:
            # Under CPU autocast torch.nn's projected LSTM keeps c in c0's dtype (only its matmuls
            # run in the lower precision); elsewhere this is no cast. (cuDNN: all in the autocast dtype.)
            c = final[..., self.proj_size:]
            c = c.to(hx[1].dtype) if c.device.type == "cpu" else c
            final = (final[..., :self.proj_size].contiguous(), c.contiguous())
        elif self._is_lstm:
            pairs = final.unflatten(-1, (self.hidden_size, 2))
            final = (pairs[..., 0].contiguous(), pairs[..., 1].contiguous())
        if packed:
            out = PackedSequence(_packed_data(out, lengths), batch_sizes, sorted_indices, unsorted_indices)
            return out, self.permute_hidden(final, unsorted_indices)
        if not batched:
            out = out.squeeze(batch_dim)
            final = (final[0].squeeze(1), final[1].squeeze(1)) if self._is_lstm else final.squeeze(1)
        return out, final


class GRU(_NewtonLayer, nn.RNNBase):
    """``torch.nn.GRU`` evaluated by parallel Newton iterations.

    ``pnewton.GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None, method="auto", ...)``; solver
    options as in :func:`pnewton.newton_rnn` (``SOLVER_DEFAULTS``). Diagnostics of the last
    call: ``module.last_stats`` (iterations, residual, converged, method, fallback).
    """

    def __init__(self, *args, **kwargs):
        solver = _pop_solver_options(type(self).__name__, kwargs)
        if "proj_size" in kwargs:  # torch.nn.GRU's check
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        nn.RNNBase.__init__(self, "GRU", *args, **kwargs)
        self._init_solver(solver)


class LSTM(_NewtonLayer, nn.RNNBase):
    """``torch.nn.LSTM`` evaluated by parallel Newton iterations; the solved state is (h, c)
    together. With ``proj_size`` > 0 (torch.nn's projected LSTM, ``weight_hr_l{k}``) the cell
    is ``lstm_proj``, whose Jacobian has no 2×2 blocks: ``auto`` then runs quasi_deer, deer
    and the ELK filter."""

    # (h0, c0) states, checked and permuted as torch.nn.LSTM does.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        solver = _pop_solver_options(type(self).__name__, kwargs)
        nn.RNNBase.__init__(self, "LSTM", *args, **kwargs)
        self._init_solver(solver)


class RNN(_NewtonLayer, nn.RNNBase):
    """``torch.nn.RNN`` (``nonlinearity`` ``'tanh'`` or ``'relu'``) evaluated by parallel
    Newton iterations."""

    def __init__(self, *args, **kwargs):
        solver = _pop_solver_options(type(self).__name__, kwargs)
        # torch.nn.RNN's constructor: nonlinearity is the 4th positional argument.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        nn.RNNBase.__init__(self, "RNN_" + self.nonlinearity.upper(), *args, **kwargs)
        self._init_solver(solver)


class _DiagonalLayer(_NewtonLayer, nn.RNNBase):
    """A torch.nn-style layer whose recurrent weights are per-channel vectors ``[G]``."""

    def __init__(self, mode, cell, *args, **kwargs):
        solver = _pop_solver_options(type(self).__name__, kwargs)
        nn.RNNBase.__init__(self, mode, *args, **kwargs)
        self._diagonal_cell = cell
        self._reshape_weight_hh((self.weight_hh_l0.shape[0],))
        self._init_solver(solver)

    @property
    def _cell(self):
        return self._diagonal_cell


class DiagGRU(_DiagonalLayer):
    """GRU whose recurrent weights are per-channel vectors (``weight_hh_l0``: [3·hidden]):
    r = σ(W_ir x + b_ir + w_hr ⊙ h + b_hr), likewise z, n = tanh(W_in x + b_in + r ⊙ (w_hn ⊙ h
    + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h. Its Jacobian is diagonal, so quasi_deer is Newton."""

    def __init__(self, *args, **kwargs):
        super().__init__("GRU", "diag_gru", *args, **kwargs)


class DiagLSTM(_DiagonalLayer):
    """LSTM whose recurrent weights are per-channel vectors (``weight_hh_l0``: [4·hidden]);
    each channel's (h_i, c_i) evolves on its own, so block_deer (2×2 blocks) is Newton."""

    # (h0, c0) states, checked and permuted as torch.nn.LSTM does.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", "diag_lstm", *args, **kwargs)


class _HeadLayer(_NewtonLayer, nn.RNNBase):
    """A torch.nn-style layer whose recurrence is block-diagonal over ``heads`` heads."""

    def __init__(self, mode, cell, input_size, hidden_size, *args, heads=1, **kwargs):
        solver = _pop_solver_options(type(self).__name__, kwargs)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"heads should be a positive integer, got {heads!r}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size % heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
        if kwargs.get("proj_size", 0):
            raise ValueError(f"proj_size is not supported by {type(self).__name__}")
        self.heads = heads
        nn.RNNBase.__init__(self, mode, input_size, hidden_size, *args, **kwargs)
        self._head_cell = cell
        k, gates = hidden_size // heads, self.weight_hh_l0.shape[0] // hidden_size
        self._reshape_weight_hh((heads, gates * k, k))
        self._init_solver(solver)

    @property
    def _cell(self):
        return self._head_cell

    @property
    def head_size(self):
        return self.hidden_size // self.heads

    def extra_repr(self):
        parts = super().extra_repr().split(", ")  # input_size, hidden_size, then the options
        return ", ".join(parts[:2] + [f"heads={self.heads}"] + parts[2:])

    def dense_weight_hh(self, layer=0, reverse=False):
        """The dense recurrent weight [G·hidden, hidden] of the torch.nn layer with this layer's
        math: head h's rows of gate g at [g·hidden + h·k + j, h·k + m], zero off the heads."""
        w = getattr(self, f"weight_hh_l{layer}" + ("_reverse" if reverse else ""))
        H, k = self.heads, self.head_size
        G = w.shape[1] // k
        blocks = w.view(H, G, k, k).transpose(0, 1)  # [G, H, k, k]
        return torch.stack([torch.block_diag(*blocks[g]) for g in range(G)]).reshape(G * H * k, H * k)


class HeadGRU(_HeadLayer):
    """GRU with a multi-head (block-diagonal) recurrence, as ParaRNN's and xLSTM's heads:
    ``HeadGRU(input_size, hidden_size, heads=H, ...)`` splits the hidden state into H heads of
    k = hidden_size / H units, and each head's gates read only its own units.

    ``weight_hh_l{n}`` is [H, 3·k, k]: head h's rows in torch.nn's gate order (r, z, n) over
    its k units. The layer computes exactly what ``torch.nn.GRU`` computes with the dense
    ``weight_hh`` that places them at [g·hidden + h·k + j, h·k + m] (zero elsewhere; see
    :meth:`dense_weight_hh`); every other parameter, argument and output is torch.nn.GRU's.
    Its Jacobian is H blocks of k×k, so exact Newton (``deer``, auto's first stage for
    k ≤ 16) costs O(T·H·k³) and converges in a few iterations. heads = hidden_size is
    :class:`DiagGRU`'s math, heads = 1 :class:`GRU`'s."""

    def __init__(self, *args, **kwargs):
        super().__init__("GRU", "head_gru", *args, **kwargs)


class HeadLSTM(_HeadLayer):
    """LSTM with a multi-head (block-diagonal) recurrence: ``weight_hh_l{n}`` [H, 4·k, k], head
    h's rows in torch.nn's gate order (i, f, g, o) over its k units; the math of
    ``torch.nn.LSTM`` with the dense ``weight_hh`` of :meth:`dense_weight_hh`. Its Jacobian
    is H blocks of 2k×2k over each head's (h, c), solved exactly by ``deer``; ``block_deer``
    uses the (h_i, c_i) 2×2 blocks. heads = hidden_size is :class:`DiagLSTM`'s math."""

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", "head_lstm", *args, **kwargs)


def from_torch(module, **solver_options):
    """A pnewton layer with the configuration and weights of a torch.nn GRU/LSTM/RNN."""
    common = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional, **solver_options)
    p = next(module.parameters())
    factory = dict(device=p.device, dtype=p.dtype)
    if isinstance(module, nn.GRU):
        layer = GRU(module.input_size, module.hidden_size, **common, **factory)
    elif isinstance(module, nn.LSTM):
        layer = LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size, **common, **factory)
    elif isinstance(module, nn.RNN):
        layer = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **common, **factory)
    else:
        raise TypeError(f"pnewton.from_torch: expected torch.nn.GRU, LSTM or RNN, got {type(module).__name__}")
    layer.load_state_dict(module.state_dict())
    return layer
