"""torch.ops.pnewton.newton_rnn (the C++ solver for built-in cells): every method against
the sequential loop, exact Jacobians (deer converges quadratically), gradcheck for every
adjoint strategy, opcheck, fixed-iteration mode, damping and clipping, bad input."""
import pytest
import torch

import pnewton

CELLS = {  # cell: (gates, LSTM state, per-channel weights)
    "gru": (3, False, False), "lstm": (4, True, False), "rnn_tanh": (1, False, False),
    "rnn_relu": (1, False, False), "diag_gru": (3, False, True), "diag_lstm": (4, True, True),
}


def problem(cell, B=3, T=200, D=5, scale=0.4, seed=0, requires_grad=False):
    gates, lstm, diag = CELLS[cell]
    gen = torch.Generator().manual_seed(seed)
    G, S = gates * D, (2 if lstm else 1) * D
    W = torch.randn(G, dtype=torch.float64, generator=gen) * 0.8 if diag else \
        torch.randn(G, D, dtype=torch.float64, generator=gen) * scale / D ** 0.5
    b = torch.randn(G, dtype=torch.float64, generator=gen) * 0.1
    gi = torch.randn(B, T, G, dtype=torch.float64, generator=gen)
    s0 = torch.randn(B, S, dtype=torch.float64, generator=gen) * 0.1
    return [t.requires_grad_(requires_grad) for t in (gi, W, b, s0)]


def run(cell, gi, W, b, s0, method, **kw):
    return pnewton.newton_rnn(cell, gi, W, b, s0, method=method, **kw)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("method", ["deer", "quasi_deer", "block_deer", "jacobi"])
def test_every_method_converges_to_the_sequential_states(cell, method):
    if method == "block_deer" and not CELLS[cell][1]:
        pytest.skip("block_deer is for LSTM cells")
    gi, W, b, s0 = problem(cell)
    expected, _ = run(cell, gi, W, b, s0, "sequential")
    states, stats = run(cell, gi, W, b, s0, method, max_iter=200, fallback=False, atol=1e-12, rtol=1e-12)
    assert bool(stats.converged.all())
    torch.testing.assert_close(states, expected, rtol=1e-9, atol=1e-9)


