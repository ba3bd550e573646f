"""Parallel Newton solver for any recurrence s_t = f(s_{t-1}, u_t) written in PyTorch.

Each iteration evaluates f at every step at once, forms the chosen approximation Ã_t of
the Jacobian ∂f/∂s, and solves the linear recurrence δ_t = Ã_t δ_{t-1} − r_t with the
scan ops (DESIGN §1). Gradients never go through the iterations: the adjoint
λ_t = g_t + A_{t+1}ᵀ λ_{t+1} with the *true* Jacobian A at the solution is one reverse
scan, and the parameter/input gradients are one vector-Jacobian product of f over all t.
"""
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

from .scan import scan_block, scan_diag

METHODS = ("deer", "quasi_deer", "picard", "jacobi", "sequential")
STRUCTURES = ("dense", "diag")


@dataclass
class SolveStats:
    """Diagnostics of one solve, per sequence where shaped [B].

    Only tensors are stored, so making the record costs no host synchronisation (and no
    graph break under torch.compile); ``fallback`` and ``method`` read them when asked.
    """

    iterations: torch.Tensor  # [B] Newton iterations used (T when the sequential fallback ran)
    residual: torch.Tensor  # [B] final max |s_t - f(s_{t-1}, u_t)|
    converged: torch.Tensor  # [B] bool: the states satisfy the recurrence to tolerance
    fell_back: torch.Tensor  # [B] bool: the sequential fallback produced these sequences
    requested: str  # the method asked for

    @property
    def fallback(self):
        """Whether the sequential fallback ran for any sequence."""
        return bool(self.fell_back.any())

    @property
    def method(self):
        """The method that produced the states, e.g. "quasi_deer" or "quasi_deer->sequential"."""
        return f"{self.requested}->sequential" if self.fallback else self.requested


def default_tolerance(dtype):
    """(atol, rtol) on the residual: a few hundred ulps of the dtype."""
    eps = torch.finfo(dtype).eps
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, max(1e-2, 100 * eps))
    return tol, tol


def _flat(f, s_prev, inputs):
    """f over all steps at once: s_prev [B, T, D], inputs [B, T, ...] -> [B, T, D]."""
    B, T = s_prev.shape[:2]
    out = f(s_prev.reshape(B * T, -1), inputs.reshape(B * T, *inputs.shape[2:]))
    return out.reshape(B, T, -1)


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
        s = f(s, inputs[:, t])
        out.append(s)
    return torch.stack(out, 1) if out else s0.new_empty(s0.shape[0], 0, s0.shape[1])


def _newton(f, s0, inputs, method, structure, jacobian, max_iter, atol, rtol, damping, init):
    B, T, D = s0.shape[0], inputs.shape[1], s0.shape[1]
    if init is None or init == "zeros":
        s = s0.new_zeros(B, T, D)
    elif init == "one_step":
        s = _flat(f, s0.unsqueeze(1).expand(B, T, D), inputs)
    else:
        s = init.detach().clone()
    iterations = torch.zeros(B, dtype=torch.long, device=s0.device)
    converged = torch.zeros(B, dtype=torch.bool, device=s0.device)
    residual = torch.full((B,), float("inf"), dtype=s0.dtype, device=s0.device)
    for it in range(max_iter + 1):
        F = _flat(f, _shift(s0, s), inputs)
        r = s - F
        residual = r.abs().amax(dim=(1, 2)) if T > 0 else torch.zeros_like(residual)
        bound = atol + rtol * F.abs().amax(dim=(1, 2)) if T > 0 else residual
        converged = torch.isfinite(residual) & (residual <= bound)
        if bool(converged.all()) or it == max_iter:
            break
        if method == "jacobi":
            step = F
        else:
            if method == "picard":
                a = torch.ones_like(s)
            else:  # deer, or quasi_deer with the diagonal only
                a = _jacobian(f, _shift(s0, s), inputs, structure, jacobian, diagonal=method == "quasi_deer")
            if damping:
                a = a * (1.0 - damping)
            if a.dim() == 3:
                delta = scan_diag(a, -r)
            else:
                delta = scan_block(a.unsqueeze(2), -r.unsqueeze(2)).squeeze(2)
            step = s + delta
        # Non-finite values can only appear beyond the exact prefix: resetting them keeps
        # the guarantee that iteration i makes the first i states exact.
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        # Converged sequences keep their states; only the others move.
        s = torch.where(converged[:, None, None], s, step)
        iterations += (~converged).long()
    return s, iterations, residual, converged


