"""Parallel Newton solver for any recurrence s_t = f(s_{t-1}, u_t) written in PyTorch.

The solver is the library's one C++ solver (csrc/solver), the layers' own: it calls f back
through the ops user_step and user_jacobian (csrc/solver/callback_cell.cpp), whose kernels
are registered here, once per iteration on every step at once. Each iteration forms the
chosen approximation Ã_t of ∂f/∂s and solves δ_t = Ã_t δ_{t-1} − r_t with the scans
(DESIGN §1). Gradients never go through the iterations: the adjoint
λ_t = g_t + A_{t+1}ᵀ λ_{t+1} with the *true* Jacobian A at the solution is one reverse
scan, and the parameter/input gradients are one vector-Jacobian product of f over all t.
"""
import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

from . import _library  # noqa: F401  (the ops' schemas, before their Python kernels)

METHODS = ("auto", "deer", "quasi_deer", "elk", "quasi_elk", "elk_filter", "quasi_elk_filter", "picard", "jacobi",
           "sequential")
STRUCTURES = ("dense", "diag")
# Bit i of SolveStats.path: the i-th method of the solver's Method enum (csrc/solver/newton.h).
# fused_loop: torch's own fused RNN kernels (cuDNN / oneDNN / ATen) over a layer stack, or for
# the diag cells on the CPU the solver's loop in one pass per layer, which the layers' auto
# chooses where the parallel solve does not pay (csrc/solver/auto_plan.h).
PATH_BITS = ("deer", "quasi_deer", "block_deer", "picard", "jacobi", "sequential", "elk", "quasi_elk", "elk_filter",
             "quasi_elk_filter", "fused_loop")
# The order in which a path is told: auto's stages come in this order, the loop last.
_PATH_ORDER = ("quasi_deer", "block_deer", "deer", "picard", "jacobi", "elk", "quasi_elk", "elk_filter",
               "quasi_elk_filter", "sequential", "fused_loop")


def _bit(method):
    return 1 << PATH_BITS.index(method)


@dataclass
class SolveStats:
    """Diagnostics of one solve, per sequence where shaped [B].

    Only tensors are stored, so making the record costs no host synchronisation (and no
    graph break under torch.compile); ``fell_back``, ``fallback`` and ``method`` read them
    when asked.
    """

    iterations: torch.Tensor  # [B] Newton iterations used (T when the sequential loop ran)
    residual: torch.Tensor  # [B] final max |s_t - f(s_{t-1}, u_t)|
    converged: torch.Tensor  # [B] bool: the states satisfy the recurrence to tolerance
    path: torch.Tensor  # [B] int64: bit PATH_BITS.index(m) set when method m moved the sequence
    requested: str  # the method asked for

    @staticmethod
    def worst(records):
        """The worst per sequence over several solves (a stack's layers and directions)."""
        stacked = (torch.stack([getattr(r, k) for r in records]) for k in ("iterations", "residual", "converged", "path"))
        return SolveStats.worst_stacked(*stacked, records[0].requested)

    @staticmethod
    def worst_stacked(iterations, residual, converged, path, requested):
        """The same from diagnostics already stacked [n, B] (as rnn_stack returns them)."""
        bits = path[0]
        for row in path[1:]:
            bits = bits | row
        return SolveStats(iterations.amax(0), residual.amax(0), converged.all(0), bits, requested)

    @property
    def fell_back(self):
        """[B] bool: the sequential fallback produced these sequences."""
        if self.requested == "sequential":
            return torch.zeros_like(self.converged)
        return (self.path & _bit("sequential")) != 0

    @property
    def fallback(self):
        """Whether the sequential fallback ran for any sequence."""
        return bool(self.fell_back.any())

    def methods(self, b=None):
        """The methods that moved sequence b (all sequences when None), in order."""
        bits = _union(self.path if b is None else self.path[b:b + 1])
        return [m for m in _PATH_ORDER if bits & _bit(m)]

    @property
    def method(self):
        """The path over the batch, e.g. "quasi_deer" or "quasi_deer->deer->sequential"."""
        return "->".join(self.methods()) or self.requested


def _union(path):
    out = 0
    for v in path.tolist():
        out |= v
    return out