def test_picard_converges_when_the_cell_is_near_identity():
    # An update gate pinned near 1 (z ≈ 0.98): h' ≈ h, so Ã = I is a good approximation.
    gi, W, b, s0 = problem("gru", T=500)
    gi[..., 5:10] += 4.0
    states, stats = run("gru", gi, W, b, s0, "picard", fallback=False, atol=1e-12, rtol=1e-12)
    assert bool(stats.converged.all()) and int(stats.iterations.max()) < 100
    torch.testing.assert_close(states, run("gru", gi, W, b, s0, "sequential")[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", list(CELLS))
def test_deer_converges_quadratically_so_the_jacobians_are_exact(cell):
    gi, W, b, s0 = problem(cell, T=1000)
    _, deer = run(cell, gi, W, b, s0, "deer", fallback=False)
    _, quasi = run(cell, gi, W, b, s0, "quasi_deer", fallback=False)
    assert int(deer.iterations.max()) <= 7
    if cell in ("diag_gru",):  # diagonal Jacobian: quasi-DEER is Newton
        assert torch.equal(deer.iterations, quasi.iterations)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("adjoint", ["scan", "iterative", "sequential"])
def test_gradcheck_every_adjoint(cell, adjoint):
    inputs = problem(cell, B=2, T=8, D=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda gi, W, b, s0: run(cell, gi, W, b, s0, "quasi_deer", atol=1e-14, rtol=1e-14, adjoint=adjoint)[0],
        inputs)


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh", "rnn_relu"])
def test_the_iterative_adjoint_equals_the_scan_adjoint_with_resets_and_lengths(cell):
    # The iterative adjoint linearises the cell once (A = diag(d) + Σ_k diag(c_k) W_k) and
    # sweeps with GEMMs; resets zero a segment head's Jacobian, padding holds states.
    gi, W, b, s0 = problem(cell, B=3, T=150, D=20, requires_grad=True)
    resets = torch.zeros(3, 150, dtype=torch.bool)
    resets[0, [1, 70]] = True
    resets[2, 149] = True
    lengths = torch.tensor([150, 90, 149])
    g = torch.randn(3, 150, 20, dtype=torch.float64)
    grads = {}
    for adjoint in ("scan", "iterative"):
        states, _ = run(cell, gi, W, b, s0, "quasi_deer", adjoint=adjoint, resets=resets, lengths=lengths)
        grads[adjoint] = torch.autograd.grad((states * g).sum(), (gi, W, b, s0))
    for o, r in zip(grads["iterative"], grads["scan"]):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)


def test_gradients_without_bias_and_with_a_long_sequence():
    gi, W, _, s0 = problem("gru", B=2, T=3000, requires_grad=True)
    g = torch.randn(2, 3000, 5, dtype=torch.float64)
    ours = torch.autograd.grad((run("gru", gi, W, None, s0, "quasi_deer")[0] * g).sum(), (gi, W, s0))
    ref = torch.autograd.grad((run("gru", gi, W, None, s0, "sequential")[0] * g).sum(), (gi, W, s0))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("cell", ["gru", "diag_lstm"])
def test_opcheck(cell):
    gi, W, b, s0 = problem(cell, B=2, T=6, D=3, requires_grad=True)
    torch.library.opcheck(torch.ops.pnewton.newton_rnn.default, (cell, gi, W, b, s0, "deer"))
    torch.library.opcheck(torch.ops.pnewton.newton_rnn.default, (cell, gi.detach().float(), W.detach().float(), None,
                                                                s0.detach().float(), "quasi_deer"))
    states, *_ = torch.ops.pnewton.newton_rnn(cell, gi.detach(), W.detach(), b.detach(), s0.detach())
    torch.library.opcheck(torch.ops.pnewton.newton_rnn_backward.default,
                          (torch.randn_like(states), cell, gi.detach(), W.detach(), b.detach(), s0.detach(), states))


def test_fixed_iterations_run_exactly_max_iter_and_report_convergence():
    gi, W, b, s0 = problem("gru", T=300)
    states, stats = run("gru", gi, W, b, s0, "quasi_deer", max_iter=3, fixed_iterations=True)
    assert not stats.fallback and not bool(stats.converged.any())  # 3 iterations are too few
    assert stats.iterations.tolist() == [3, 3, 3]
    full, stats = run("gru", gi, W, b, s0, "quasi_deer", max_iter=60, fixed_iterations=True)
    assert bool(stats.converged.all()) and int(stats.iterations.max()) < 60  # converged rows stop moving
    torch.testing.assert_close(full, run("gru", gi, W, b, s0, "sequential")[0], rtol=1e-9, atol=1e-9)


def test_undamped_iterations_make_the_prefix_exact_even_when_chaotic():
    gi, W, b, s0 = problem("rnn_tanh", B=1, T=50, scale=4.0)
    expected, _ = run("rnn_tanh", gi, W, b, s0, "sequential")
    for i in (1, 7, 30):
        states, _ = run("rnn_tanh", gi, W, b, s0, "quasi_deer", max_iter=i, fallback=False)
        torch.testing.assert_close(states[:, :i], expected[:, :i], rtol=1e-12, atol=1e-12)


def test_fallback_runs_and_is_reported_when_the_budget_is_too_small():
    gi, W, b, s0 = problem("rnn_tanh", B=2, T=300, scale=4.0)  # chaotic
    states, stats = run("rnn_tanh", gi, W, b, s0, "quasi_deer", max_iter=5)
    assert stats.fallback and stats.method == "quasi_deer->sequential" and bool(stats.converged.all())
    torch.testing.assert_close(states, run("rnn_tanh", gi, W, b, s0, "sequential")[0])


@pytest.mark.parametrize("damping,clip", [(0.3, 0.0), (0.0, 0.5)])
def test_damped_and_clipped_iterations_still_converge_to_the_solution(damping, clip):
    gi, W, b, s0 = problem("lstm")
    states, stats = run("lstm", gi, W, b, s0, "block_deer", damping=damping, clip=clip, fallback=False,
                        max_iter=200, atol=1e-12, rtol=1e-12)
    assert bool(stats.converged.all())
    torch.testing.assert_close(states, run("lstm", gi, W, b, s0, "sequential")[0], rtol=1e-9, atol=1e-9)


def test_warm_start_from_the_solution_needs_one_confirming_iteration():
    gi, W, b, s0 = problem("gru")
    solution, _ = run("gru", gi, W, b, s0, "sequential")
    # Convergence is judged by the error estimate of a step (the Newton step δ), so the
    # solution is confirmed by one iteration that hardly moves it.
    states, stats = run("gru", gi, W, b, s0, "quasi_deer", init="states", init_states=solution)
    assert stats.iterations.tolist() == [1, 1, 1] and bool(stats.converged.all())
    torch.testing.assert_close(states, solution, rtol=0, atol=1e-13)
    _, one_step = run("gru", gi, W, b, s0, "quasi_deer", init="one_step")
    assert bool(one_step.converged.all())


def test_low_precision_inputs_are_solved_in_float32():
    gi, W, b, s0 = (t.to(torch.bfloat16) for t in problem("gru"))
    states, stats = run("gru", gi, W, b, s0, "quasi_deer")
    assert states.dtype == torch.bfloat16 and bool(stats.converged.all())
    expected, _ = run("gru", gi.float(), W.float(), b.float(), s0.float(), "sequential")
    torch.testing.assert_close(states.float(), expected, rtol=2e-2, atol=2e-2)


def test_bad_input_names_the_argument():
    gi, W, b, s0 = problem("gru")
    cases = [
        (lambda: run("grux", gi, W, b, s0, "deer"), "cell must be one of"),
        (lambda: run("gru", gi, W, b, s0, "newton"), "method must be one of"),
        (lambda: run("gru", gi, W, b, s0, "block_deer"), "block_deer' needs an lstm"),
        (lambda: run("gru", gi[..., :-1], W, b, s0, "deer"), "gi must have 15 features"),
        (lambda: run("gru", gi, W[:, :-1], b, s0, "deer"), "W_hh of cell 'gru' must be"),
        (lambda: run("gru", gi, W, b[:-1], s0, "deer"), "b_hh must be"),
        (lambda: run("gru", gi, W, b, s0[:, :-1], "deer"), r"s0 must have shape \[B, S\]"),
        (lambda: run("gru", gi, W.float(), b, s0, "deer"), "W_hh must have the dtype of gi"),
        (lambda: run("gru", gi[0], W, b, s0, "deer"), "gi must be a 3-d tensor"),
        (lambda: torch.ops.pnewton.newton_rnn("gru", gi, W, b, s0, "deer", -5), "max_iter must be >= 0"),
        (lambda: torch.ops.pnewton.newton_rnn("gru", gi, W, b, s0, "deer", -1, -1e-3), "atol must be >= 0"),
        (lambda: run("gru", gi, W, b, s0, "deer", damping=1.0), r"damping must be in \[0, 1\)"),
        (lambda: run("gru", gi, W, b, s0, "deer", fixed_iterations=True), "fixed_iterations needs an explicit"),
        (lambda: run("gru", gi, W, b, s0, "deer", adjoint="magic"), "adjoint must be one of"),
        (lambda: run("gru", gi, W, b, s0, "deer", init="ones"), "init must be zeros, one_step or states"),
    ]
    # A bad option value is a ValueError, as torch.nn's constructors raise (csrc/solver/options.cpp).
    options = ("method must be", "max_iter must be", "atol must be", "damping must be", "fixed_iterations needs",
               "adjoint must be", "init must be")
    for call, message in cases:
        with pytest.raises(ValueError if message.startswith(options) else RuntimeError, match=message):
            call()
    # The Python API spells the defaults None: a negative limit is a ValueError there.
    for kwargs in (dict(max_iter=-5), dict(max_iter=-1), dict(atol=-1e-3), dict(rtol=float("nan"))):
        with pytest.raises(ValueError, match="must be"):
            run("gru", gi, W, b, s0, "deer", **kwargs)


