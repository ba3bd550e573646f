"""Markov chain Monte Carlo evaluated in parallel over the chain's length (DESIGN §1).

A Metropolis-adjusted chain is a recurrence x_t = f(x_{t-1}, u_t) once its randomness u_t
(the proposal's noise and the accept test's uniform) is drawn up front: f proposes from
x_{t-1}, and returns the proposal where log(uniform) < log(acceptance ratio), else
x_{t-1}. :func:`pnewton.solve` then evaluates the whole chain at once by parallel Newton
iterations and returns *the sequential chain*: the same samples, accept decisions included,
up to the solver's tolerance (the decisions are piecewise constant in x, so once they
settle the iteration is Newton's on a smooth map). Chains that mix well are predictable —
a perturbation of x_t is forgotten within a few steps — and converge in tens of iterations
whatever their length (Zoltowski et al., "Parallelizing MCMC Across the Sequence Length",
2025).

    chain = pnewton.mcmc.mala(log_prob, x0, steps=10_000, step_size=0.05)
    chain.samples  # [B, T, D], chain.accepted [B, T], chain.stats (iterations, path, ...)

``log_prob(x [N, D]) -> [N]`` is any torch code that acts row by row; its gradient (and the
Jacobian of the step, for the Newton iterations) come from torch.func.

The quasi-Newton methods (``quasi_deer``; ``auto`` beyond exact Newton's size) need only the
diagonal of each step's Jacobian, and get it without forming the Jacobian: the Hessian's diagonal by
Hutchinson's estimate z ⊙ ∇²log p z (one forward-over-reverse pass, Rademacher z fixed per
row), carried through the step — MALA's 1 + ε h; HMC's leapfrog as a 2×2 block per
coordinate over (position, momentum), [[1, ε], [0, 1]] per drift and [[1, 0], [ε h, 1]] per
kick, whose product gives ∂q_L/∂q_0 — and 1 where the step rejects. The estimate only steers
the iterations: the chain they converge to is the sequential one whatever its error.
"""
import math
import time
from dataclasses import dataclass

import torch
from torch.func import grad, jvp

from .solve import SolveStats, _jacobian_rows, solve


@dataclass
class Chain:
    """A chain of T steps from each of B starting points."""

    samples: torch.Tensor   # [B, T, D]: x_1 .. x_T
    accepted: torch.Tensor  # [B, T] bool: step t's proposal was accepted
    stats: SolveStats       # the solve's diagnostics (iterations, converged, path, ...)
    seconds: float          # wall time of the solve (host-synchronised)

    @property
    def acceptance_rate(self):
        return self.accepted.to(self.samples.dtype).mean(1)


def _grad_log_prob(log_prob):
    # Row-wise log densities: the gradient of their sum is each row's gradient.
    return grad(lambda x: log_prob(x).sum())