def _limits(max_iter, atol, rtol):
    """None (the per-dtype defaults) as the ops spell it: -1. A negative or NaN value is an
    error here (-1 is the ops' internal spelling of None, not an option)."""
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"pnewton: max_iter must be an integer >= 0 (or None: the default), got {max_iter!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not value >= 0:  # NaN fails too
            raise ValueError(f"pnewton: {name} must be >= 0 (or None: the default), got {value!r}")
    return (-1 if max_iter is None else max_iter, -1.0 if atol is None else atol, -1.0 if rtol is None else rtol)


def default_tolerance(dtype):
    """(atol, rtol) of the stop test on the Newton step, per dtype: the solver's defaults
    (csrc/solver/options.cpp: 1e-12 in float64, 3e-7 otherwise)."""
    tol = 1e-12 if dtype == torch.float64 else 3e-7
    return tol, tol


def _step(f, s, u):
    """f(s [N, D], u [N, ...]), checked to return a state like s (a step of the wrong shape
    would otherwise broadcast into every method's arithmetic)."""
    out = f(s, u)
    if not isinstance(out, torch.Tensor) or out.shape != s.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"pnewton.solve: f(s [N, D], u) must return the next state [N, D] = {tuple(s.shape)}, "
                         f"got {got}")
    return out


def _flat(f, s_prev, inputs):
    """f over all steps at once: s_prev [B, T, D], inputs [B, T, ...] -> [B, T, D]."""
    B, T, D = s_prev.shape
    out = _step(f, s_prev.reshape(B * T, D), inputs.reshape(B * T, *inputs.shape[2:]))
    return out.reshape(B, T, D)


def _shift(s0, s):
    """The previous state of every step: [s0, s_1, ..., s_{T-1}]."""
    return torch.cat([s0.unsqueeze(1), s[:, :-1]], 1)


def _jacobian_rows(f, s, u, diagonal, jacobian=None):
    """∂f/∂s at rows s [N, D], u [N, ...]: the diagonal [N, D] when `diagonal`, else [N, D, D].
    A user ``jacobian(s, u, diagonal)`` replaces the torch.func evaluation (D forward passes)."""
    if jacobian is not None:
        return jacobian(s, u, diagonal)
    single = lambda s_, u_: f(s_.unsqueeze(0), u_.unsqueeze(0)).squeeze(0)  # noqa: E731
    J = vmap(jacfwd(single))(s, u)
    return J.diagonal(dim1=-2, dim2=-1) if diagonal else J


def _jacobian(f, s_prev, inputs, jacobian=None):
    """The dense ∂f/∂s [B, T, D, D] at every step (s_prev [B, T, D], inputs [B, T, ...])."""
    B, T, D = s_prev.shape
    J = _jacobian_rows(f, s_prev.reshape(B * T, D), inputs.reshape(B * T, *inputs.shape[2:]), False, jacobian)
    return J.reshape(B, T, D, D)


def sequential(f, s0, inputs):
    """The reference loop: s_t = f(s_{t-1}, u_t), one step at a time."""
    s, out = s0, []
    for t in range(inputs.shape[1]):
        s = _step(f, s, inputs[:, t])
        out.append(s)
    return torch.stack(out, 1) if out else s0.new_empty(s0.shape[0], 0, s0.shape[1])


# ---- the callbacks of the C++ solver (csrc/solver/callback_cell.cpp) ----------------------

# JacobianPart codes (csrc/include/pnewton/cell.h).
_DIAGONAL, _DENSE = 0, 2


class _Step:
    """A step function as the solver calls it back: f and its Jacobian."""

    def __init__(self, f, structure, jacobian):
        self.f, self.structure, self.jacobian = f, structure, jacobian

    def step(self, s, u):
        return _step(self.f, s, u)

    def jacobian_of(self, s, u, part):
        diagonal = part == _DIAGONAL
        if self.structure == "diag" and self.jacobian is None:
            # f acts elementwise in s: one forward-mode pass gives the whole Jacobian.
            _, J = torch.func.jvp(lambda x: self.f(x, u), (s,), (torch.ones_like(s),))
            return J
        J = _jacobian_rows(self.f, s, u, diagonal, self.jacobian)
        want = (s.shape[0], s.shape[1]) if diagonal else (s.shape[0], s.shape[1], s.shape[1])
        if not isinstance(J, torch.Tensor) or tuple(J.shape) != want:
            got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
            raise ValueError(f"pnewton.solve: jacobian(s, u, diagonal={diagonal}) must return {want}, got {got}")
        return J


