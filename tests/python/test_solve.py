"""pnewton.solve: every method against the sequential loop, exact gradients, diagnostics."""
import pytest
import torch

import pnewton
from pnewton.solve import _jacobian_rows, sequential


def tanh_rnn(D, gain, gen):
    W = torch.randn(D, D, dtype=torch.float64, generator=gen) * gain / D ** 0.5
    U = torch.randn(D, D, dtype=torch.float64, generator=gen)
    return (lambda s, u: torch.tanh(s @ W.T + u @ U.T)), W, U


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("method", ["deer", "quasi_deer", "jacobi"])
def test_methods_converge_to_the_sequential_trajectory(method, gen):
    f, _, _ = tanh_rnn(6, 0.5, gen)
    s0 = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    u = torch.randn(3, 300, 6, dtype=torch.float64, generator=gen)
    states, stats = pnewton.solve(f, s0, u, method=method, fallback=False, max_iter=300)
    assert bool(stats.converged.all()) and not stats.fallback
    torch.testing.assert_close(states, sequential(f, s0, u), rtol=1e-9, atol=1e-9)


def test_deer_needs_far_fewer_iterations_than_jacobi_on_a_contracting_system(gen):
    f, _, _ = tanh_rnn(6, 0.9, gen)
    s0 = torch.zeros(2, 6, dtype=torch.float64)
    u = torch.randn(2, 400, 6, dtype=torch.float64, generator=gen)
    _, deer = pnewton.solve(f, s0, u, method="deer", fallback=False, max_iter=400)
    _, jacobi = pnewton.solve(f, s0, u, method="jacobi", fallback=False, max_iter=400)
    assert int(deer.iterations.max()) <= 8 < int(jacobi.iterations.min())


def test_picard_converges_when_the_jacobian_is_near_identity(gen):
    # s_t = s_{t-1} + 0.01 tanh(u_t - s_{t-1}): Ã = I is a good approximation.
    f = lambda s, u: s + 0.01 * torch.tanh(u - s)  # noqa: E731
    s0 = torch.zeros(2, 3, dtype=torch.float64)
    u = torch.randn(2, 500, 3, dtype=torch.float64, generator=gen)
    # Residual tolerance tight: with |∂f/∂s| ≈ 0.99 a residual r moves states by ~100 r.
    states, stats = pnewton.solve(f, s0, u, method="picard", fallback=False, atol=1e-13, rtol=1e-13)
    assert bool(stats.converged.all()) and int(stats.iterations.max()) < 30  # T = 500
    torch.testing.assert_close(states, sequential(f, s0, u), rtol=1e-9, atol=1e-9)


def test_undamped_iteration_makes_the_prefix_exact(gen):
    # After i iterations the first i states are exact (DESIGN §1), even on a chaotic map.
    f, _, _ = tanh_rnn(4, 3.0, gen)
    s0 = torch.randn(1, 4, dtype=torch.float64, generator=gen)
    u = torch.randn(1, 40, 4, dtype=torch.float64, generator=gen)
    ref = sequential(f, s0, u)
    for i in (1, 5, 20):
        states, _ = pnewton.solve(f, s0, u, method="quasi_deer", max_iter=i, fallback=False)
        torch.testing.assert_close(states[:, :i], ref[:, :i], rtol=1e-12, atol=1e-12)


def test_not_converged_falls_back_to_sequential_and_says_so(gen):
    f, _, _ = tanh_rnn(4, 3.0, gen)  # chaotic: quasi-Newton cannot converge in 3 iterations
    s0 = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    u = torch.randn(2, 200, 4, dtype=torch.float64, generator=gen)
    states, stats = pnewton.solve(f, s0, u, method="quasi_deer", max_iter=3)
    assert stats.fallback and stats.method == "quasi_deer->sequential" and bool(stats.converged.all())
    torch.testing.assert_close(states, sequential(f, s0, u))
    _, raw = pnewton.solve(f, s0, u, method="quasi_deer", max_iter=3, fallback=False)
    assert not bool(raw.converged.any()) and bool((raw.residual > 1e-3).all())


