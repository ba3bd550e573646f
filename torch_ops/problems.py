"""Small dynamical systems with known behaviour under parallel Newton methods (DESIGN §1).

They reproduce published results in tests/python/test_stability.py and
examples/stability.py. Each returns ``(f, s0, inputs, jacobian)`` in float64 for
:func:`pnewton.solve` / :func:`pnewton.lyapunov`; ``jacobian`` is analytic (dense).
"""
import math

import torch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def mean_field(g, D=100, T=1000, B=1, seed=0):
    """s_t = W tanh(s_{t-1}) + u_t, W_ij ~ N(0, g²/D) with a zero diagonal, small
    sinusoidal inputs. Chaotic above g ≈ 1 (for large D), contracting below."""
    gen = _gen(seed)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64) * g / math.sqrt(D)
    W.fill_diagonal_(0)
    t = torch.arange(T, dtype=torch.float64)
    phase = torch.rand(B, 1, D, generator=gen, dtype=torch.float64) * 2 * math.pi
    inputs = 0.1 * torch.sin(0.05 * t[None, :, None] + phase)
    s0 = torch.randn(B, D, generator=gen, dtype=torch.float64) * 0.1

    def f(s, u):
        return torch.tanh(s) @ W.T + u

    def jacobian(s, u, diagonal):
        J = W * (1 - torch.tanh(s) ** 2)[:, None, :]
        return J.diagonal(dim1=-2, dim2=-1) if diagonal else J

    return f, s0, inputs, jacobian


def permutation(T=50, D=5, B=1, seed=0):
    """s_t = P(u_t) s_{t-1} + c_t: the input picks one of D! permutation matrices. Linear,
    so exact Newton (deer) converges in one iteration; the diagonal of a permutation is
    mostly zero, so quasi-Newton and Picard gain little over one step per iteration."""
    gen = _gen(seed)
    perms = torch.stack([torch.randperm(D, generator=gen) for _ in range(8)])
    choice = torch.randint(0, 8, (B, T), generator=gen)
    offsets = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    inputs = torch.cat([choice.unsqueeze(-1).double(), offsets], -1)
    s0 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64)

    def matrices(u):
        return eye[perms[u[:, 0].long()]]  # rows permuted: (P s)_i = s_{perm_i}

    def f(s, u):
        return (matrices(u) @ s.unsqueeze(-1)).squeeze(-1) + u[:, 1:]

    def jacobian(s, u, diagonal):
        P = matrices(u)
        return P.diagonal(dim1=-2, dim2=-1) if diagonal else P

    return f, s0, inputs, jacobian


def langevin(T, B=1, dt=0.01, seed=0):
    """Unadjusted Langevin sampling of the two-well potential U(s) = ¼ Σ_i (s_i² − 1)² in
    D = 2: s_t = s_{t-1} − dt ∇U(s_{t-1}) + √(2 dt) ξ_t, the noise ξ fixed as the input."""
    gen = _gen(seed)
    inputs = math.sqrt(2 * dt) * torch.randn(B, T, 2, generator=gen, dtype=torch.float64)
    s0 = torch.ones(B, 2, dtype=torch.float64)

    def f(s, u):
        return s - dt * s * (s * s - 1) + u

    def jacobian(s, u, diagonal):
        d = 1 - dt * (3 * s * s - 1)
        return d if diagonal else torch.diag_embed(d)

    return f, s0, inputs, jacobian


def _lorenz_field(x, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    return torch.stack([sigma * (x[:, 1] - x[:, 0]), x[:, 0] * (rho - x[:, 2]) - x[:, 1],
                        x[:, 0] * x[:, 1] - beta * x[:, 2]], -1)


def _lorenz_jacobian(x, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    N = x.shape[0]
    J = torch.zeros(N, 3, 3, dtype=x.dtype)
    J[:, 0, 0], J[:, 0, 1] = -sigma, sigma
    J[:, 1, 0], J[:, 1, 1], J[:, 1, 2] = rho - x[:, 2], -1, -x[:, 0]
    J[:, 2, 0], J[:, 2, 1], J[:, 2, 2] = x[:, 1], x[:, 0], -beta
    return J


def lorenz(T, B=1, dt=0.01, seed=0):
    """Lorenz-63 by forward Euler: chaotic (largest exponent ≈ 0.9 per unit time)."""
    gen = _gen(seed)
    s0 = torch.tensor([[1.0, 1.0, 20.0]], dtype=torch.float64) + torch.randn(B, 3, generator=gen, dtype=torch.float64)
    inputs = torch.zeros(B, T, 1, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)

    def f(s, u):
        return s + dt * _lorenz_field(s)

    def jacobian(s, u, diagonal):
        J = eye + dt * _lorenz_jacobian(s)
        return J.diagonal(dim1=-2, dim2=-1) if diagonal else J

    return f, s0, inputs, jacobian


def lorenz_observer(T, B=1, dt=0.01, gain=20.0, seed=0):
    """An observer of the Lorenz system driven by its true trajectory x_t (the input):
    ŝ_t = ŝ_{t-1} + dt (F(ŝ_{t-1}) + L (x_{t-1} − ŝ_{t-1})). With gain L = 20·I it
    synchronises to x: the same nonlinearity, but contracting."""
    f_true, x0, _, _ = lorenz(T, B, dt, seed)
    truth = [x0]
    for _ in range(T - 1):
        truth.append(f_true(truth[-1], None))
    inputs = torch.stack(truth, 1)  # x_{t-1} for step t
    s0 = torch.zeros(B, 3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)

    def f(s, u):
        return s + dt * (_lorenz_field(s) + gain * (u - s))

    def jacobian(s, u, diagonal):
        J = eye + dt * (_lorenz_jacobian(s) - gain * eye)
        return J.diagonal(dim1=-2, dim2=-1) if diagonal else J

    return f, s0, inputs, jacobian


def unstable_start(T=3500, B=1, dt=0.25, seed=0):
    """s_t = s_{t-1} + dt (2 + s_{t-1} − s_{t-1}³) + ξ_t: one attracting state near 1.52
    (∂f/∂s ≈ −0.5 there) but ∂f/∂s = 1 + dt at s = 0, so the undamped Newton step from the
    zero guess grows like 1.25^T and overflows float64 for T ≳ 3200."""
    gen = _gen(seed)
    inputs = 0.1 * torch.randn(B, T, 1, generator=gen, dtype=torch.float64)
    s0 = torch.full((B, 1), 1.5, dtype=torch.float64)

    def f(s, u):
        return s + dt * (2 + s - s ** 3) + u

    def jacobian(s, u, diagonal):
        d = 1 + dt * (1 - 3 * s * s)
        return d if diagonal else d.unsqueeze(-1)

    return f, s0, inputs, jacobian