def _checked(log_prob, x0, steps, step_size, generator):
    if not callable(log_prob):
        raise TypeError(f"pnewton.mcmc: log_prob must be callable, got {type(log_prob).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() not in (1, 2):
        raise ValueError("pnewton.mcmc: x0 must be a floating [D] or [B, D] tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"pnewton.mcmc: steps must be an integer >= 0, got {steps!r}")
    if not step_size > 0 or not math.isfinite(step_size):
        raise ValueError(f"pnewton.mcmc: step_size must be > 0, got {step_size!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("pnewton.mcmc: generator must be a torch.Generator or None")
    x = x0.unsqueeze(0) if x0.dim() == 1 else x0
    out = log_prob(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape[:1]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"pnewton.mcmc: log_prob(x [N, D]) must return [N] = {(x.shape[0],)}, got {got}")
    return x


def _draw(x, steps, generator):
    """The chain's randomness, drawn up front: [B, T, D + 1] — per step, the proposal's D
    standard normals (MALA's noise, HMC's momentum) and log U, U ~ Uniform(0, 1)."""
    B, D = x.shape
    z = torch.randn(B, steps, D, generator=generator, dtype=x.dtype, device=x.device)
    log_u = torch.rand(B, steps, 1, generator=generator, dtype=x.dtype, device=x.device).log()
    return torch.cat([z, log_u], -1)


def _probes(x):
    """Rademacher z [N, D] for Hutchinson's diagonal, the same at every evaluation (a fixed
    seed), so that each iteration's Jacobian approximation is a deterministic map."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    return torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1


def _with_hessian_diagonal(grad_fn, x, z):
    """∇log p(x) and the estimate z ⊙ ∇²log p(x) z of its Hessian's diagonal, in one pass."""
    g, hz = jvp(grad_fn, (x,), (z,))
    return g, z * hz


# auto runs exact Newton first while the chain's Jacobians hold at most this many numbers
# (B·T·D², solve's own threshold without jacobian=), quasi_deer on the estimate beyond.
_DEER_FIRST_NUMBERS = 1 << 24


def _run(step, x, inputs, method, max_iter):
    start = time.perf_counter()
    # Exact Newton's few iterations beat the estimate's many where the log density is cheap
    # (benchmarks/bench_mcmc.py: 4 against 42–55 for HMC on a coupled 6-D Gaussian); solve
    # without jacobian= orders auto so, and forms the whole Jacobian for every method.
    deer_first = method == "auto" and inputs.shape[0] * inputs.shape[1] * x.shape[1] ** 2 <= _DEER_FIRST_NUMBERS
    samples, stats = solve(step.next, x, inputs, method=method, jacobian=None if deer_first else step.jacobian,
                           max_iter=max_iter)
    if samples.is_cuda:
        torch.cuda.synchronize(samples.device)
    seconds = time.perf_counter() - start
    B, T, D = samples.shape
    prev = torch.cat([x.unsqueeze(1), samples[:, :-1]], 1)[:, :T]
    with torch.no_grad():
        accepted = step.decide(prev.reshape(B * T, D), inputs.reshape(B * T, inputs.shape[-1]))[1].reshape(B, T)
    return Chain(samples, accepted, stats, seconds)


class _MALA:
    """The Metropolis-adjusted Langevin step: y = x + ε∇log p(x) + √(2ε) z, accepted where
    log U < log p(y) − log p(x) + log q(x | y) − log q(y | x), q(y | x) = N(x + ε∇log p(x), 2ε I)."""

    def __init__(self, log_prob, step_size):
        self.log_prob, self.eps = log_prob, step_size
        self.grad = _grad_log_prob(log_prob)

    def decide(self, x, u, gx=None):
        D, eps = x.shape[1], self.eps
        z, log_u = u[:, :D], u[:, D]
        gx = self.grad(x) if gx is None else gx
        y = x + eps * gx + math.sqrt(2 * eps) * z
        gy = self.grad(y)
        log_q_forward = -((y - x - eps * gx) ** 2).sum(1) / (4 * eps)
        log_q_backward = -((x - y - eps * gy) ** 2).sum(1) / (4 * eps)
        log_alpha = self.log_prob(y) - self.log_prob(x) + log_q_backward - log_q_forward
        return y, log_u < log_alpha

    def next(self, x, u):
        y, accept = self.decide(x, u)
        return torch.where(accept.unsqueeze(1), y, x)

    def jacobian(self, x, u, diagonal):
        """∂next/∂x: torch.func's [N, D, D], or the estimate of its diagonal, 1 + ε h (1 where rejected)."""
        if not diagonal:
            return _jacobian_rows(self.next, x, u, False)
        gx, h = _with_hessian_diagonal(self.grad, x, _probes(x))
        accept = self.decide(x, u, gx)[1]
        return torch.where(accept.unsqueeze(1), 1 + self.eps * h, torch.ones_like(x))


class _HMC:
    """Hamiltonian Monte Carlo with a fresh standard-normal momentum p each step and L leapfrog
    steps of size ε (identity mass), accepted where log U < H(x, p) − H(x', p'),
    H = −log p(x) + ½‖p‖²."""

    def __init__(self, log_prob, step_size, leapfrog_steps):
        self.log_prob, self.eps, self.L = log_prob, step_size, leapfrog_steps
        self.grad = _grad_log_prob(log_prob)

    def _trajectory(self, x, p0, probes=None):
        """The leapfrog from (x, p0): (q_L, p_L) and, given probes, the estimate of ∂q_L/∂x's
        diagonal (the tangent (dq, dp) of each coordinate carried through the 2×2 blocks)."""
        eps = self.eps
        with_h = (lambda q: _with_hessian_diagonal(self.grad, q, probes)) if probes is not None else \
            (lambda q: (self.grad(q), None))
        g, h = with_h(x)
        q, p = x, p0 + 0.5 * eps * g
        dq = dp = None
        if probes is not None:
            dq, dp = torch.ones_like(x), 0.5 * eps * h
        for i in range(self.L):
            kick = eps if i + 1 < self.L else 0.5 * eps
            q = q + eps * p
            g, h = with_h(q)
            p = p + kick * g
            if probes is not None:
                dq = dq + eps * dp
                dp = dp + kick * h * dq
        return q, p, dq

    def decide(self, x, u, probes=None):
        D = x.shape[1]
        p0, log_u = u[:, :D], u[:, D]
        q, p, dq = self._trajectory(x, p0, probes)
        h0 = -self.log_prob(x) + 0.5 * (p0 ** 2).sum(1)
        h1 = -self.log_prob(q) + 0.5 * (p ** 2).sum(1)
        return q, log_u < h0 - h1, dq

    def next(self, x, u):
        q, accept, _ = self.decide(x, u)
        return torch.where(accept.unsqueeze(1), q, x)

    def jacobian(self, x, u, diagonal):
        """∂next/∂x: torch.func's [N, D, D], or the estimate of its diagonal (1 where rejected)."""
        if not diagonal:
            return _jacobian_rows(self.next, x, u, False)
        _, accept, dq = self.decide(x, u, _probes(x))
        return torch.where(accept.unsqueeze(1), dq, torch.ones_like(x))


def mala(log_prob, x0, steps, step_size, *, generator=None, method="auto", max_iter=None):
    """A Metropolis-adjusted Langevin chain of ``steps`` steps from ``x0`` ([D] or B chains
    [B, D]), evaluated in parallel over the steps.

    Args:
        log_prob: ``log_prob(x [N, D]) -> [N]``, the target's log density up to a constant.
        step_size: ε, the Langevin step (proposal y = x + ε∇log p(x) + √(2ε) z).
        generator: the torch.Generator the noise is drawn from (one draw up front: the same
            generator state gives the same chain whatever the method).
        method: the solve's method: ``auto`` (exact Newton on the step's whole Jacobian
            from torch.func while B·T·D² ≤ 2²⁴, then the adaptive ELK filter, then the loop;
            beyond that size quasi_deer first), any other of :func:`pnewton.solve`'s
            (``quasi_deer``: the estimated diagonal, one Hessian-vector product per
            gradient, more iterations each far cheaper than deer's D passes: faster where
            the log density is costly, e.g. a likelihood over many data), or
            ``sequential``, the reference loop.
        max_iter: the solve's iteration budget (None: its default).

    Returns:
        :class:`Chain`: samples [B, T, D], the accept decisions [B, T], the solve's stats and
        its wall time. The samples are the sequential chain's within the solver's tolerance
        (float64: 1e-12 relative; an unconverged chain falls back to the loop).
    """
    x = _checked(log_prob, x0, steps, step_size, generator)
    return _run(_MALA(log_prob, step_size), x, _draw(x, steps, generator), method, max_iter)


def hmc(log_prob, x0, steps, step_size, leapfrog_steps, *, generator=None, method="auto", max_iter=None):
    """A Hamiltonian Monte Carlo chain (``leapfrog_steps`` leapfrog steps of size
    ``step_size`` per transition, a fresh momentum each), evaluated in parallel over the
    transitions; arguments and result as :func:`mala`."""
    x = _checked(log_prob, x0, steps, step_size, generator)
    if isinstance(leapfrog_steps, bool) or not isinstance(leapfrog_steps, int) or leapfrog_steps < 1:
        raise ValueError(f"pnewton.mcmc: leapfrog_steps must be an integer >= 1, got {leapfrog_steps!r}")
    return _run(_HMC(log_prob, step_size, leapfrog_steps), x, _draw(x, steps, generator), method, max_iter)