class _Adjoint(torch.autograd.Function):
    """Identity forward; backward maps g to λ_t = g_t + A_{t+1}ᵀ λ_{t+1} (true Jacobian A)."""

    @staticmethod
    def forward(ctx, states, jac):
        ctx.save_for_backward(jac)
        return states.view_as(states)

    @staticmethod
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


def solve(f, s0, inputs, method="quasi_deer", *, structure="dense", jacobian=None, max_iter=None, atol=None,
          rtol=None, damping=0.0, init="zeros", fallback=True):
    """Solve s_t = f(s_{t-1}, u_t), t = 1..T, in parallel over t.

    Args:
        f: batched step function ``f(s_prev [N, D], u [N, ...]) -> [N, D]``, any torch code.
        s0: initial state ``[B, D]``. inputs: ``[B, T, ...]``.
        method: ``deer`` (full Jacobian, O(D³) per step), ``quasi_deer`` (its diagonal),
            ``picard`` (Ã = I), ``jacobi`` (Ã = 0), or ``sequential`` (the loop).
        structure: ``dense`` or ``diag`` — the structure of f's true Jacobian in s. With
            ``diag`` (f acts elementwise on s), quasi_deer *is* Newton and gradients
            need only the diagonal.
        jacobian: optional analytic Jacobian ``jacobian(s_prev [N, D], u [N, ...], diagonal)``
            returning ``[N, D]`` (its diagonal) when ``diagonal`` else ``[N, D, D]``;
            without it, torch.func computes the full Jacobian (O(D) passes of f).
        max_iter: iteration budget (default min(T, 100)); undamped methods are exact after T.
        atol, rtol: convergence when max_t |r_t| <= atol + rtol · max_t |f_t| per sequence
            (defaults per dtype: :func:`default_tolerance`).
        damping: κ in [0, 1): Ã is scaled by (1 − κ).
        init: ``zeros``, ``one_step`` (every step from s0) or a ``[B, T, D]`` warm start.
        fallback: rerun unconverged sequences with the sequential loop (default True).

    Returns:
        ``(states [B, T, D], SolveStats)``. Gradients flow to s0, inputs and anything f
        closes over, through the exact adjoint (never through the iterations).
    """
    if method not in METHODS:
        raise ValueError(f"pnewton.solve: method must be one of {METHODS}, got {method!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"pnewton.solve: structure must be one of {STRUCTURES}, got {structure!r}")
    if s0.dim() != 2:
        raise ValueError(f"pnewton.solve: s0 must be [B, D], got shape {tuple(s0.shape)}")
    if inputs.dim() < 2 or inputs.shape[0] != s0.shape[0]:
        raise ValueError(f"pnewton.solve: inputs must be [B, T, ...] with B = {s0.shape[0]}, "
                         f"got shape {tuple(inputs.shape)}")
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"pnewton.solve: damping must be in [0, 1), got {damping}")
    B, T = inputs.shape[:2]
    max_iter = min(T, 100) if max_iter is None else max_iter
    if max_iter < 0:
        raise ValueError(f"pnewton.solve: max_iter must be >= 0, got {max_iter}")
    d_atol, d_rtol = default_tolerance(s0.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise ValueError(f"pnewton.solve: atol and rtol must be >= 0, got {atol}, {rtol}")

    with torch.no_grad():
        s0_d, inputs_d = s0.detach(), inputs.detach()
        if T == 0:
            empty = s0.new_zeros(B)
            return s0.new_empty(B, 0, s0.shape[1]), SolveStats(empty.long(), empty, empty == 0, empty != 0, method)
        if method == "sequential":
            states = sequential(f, s0_d, inputs_d)
            ones = torch.ones(B, dtype=torch.bool, device=s0.device)
            stats = SolveStats(torch.full((B,), T, device=s0.device), torch.zeros(B, dtype=s0.dtype, device=s0.device),
                               ones, torch.zeros_like(ones), "sequential")
        else:
            states, iterations, residual, converged = _newton(f, s0_d, inputs_d, method, structure, jacobian,
                                                              max_iter, atol, rtol, damping, init)
            fell_back = torch.zeros_like(converged)
            if fallback and not bool(converged.all()):
                redo = ~converged
                exact = sequential(f, s0_d[redo], inputs_d[redo])
                states[redo] = exact
                iterations = torch.where(redo, torch.full_like(iterations, T), iterations)
                residual = torch.where(redo, torch.zeros_like(residual), residual)
                # Exact by definition, unless non-finite inputs made the loop's states NaN/Inf.
                converged = converged.clone()
                converged[redo] = torch.isfinite(exact).flatten(1).all(1)
                fell_back = redo
            stats = SolveStats(iterations, residual, converged, fell_back, method)

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
