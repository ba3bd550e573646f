"""Parallel Newton solver for any recurrence s_t = f(s_{t-1}, u_t) written in PyTorch.

Each iteration evaluates f at every step at once, forms the chosen approximation Ã_t of
the Jacobian ∂f/∂s, and solves the linear recurrence δ_t = Ã_t δ_{t-1} − r_t with the
scan ops (DESIGN §1). Gradients never go through the iterations: the adjoint
λ_t = g_t + A_{t+1}ᵀ λ_{t+1} with the *true* Jacobian A at the solution is one reverse
scan, and the parameter/input gradients are one vector-Jacobian product of f over all t.
"""
import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.func import jacfwd, vmap

from .scan import scan_block, scan_diag

METHODS = ("auto", "deer", "quasi_deer", "elk", "quasi_elk", "elk_filter", "quasi_elk_filter", "picard", "jacobi",
           "sequential")
STRUCTURES = ("dense", "diag")
# Bit i of SolveStats.path: the i-th method of the solver's Method enum (csrc/solver/newton.h).
# fused_loop: torch's own fused RNN kernels (cuDNN / oneDNN / ATen) over a layer stack, which
# the layers' auto chooses where the parallel solve does not pay (csrc/solver/auto_plan.h).
PATH_BITS = ("deer", "quasi_deer", "block_deer", "picard", "jacobi", "sequential", "elk", "quasi_elk", "elk_filter",
             "quasi_elk_filter", "fused_loop")
# The order in which a path is told: auto's stages come in this order, the loop last.
_PATH_ORDER = ("quasi_deer", "block_deer", "deer", "picard", "jacobi", "elk", "quasi_elk", "elk_filter",
               "quasi_elk_filter", "sequential", "fused_loop")
_ELK = ("elk", "quasi_elk", "elk_filter", "quasi_elk_filter")


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


def default_tolerance(dtype):
    """(atol, rtol) on the residual: a few hundred ulps of the dtype."""
    eps = torch.finfo(dtype).eps
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, max(1e-2, 100 * eps))
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


def _jacobian(f, s_prev, inputs, structure, jacobian=None, diagonal=False):
    """∂f/∂s at every step: [B, T, D, D], or the diagonal [B, T, D] when `diagonal` or
    structure='diag' (f elementwise in s, so the diagonal is the whole Jacobian).
    A user `jacobian(s_prev [N, D], u [N, ...], diagonal) -> [N, D] | [N, D, D]` replaces
    the torch.func evaluation."""
    B, T, D = s_prev.shape
    flat_s, flat_u = s_prev.reshape(B * T, D), inputs.reshape(B * T, *inputs.shape[2:])
    want_diag = diagonal or structure == "diag"
    if jacobian is not None:
        J = jacobian(flat_s, flat_u, want_diag)
    elif structure == "diag":
        _, J = torch.func.jvp(lambda s: f(s, flat_u), (flat_s,), (torch.ones_like(flat_s),))
    else:
        single = lambda s, u: f(s.unsqueeze(0), u.unsqueeze(0)).squeeze(0)  # noqa: E731
        J = vmap(jacfwd(single))(flat_s, flat_u)
        if want_diag:
            J = J.diagonal(dim1=-2, dim2=-1)
    return J.reshape(B, T, D) if want_diag else J.reshape(B, T, D, D)


def sequential(f, s0, inputs):
    """The reference loop: s_t = f(s_{t-1}, u_t), one step at a time."""
    s, out = s0, []
    for t in range(inputs.shape[1]):
        s = _step(f, s, inputs[:, t])
        out.append(s)
    return torch.stack(out, 1) if out else s0.new_empty(s0.shape[0], 0, s0.shape[1])


# The trust region on ½‖r‖² (adaptive ELK damping) and the auto method's stage budget and
# stall test: the same rules and constants as the C++ solver (csrc/solver/newton.cpp).
_LAMBDA_START, _LAMBDA_MIN, _LAMBDA_MAX = 1.0, 1e-12, 1e12
_SHRINK, _GROW, _ACCEPT = 0.1, 4.0, 1e-4
_STALL_WINDOW = 4


def _auto_budget(T):
    return max(8, 4 * math.ceil(math.log2(T + 1)))


_AUTO_LAMBDA = 0.1


def _auto_stages(structure, dense_size):
    if structure == "diag":
        return ["deer", "elk_filter"]
    return ["quasi_deer"] + (["deer"] if dense_size <= 2 ** 24 else []) + ["quasi_elk_filter"]


