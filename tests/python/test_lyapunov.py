"""pnewton.lyapunov: the sign and size of the largest Lyapunov exponent on known systems,
and its link to how many Newton iterations a solve needs."""
import math

import pytest
import torch

import pnewton


def linear_map(a):
    return lambda s, u: a * s + u  # noqa: E731


@pytest.mark.parametrize("a", [0.5, 0.9, 1.1])
def test_linear_scalar_map_has_exponent_log_a(a):
    s0 = torch.zeros(2, 1, dtype=torch.float64)
    u = torch.randn(2, 200, 1, dtype=torch.float64) * 1e-3
    lle = pnewton.lyapunov(linear_map(a), s0, u, states=pnewton.solve(linear_map(a), s0, u, method="sequential")[0])
    torch.testing.assert_close(lle, torch.full((2,), math.log(a), dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_diagonal_linear_map_reports_the_largest_exponent():
    a = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64)
    f = lambda s, u: a * s + u  # noqa: E731
    s0, u = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 1000, 3, dtype=torch.float64)
    lle = pnewton.lyapunov(f, s0, u, num_vectors=3)
    assert lle.item() == pytest.approx(math.log(0.8), abs=5e-3)  # O(1/T) start-up bias


def mean_field_rnn(g, D=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, dtype=torch.float64, generator=gen) * g / math.sqrt(D)
    W.fill_diagonal_(0)
    return lambda s, u: torch.tanh(s) @ W.T + u  # noqa: E731


def test_mean_field_tanh_rnn_sign_follows_the_gain_and_predicts_newton_cost():
    # s_t = W tanh(s_{t-1}) + u_t, W_ij ~ N(0, g²/D): contracting for small g, chaotic for
    # large g (the transition is near g ≈ 1.2 with small inputs).
    T, D = 400, 60
    t = torch.arange(T, dtype=torch.float64)
    u = (0.1 * torch.sin(2 * math.pi * t / 50)).view(1, T, 1).expand(1, T, D).contiguous()
    s0 = torch.zeros(1, D, dtype=torch.float64)
    results = {}
    for g in (0.5, 3.0):
        f = mean_field_rnn(g, D)
        lle = pnewton.lyapunov(f, s0, u).item()
        _, stats = pnewton.solve(f, s0, u, method="deer", max_iter=T, fallback=False)
        results[g] = (lle, int(stats.iterations.max()))
    assert results[0.5][0] < 0 < results[3.0][0], results
    assert results[0.5][1] < 10 < results[3.0][1], results  # chaos costs Newton many more iterations


def test_lorenz_is_chaotic_and_its_synchronising_observer_is_not():
    dt, T = 0.01, 2000

    def lorenz(s, u):
        x, y, z = s.unbind(-1)
        return s + dt * torch.stack([10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z], -1)

    s0 = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    no_input = torch.zeros(1, T, 0, dtype=torch.float64)
    trajectory = pnewton.solve(lorenz, s0, no_input, method="sequential")[0]
    lle = pnewton.lyapunov(lorenz, s0, no_input, states=trajectory).item()
    assert 0.5 * dt < lle < 1.5 * dt  # Lorenz's largest exponent is about 0.9 per unit time

    def observer(s, x_true):  # driven by the true x: the error contracts
        x, y, z = x_true.unbind(-1)[0], s[..., 1], s[..., 2]
        return torch.stack([x, y + dt * (x * (28 - z) - y), z + dt * (x * y - 8 / 3 * z)], -1)

    obs = pnewton.lyapunov(observer, torch.zeros(1, 3, dtype=torch.float64), trajectory[..., :1]).item()
    assert obs < 0