def test_diag_structure_makes_quasi_deer_exact_newton(gen):
    a = torch.rand(5, dtype=torch.float64, generator=gen)
    f = lambda s, u: torch.tanh(a * s + u)  # noqa: E731  elementwise in s
    s0 = torch.zeros(2, 5, dtype=torch.float64)
    u = torch.randn(2, 1000, 5, dtype=torch.float64, generator=gen)
    states, stats = pnewton.solve(f, s0, u, method="quasi_deer", structure="diag", fallback=False)
    assert int(stats.iterations.max()) <= 8
    torch.testing.assert_close(states, sequential(f, s0, u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["deer", "quasi_deer"])
def test_gradients_are_exact_for_inputs_initial_state_and_closed_over_parameters(method, gen):
    W = (torch.randn(4, 4, dtype=torch.float64, generator=gen) * 0.4).requires_grad_()
    f = lambda s, u: torch.tanh(s @ W.T + u)  # noqa: E731
    s0 = torch.randn(2, 4, dtype=torch.float64, generator=gen).requires_grad_()
    u = torch.randn(2, 12, 4, dtype=torch.float64, generator=gen).requires_grad_()
    tight = dict(method=method, atol=1e-13, rtol=1e-13, fallback=False)
    assert torch.autograd.gradcheck(lambda W_, s0_, u_: pnewton.solve(
        lambda s, x: torch.tanh(s @ W_.T + x), s0_, u_, **tight)[0], (W, s0, u))
    g = torch.randn(2, 12, 4, dtype=torch.float64, generator=gen)
    ours = torch.autograd.grad((pnewton.solve(f, s0, u, **tight)[0] * g).sum(), (W, s0, u))
    ref = torch.autograd.grad((sequential(f, s0, u) * g).sum(), (W, s0, u))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_bad_options_raise_naming_the_argument():
    f = lambda s, u: s + u  # noqa: E731
    s0, u = torch.zeros(2, 3), torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        pnewton.solve(f, s0, u, method="newton")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
        pnewton.solve(f, s0, u, max_iter=-1)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        pnewton.solve(f, s0, u, atol=-1.0)
    with pytest.raises(ValueError, match="s0 must be"):
        pnewton.solve(f, s0[0], u)
    with pytest.raises(ValueError, match="inputs must be"):
        pnewton.solve(f, s0, u[:1])
    with pytest.raises(ValueError, match="damping must be in"):
        pnewton.solve(f, s0, u, damping=1.0)


def test_empty_sequence_returns_empty_states():
    states, stats = pnewton.solve(lambda s, u: s + u, torch.zeros(2, 3), torch.zeros(2, 0, 3))
    assert states.shape == (2, 0, 3) and bool(stats.converged.all())


@pytest.mark.parametrize("method", ["quasi_deer", "auto"])
def test_float32_accuracy_of_a_slow_gated_contraction_is_the_loops(method, gen):
    # f(s, u) = 0.99 s + 0.01 tanh(W s + u): a residual-based stop would end after a few
    # iterations 2,000x less accurate than the float32 loop (the recurrence's memory is
    # 100 steps); the solver stops on the Newton step, the error estimate.
    D, T = 8, 3000
    W = torch.randn(D, D, dtype=torch.float64, generator=gen) / D ** 0.5
    u = torch.randn(2, T, D, dtype=torch.float64, generator=gen)
    s0 = torch.zeros(2, D, dtype=torch.float64)
    truth = sequential(lambda s, x: 0.99 * s + 0.01 * torch.tanh(s @ W.T + x), s0, u)
    W32 = W.float()
    f32 = lambda s, x: 0.99 * s + 0.01 * torch.tanh(s @ W32.T + x)  # noqa: E731
    loop_error = float((sequential(f32, s0.float(), u.float()).double() - truth).abs().max())
    states, stats = pnewton.solve(f32, s0.float(), u.float(), method=method)
    assert bool(stats.converged.all()) and not stats.fallback
    assert float((states.double() - truth).abs().max()) <= 10 * loop_error


def test_solve_runs_the_solver_of_newton_rnn(gen):
    # The same cell through pnewton.solve (a Python step) and newton_rnn (the built-in GRU):
    # one solver, so the same iterations, path and states.
    D, T = 5, 200
    W = torch.randn(3 * D, D, dtype=torch.float64, generator=gen) / D ** 0.5
    b = torch.randn(3 * D, dtype=torch.float64, generator=gen)
    gi = torch.randn(2, T, 3 * D, dtype=torch.float64, generator=gen)
    s0 = torch.zeros(2, D, dtype=torch.float64)

    def gru(s, x):
        gh = s @ W.T + b
        r, z = torch.sigmoid(x[:, :D] + gh[:, :D]), torch.sigmoid(x[:, D:2 * D] + gh[:, D:2 * D])
        n = torch.tanh(x[:, 2 * D:] + r * gh[:, 2 * D:])
        return (1 - z) * n + z * s

    for method in ("quasi_deer", "deer", "auto"):
        # auto without jacobian= runs deer first (torch.func forms the whole Jacobian for the
        # diagonal too); given one, the layers' order (quasi_deer first).
        ours, stats = pnewton.solve(gru, s0, gi, method=method)
        ref, ref_stats = pnewton.newton_rnn("gru", gi, W, b, s0, method="deer" if method == "auto" else method)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(stats.iterations, ref_stats.iterations) and stats.method == ref_stats.method
    jacobian = lambda s, u, diagonal: _jacobian_rows(gru, s, u, diagonal)  # noqa: E731
    ours, stats = pnewton.solve(gru, s0, gi, jacobian=jacobian)
    ref, ref_stats = pnewton.newton_rnn("gru", gi, W, b, s0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.iterations, ref_stats.iterations) and stats.method == ref_stats.method
    assert stats.method.startswith("quasi_deer")