_CALLBACKS = {}
_HANDLES = itertools.count(1)


@contextmanager
def _registered(callback):
    """A handle that names `callback` to the ops user_step/user_jacobian while the block runs."""
    handle = next(_HANDLES)
    _CALLBACKS[handle] = callback
    try:
        yield handle
    finally:
        del _CALLBACKS[handle]


def _user_step(handle, s, u):
    return _CALLBACKS[handle].step(s, u)


def _user_jacobian(handle, s, u, part):
    return _CALLBACKS[handle].jacobian_of(s, u, part)


_LIB = torch.library.Library("pnewton", "IMPL")
_LIB.impl("user_step", _user_step, "CompositeImplicitAutograd")
_LIB.impl("user_jacobian", _user_jacobian, "CompositeImplicitAutograd")


class _Adjoint(torch.autograd.Function):
    """Identity forward; backward maps g to λ_t = g_t + A_{t+1}ᵀ λ_{t+1} (true Jacobian A)
    by the C++ solver's adjoint (solve_adjoint: a reverse scan, or iterated matrix-free)."""

    @staticmethod
    def forward(ctx, F, s_prev, inputs, callback):
        ctx.save_for_backward(s_prev, inputs)
        ctx.callback = callback
        return F.view_as(F)

    @staticmethod
    def backward(ctx, g):
        s_prev, inputs = ctx.saved_tensors
        B, T, D = g.shape
        with _registered(ctx.callback) as handle:
            structure = _DIAGONAL if ctx.callback.structure == "diag" else _DENSE
            lam = torch.ops.pnewton.solve_user_adjoint(handle, structure, s_prev.reshape(B * T, D),
                                                       inputs.reshape(B * T, *inputs.shape[2:]), g)
        return lam, None, None, None