def _merit(r):
    m = 0.5 * r.square().sum((1, 2))
    return torch.where(torch.isfinite(m), m, torch.full_like(m, float("inf")))


def _first_step(x):
    """[B]: the first step t where x [B, T] is true, T where none is."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device).expand_as(x)
    return torch.where(x, t, T).amin(1)


def _stage(f, s0, inputs, state, method, structure, jacobian, budget, stall, atol, rtol, damping):
    """Runs `method` for at most `budget` iterations from state["s"] (see run_stage in C++:
    the same convergence test, exact-prefix cap and stuck test)."""
    B, T = s0.shape[0], inputs.shape[1]
    elk = method in _ELK
    if not elk:
        budget = min(budget, T)  # one more state exact per iteration: T iterations solve it
    adaptive = elk and damping == 0
    lam = torch.full((B,), _LAMBDA_START if adaptive else damping, dtype=s0.dtype, device=s0.device)
    diagonal = method.startswith("quasi_")
    before = state["iterations"].clone()
    nonfinite_merit = torch.zeros(B, dtype=torch.long, device=s0.device)

    def evaluate(s):
        F = _flat(f, _shift(s0, s), inputs)
        return F, s - F

    def check(F, r, phi=None):
        nonlocal nonfinite_merit
        per_step = r.abs().amax(dim=2)
        state["residual"] = per_step.amax(dim=1)
        finite = torch.isfinite(state["residual"])
        if not elk:
            # A non-finite residual inside the exact prefix is the solution's own.
            iterated = state["iterations"] - before
            state["stuck"] = state["stuck"] | (~finite & (_first_step(~torch.isfinite(per_step)) < iterated))
        elif phi is not None:
            nonfinite_merit = torch.where(torch.isfinite(phi), 0, nonfinite_merit + 1)
            state["stuck"] = state["stuck"] | (nonfinite_merit >= _STALL_WINDOW)
        state["converged"] = finite & (state["residual"] <= atol + rtol * F.abs().amax(dim=(1, 2)))
        state["F"] = F

    s = state["s"]
    F, r = evaluate(s)
    check(F, r)
    phi = _merit(r)
    history = [phi]
    for it in range(budget):
        settled = state["converged"] | state["stuck"]
        stop = settled.all()
        if stall and it >= _STALL_WINDOW:
            halved = phi <= 0.5 * history[-1 - _STALL_WINDOW]
            stop = stop | (settled | ~halved).all()
        if bool(stop):
            break
        moving = ~settled
        state["path"] |= torch.where(moving, _bit(method), 0)
        predicted = None
        if method == "jacobi":
            step = F
        elif method == "picard":
            step = s - r.cumsum(1)
        else:
            a = _jacobian(f, _shift(s0, s), inputs, structure, jacobian, diagonal=diagonal)
            if elk:
                delta = torch.ops.pnewton.elk_step(a, r, lam, method in ("elk", "quasi_elk"))
                dp = torch.cat([torch.zeros_like(delta[:, :1]), delta[:, :-1]], 1)
                a_dp = a * dp if a.dim() == 3 else (a @ dp.unsqueeze(-1)).squeeze(-1)
                predicted = phi - _merit(r + delta - a_dp)
            else:
                if damping:
                    a = a * (1.0 - damping)
                delta = scan_diag(a, -r) if a.dim() == 3 else scan_block(a.unsqueeze(2), -r.unsqueeze(2)).squeeze(2)
            step = s + delta
        # Non-finite values beyond the exact prefix of a causal method are no part of the
        # solution: resetting them keeps the guarantee that iteration i makes the first i
        # states exact. Those of the solution itself make the sequence stuck (check).
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        step = torch.where(moving[:, None, None], step, s)
        F_new, r_new = evaluate(step)
        state["iterations"] += moving.long()
        if adaptive:
            phi_new = _merit(r_new)
            rho = (phi - phi_new) / predicted.clamp_min(torch.finfo(s.dtype).tiny)
            accept = moving & torch.isfinite(phi_new) & (rho > _ACCEPT)
            poor = moving & ((rho < 0.25) | ~torch.isfinite(rho))
            lam = torch.where(moving & (rho > 0.75), lam * _SHRINK, torch.where(poor, lam * _GROW, lam))
            lam = lam.clamp(_LAMBDA_MIN, _LAMBDA_MAX)
            keep = accept[:, None, None]
            s, F, r = torch.where(keep, step, s), torch.where(keep, F_new, F), torch.where(keep, r_new, r)
            phi = torch.where(accept, phi_new, phi)
        else:
            s, F, r = step, F_new, r_new
            phi = _merit(r)
        check(F, r, phi)
        history.append(phi)
    state["s"] = s


def _newton(f, s0, inputs, method, structure, jacobian, max_iter, atol, rtol, damping, init):
    B, T, D = s0.shape[0], inputs.shape[1], s0.shape[1]
    if init is None or init == "zeros":
        s = s0.new_zeros(B, T, D)
    elif init == "one_step":
        s = _flat(f, s0.unsqueeze(1).expand(B, T, D), inputs)
    else:
        s = init.detach().clone()
    state = dict(s=s, iterations=torch.zeros(B, dtype=torch.long, device=s0.device),
                 path=torch.zeros(B, dtype=torch.long, device=s0.device),
                 stuck=torch.zeros(B, dtype=torch.bool, device=s0.device))
    args = (structure, jacobian)
    if method != "auto":
        _stage(f, s0, inputs, state, method, *args, min(T, 100) if max_iter is None else max_iter, False, atol, rtol,
               damping)
    else:
        left = float("inf") if max_iter is None else max_iter
        _stage(f, s0, inputs, state, "quasi_deer", *args, 0, False, atol, rtol, 0.0)  # the residual at the start
        for stage in _auto_stages(structure, B * T * D * D):
            before = int(state["iterations"].max())
            start = dict(state)
            _stage(f, s0, inputs, state, stage, *args, int(min(_auto_budget(T), left)), True, atol, rtol,
                   _AUTO_LAMBDA if stage in _ELK else damping)
            # A stage that left a sequence worse than it found it hands the next stage its start.
            worse = ~state["stuck"] & ((state["residual"] > start["residual"]) | ~torch.isfinite(state["residual"]))
            state["s"] = torch.where(worse[:, None, None], start["s"], state["s"])
            state["F"] = torch.where(worse[:, None, None], start["F"], state["F"])
            for key in ("residual", "converged"):
                state[key] = torch.where(worse, start[key], state[key])
            left -= int(state["iterations"].max()) - before
            if left <= 0 or bool((state["converged"] | state["stuck"]).all()):
                break
    return state


def _nonfinite_pattern(F, structure):
    """Where the solution is not finite, from f at the returned states (exact up to the
    first non-finite step of a stuck sequence): the entries non-finite there and, after
    it, what the recurrence carries them to — the same entry (structure='diag') or every
    entry (dense). The NaN pattern of the loop for NaN inputs (csrc: nonfinite_pattern)."""
    bad = ~torch.isfinite(F)
    spread = bad if structure == "diag" else bad.any(-1, keepdim=True)
    T = F.shape[1]
    t = torch.arange(T, device=F.device).view(1, T, 1)
    last = torch.where(spread, t, -1).cummax(1).values
    last_before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    return bad | (last_before >= 0)


class _Adjoint(torch.autograd.Function):
    """Identity forward; backward maps g to λ_t = g_t + A_{t+1}ᵀ λ_{t+1} (true Jacobian A)."""

    @staticmethod
    def forward(ctx, states, jac):
        ctx.save_for_backward(jac)
        return states.view_as(states)

    @staticmethod
    @once_differentiable  # its Jacobian is saved without a graph: double backward would be wrong
    def backward(ctx, g):
        (jac,) = ctx.saved_tensors
        T = g.shape[1]
        if T <= 1:
            return g, None
        # λ_{T-1} = g_{T-1}; earlier steps by the reverse scan over A_{t+1} = jac[:, 1:]
        # (a view, no shifted copy), entering from λ_{T-1}.
        if jac.dim() == 3:
            head = scan_diag(jac[:, 1:], g[:, :-1], g[:, -1], reverse=True)
        else:
            head = scan_block(jac[:, 1:].unsqueeze(2), g[:, :-1].unsqueeze(2), g[:, -1].unsqueeze(1),
                              reverse=True, transpose=True).squeeze(2)
        return torch.cat([head, g[:, -1:]], 1), None


def solve(f, s0, inputs, method="auto", *, structure="dense", jacobian=None, max_iter=None, atol=None,
          rtol=None, damping=0.0, init="zeros", fallback=True):
    """Solve s_t = f(s_{t-1}, u_t), t = 1..T, in parallel over t.

    Args:
        f: batched step function ``f(s_prev [N, D], u [N, ...]) -> [N, D]``, any torch code.
        s0: initial state ``[B, D]``. inputs: ``[B, T, ...]``.
        method: ``auto`` (default): quasi_deer (deer for ``structure="diag"``), then deer
            while B·T·D² ≤ 2²⁴, then the trust-region ELK step, each stage ending when its residual
            stalls or after 4·log₂T iterations, then the loop; the path taken is
            ``stats.method``. Or one method: ``deer`` (full Jacobian, O(D³) per step),
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
        atol, rtol: convergence when max_t |r_t| <= atol + rtol · max_t |f_t| per sequence
            (defaults per dtype: :func:`default_tolerance`).
        damping: κ in [0, 1): Ã is scaled by (1 − κ). For the elk methods: λ ≥ 0, the
            weight of the step penalty λ‖δ‖²; 0 (default) adapts λ per sequence by a trust
            region on ½‖r‖² (actual vs predicted decrease).
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
    if inputs.device != s0.device:
        raise ValueError(f"pnewton.solve: inputs must be on the device of s0 ({s0.device}), got {inputs.device}")
    # Written so that NaN fails every test.
    if method in _ELK and not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"pnewton.solve: damping (the ELK λ) must be >= 0 (0 = adaptive), got {damping}")
    if method not in _ELK and not 0.0 <= damping < 1.0:
        raise ValueError(f"pnewton.solve: damping must be in [0, 1), got {damping}")
    B, T, D = inputs.shape[0], inputs.shape[1], s0.shape[1]
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"pnewton.solve: max_iter must be an integer >= 0 (or None: the default), got {max_iter!r}")
    d_atol, d_rtol = default_tolerance(s0.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"pnewton.solve: atol and rtol must be >= 0, got {atol}, {rtol}")
    if isinstance(init, torch.Tensor):
        if init.shape != (B, T, D) or not init.is_floating_point():
            raise ValueError(f"pnewton.solve: init must be a floating [B, T, D] = {(B, T, D)} warm start, got "
                             f"{init.dtype} of shape {tuple(init.shape)}")
    elif init not in (None, "zeros", "one_step"):
        raise ValueError(f"pnewton.solve: init must be 'zeros', 'one_step' or a [B, T, D] tensor, got {init!r}")

    def exact(states):
        # The loop's states are the solution, unless they are not finite: then not converged,
        # residual NaN (one definition of converged on every path).
        converged = torch.isfinite(states).flatten(1).all(1)
        return converged, torch.where(converged, 0.0, math.nan).to(s0.dtype)

    with torch.no_grad():
        s0_d, inputs_d = s0.detach(), inputs.detach()
        if T == 0:
            empty = s0.new_zeros(B)
            return s0.new_empty(B, 0, D), SolveStats(empty.long(), empty, empty == 0, empty.long(), method)
        if method == "sequential" or B == 0:
            states = sequential(f, s0_d, inputs_d)
            converged, residual = exact(states)
            stats = SolveStats(torch.full((B,), T, device=s0.device), residual, converged,
                               torch.full((B,), _bit("sequential"), device=s0.device), method)
        else:
            state = _newton(f, s0_d, inputs_d, method, structure, jacobian, max_iter, atol, rtol, damping, init)
            states, iterations, residual, converged, path = (state[k] for k in
                                                             ("s", "iterations", "residual", "converged", "path"))
            if fallback and not bool(converged.all()):
                redo = ~converged
                loop = sequential(f, s0_d[redo], inputs_d[redo])
                states[redo] = loop
                iterations = torch.where(redo, torch.full_like(iterations, T), iterations)
                converged, residual = converged.clone(), residual.clone()
                converged[redo], residual[redo] = exact(loop)
                path = torch.where(redo, path | _bit("sequential"), path)
            else:
                # A stuck sequence returns its exact prefix and its solution's NaN pattern.
                pattern = _nonfinite_pattern(state["F"], structure) & state["stuck"][:, None, None]
                states = states.masked_fill(pattern, math.nan)
            stats = SolveStats(iterations, residual, converged, path, method)

    if not torch.is_grad_enabled():
        return states, stats
    # Reattach gradients at the solution: F = f(s*_{t-1}, u_t) carries the graph to
    # parameters, inputs and s0 (through step 1 only); the adjoint solve maps g to λ.
    s_prev = _shift(s0, states)
    with torch.no_grad():
        jac = _jacobian(f, s_prev.detach(), inputs_d, structure, jacobian)
    F = _flat(f, torch.cat([s0.unsqueeze(1), states[:, :-1]], 1), inputs)
    if not F.requires_grad:
        return states, stats
    out = _Adjoint.apply(F, jac)
    return out + (states - out).detach(), stats