def solve(f, s0, inputs, method="auto", *, structure="dense", jacobian=None, max_iter=None, atol=None,
          rtol=None, damping=0.0, init="zeros", fallback=True):
    """Solve s_t = f(s_{t-1}, u_t), t = 1..T, in parallel over t.

    Args:
        f: batched step function ``f(s_prev [N, D], u [N, ...]) -> [N, D]``, any torch code.
        s0: initial state ``[B, D]``. inputs: ``[B, T, ...]``.
        method: ``auto`` (default): deer while B·T·D² ≤ 2²⁴ (torch.func forms the whole
            Jacobian for the diagonal too; with your ``jacobian=``, quasi_deer first, then
            deer while affordable), then the ELK filter step under the adaptive trust region,
            each stage ending when its residual stalls or after 4·log₂T iterations, then the
            loop; the path taken is ``stats.method``. Or one method: ``deer`` (full Jacobian, O(D³) per step),
            ``quasi_deer`` (its diagonal), ``elk`` / ``quasi_elk`` (the Levenberg–Marquardt
            step as a Kalman smoother over the dense / diagonal approximation),
            ``elk_filter`` / ``quasi_elk_filter`` (filter means only, as in the ELK paper's
            released code), ``picard`` (Ã = I), ``jacobi`` (Ã = 0) or ``sequential``.
        structure: ``dense`` or ``diag`` — the structure of f's true Jacobian in s. With
            ``diag`` (f acts elementwise on s), quasi_deer *is* Newton and gradients
            need only the diagonal.
        jacobian: optional analytic Jacobian ``jacobian(s_prev [N, D], u [N, ...], diagonal)``
            returning ``[N, D]`` (its diagonal) when ``diagonal`` else ``[N, D, D]``;
            without it, torch.func computes the full Jacobian (O(D) passes of f).
        max_iter: iteration budget (default min(T, 100); for auto, 4·log₂T per stage and no
            overall cap); undamped methods are exact after T.
        atol, rtol: a sequence has converged when the Newton step just taken, the error
            estimate max_t |δ_t|, is <= atol + rtol · max_t |f_t| (defaults per dtype:
            :func:`default_tolerance`). The residual alone would understate the error by the
            recurrence's memory, 1/(1 − contraction): this is the stop rule of
            ``pnewton.newton_rnn`` and the layers, whose solver this is.
        damping: κ in [0, 1): Ã is scaled by (1 − κ). For the elk methods: λ ≥ 0, the
            weight of the step penalty λ‖δ‖²; 0 (default) adapts λ per sequence by a trust
            region on ½‖r‖² (actual vs predicted decrease), never below a multiple of the
            residual relative to the states (README, the ELK step).
        init: ``zeros``, ``one_step`` (every step from s0) or a ``[B, T, D]`` warm start.
        fallback: rerun unconverged sequences with the sequential loop (default True).
            Without it, a sequence whose solution is not finite (a NaN input, say) returns
            its exact prefix and NaN from its first non-finite step on (per entry with
            ``structure="diag"``, every entry after that step otherwise), flagged
            ``converged=False`` with a NaN residual, as on every path.

    Returns:
        ``(states [B, T, D], SolveStats)``. Gradients flow to s0, inputs and anything f
        closes over, through the exact adjoint (never through the iterations). Once:
        differentiating the gradient (``create_graph=True``) raises, since the adjoint's
        Jacobian is taken without a graph (``pnewton.newton_rnn`` and the layers are
        twice differentiable).
    """
    if method not in METHODS:
        raise ValueError(f"pnewton.solve: method must be one of {METHODS}, got {method!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"pnewton.solve: structure must be one of {STRUCTURES}, got {structure!r}")
    for name, t in (("s0", s0), ("inputs", inputs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pnewton.solve: {name} must be a tensor, got {type(t).__name__}")
    if not s0.is_floating_point() or s0.dim() != 2:
        raise ValueError(f"pnewton.solve: s0 must be a floating [B, D] tensor, got {s0.dtype} of shape "
                         f"{tuple(s0.shape)}")
    if inputs.dim() < 2 or inputs.shape[0] != s0.shape[0]:
        raise ValueError(f"pnewton.solve: inputs must be [B, T, ...] with B = {s0.shape[0]}, "
                         f"got shape {tuple(inputs.shape)}")
    B, T, D = inputs.shape[0], inputs.shape[1], s0.shape[1]
    init_states = None
    if isinstance(init, torch.Tensor):
        if init.shape != (B, T, D) or not init.is_floating_point():
            raise ValueError(f"pnewton.solve: init must be a floating [B, T, D] = {(B, T, D)} warm start, got "
                             f"{init.dtype} of shape {tuple(init.shape)}")
        init, init_states = "states", init
    elif init is None:
        init = "zeros"
    elif init not in ("zeros", "one_step"):
        raise ValueError(f"pnewton.solve: init must be 'zeros', 'one_step' or a [B, T, D] tensor, got {init!r}")
    # The other options are checked by the solver, as for every op (csrc/solver/options.cpp).
    limits = _limits(max_iter, atol, rtol)
    callback = _Step(f, structure, jacobian)
    with torch.no_grad(), _registered(callback) as handle:
        states, iterations, residual, converged, path = torch.ops.pnewton.solve_user(
            handle, _DIAGONAL if structure == "diag" else _DENSE, s0.detach(), inputs.detach(), method, *limits,
            float(damping), 0.0, init, init_states, fallback, cheap_diagonal=jacobian is not None)
    stats = SolveStats(iterations, residual, converged, path, method)
    if not torch.is_grad_enabled() or T == 0:
        return states, stats
    # Reattach gradients at the solution: F = f(s*_{t-1}, u_t) carries the graph to
    # parameters, inputs and s0 (through step 1 only); the adjoint maps g to λ.
    s_prev = _shift(s0, states)
    F = _flat(f, s_prev, inputs)
    if not F.requires_grad:
        return states, stats
    out = _Adjoint.apply(F, s_prev.detach(), inputs.detach(), callback)
    return out + (states - out).detach(), stats
