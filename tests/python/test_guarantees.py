"""The reliability guarantees (README "Guarantees"), one class of failure per test: mixed
devices and the meta kernels' checks, double backward, step functions of the wrong shape,
non-finite sequences on every path, the ≤ T iteration cap, empty sizes, unconverged
gradients and option validation. Each compares against an independent reference (the
sequential loop, torch.nn, gradgradcheck) or asserts the error's type and wording."""
import math
import warnings

import pytest
import torch
from torch.autograd import gradgradcheck

import pnewton

ops = torch.ops.pnewton
D64 = torch.float64


def gru_args(B=2, T=6, D=3, dtype=D64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 3 * D, generator=g, dtype=dtype), (0.4 * torch.randn(3 * D, D, generator=g)).to(dtype),
            torch.randn(3 * D, generator=g, dtype=dtype), torch.zeros(B, D, dtype=dtype))


# ---- one device per call; the meta kernels check what the real ones check -------------

def _meta(t):
    return t.to("meta")


def test_every_op_rejects_a_tensor_on_another_device_even_when_meta_wins_dispatch():
    gi, W, b, s0 = gru_args(dtype=torch.float32)
    states = pnewton.newton_rnn("gru", gi, W, b, s0)[0]
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    A, bb = torch.rand(2, 5, 1, 2, 2), torch.randn(2, 5, 1, 2)
    calls = {
        "b must be on the device of a": lambda: ops.scan_diag(_meta(a), x),
        "b must be on the device of A": lambda: ops.scan_block(_meta(A), bb),
        "x must be on the device of a": lambda: ops.scan_diag_backward(x, _meta(a), x, None, False),
        "W_hh must be on the device of gi": lambda: ops.newton_rnn("gru", gi, _meta(W), b, s0),
        "states must be on the device of gi": lambda: ops.newton_rnn_backward(states, "gru", gi, W, b, s0,
                                                                               _meta(states)),
        "lam must be on the device of r": lambda: ops.elk_step(a, x, _meta(torch.ones(2)), True),
        "s must be on the device of gi": lambda: ops.cell_step("gru", _meta(s0), gi[:, 0], W, b),
    }
    for message, call in calls.items():
        with pytest.raises(RuntimeError, match=message):
            call()


def test_meta_kernels_check_options_shapes_and_dtypes():
    gi, W, b, s0 = (_meta(t) for t in gru_args(dtype=torch.float32))
    with pytest.raises(ValueError, match="method must be one of"):
        ops.newton_rnn("gru", gi, W, b, s0, "bogus")
    with pytest.raises(RuntimeError, match="W_hh of cell 'gru' must be"):
        ops.newton_rnn("gru", gi, W[:, :2], b, s0)
    with pytest.raises(RuntimeError, match="gi must be float32"):
        ops.newton_rnn("gru", gi.long(), W.long(), b.long(), s0.long())
    with pytest.raises(ValueError, match="damping must be in"):
        ops.newton_rnn("gru", gi, W, b, s0, "deer", -1, -1.0, -1.0, float("nan"))
    out = ops.newton_rnn("gru", gi, W, b, s0)
    assert out[0].shape == (2, 6, 3) and out[0].device.type == "meta" and out[3].dtype == torch.bool
    with pytest.raises(RuntimeError, match="x0 must have shape"):
        ops.scan_diag(_meta(torch.rand(2, 5, 3)), _meta(torch.rand(2, 5, 3)), _meta(torch.rand(2, 4)))


# ---- double backward: differentiable backward ops, or a clear error ---------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_scans_are_twice_differentiable(reverse):
    g = torch.Generator().manual_seed(1)
    a = (0.9 * torch.rand(2, 5, 3, generator=g, dtype=D64)).requires_grad_()
    b, x0 = (torch.randn(*s, generator=g, dtype=D64).requires_grad_() for s in ((2, 5, 3), (2, 3)))
    assert gradgradcheck(lambda a, b, x0: pnewton.scan_diag(a, b, x0, reverse=reverse), (a, b, x0))
    A = (0.3 * torch.randn(2, 5, 2, 3, 3, generator=g, dtype=D64)).requires_grad_()
    bb, X0 = (torch.randn(*s, generator=g, dtype=D64).requires_grad_() for s in ((2, 5, 2, 3), (2, 2, 3)))
    for transpose in (False, True):
        assert gradgradcheck(lambda A, b, x0: pnewton.scan_block(A, b, x0, reverse=reverse, transpose=transpose),
                             (A, bb, X0))


@pytest.mark.parametrize("cell,gates,state,weight", [
    ("gru", 3, 1, "matrix"), ("lstm", 4, 2, "matrix"), ("rnn_tanh", 1, 1, "matrix"), ("diag_gru", 3, 1, "vector"),
    ("diag_lstm", 4, 2, "vector"), ("lstm_proj", 4, None, "matrix")])
def test_newton_rnn_is_twice_differentiable(cell, gates, state, weight):
    g = torch.Generator().manual_seed(2)
    D, P, B, T = 3, 2, 2, 5
    gi = torch.randn(B, T, gates * D, generator=g, dtype=D64).requires_grad_()
    W_shape = (gates * D,) if weight == "vector" else (gates * D, P if cell == "lstm_proj" else D)
    W = (0.4 * torch.randn(*W_shape, generator=g, dtype=D64)).requires_grad_()
    b = torch.randn(gates * D, generator=g, dtype=D64).requires_grad_()
    S = P + D if cell == "lstm_proj" else state * D
    s0 = torch.randn(B, S, generator=g, dtype=D64).requires_grad_()
    W_hr = (0.5 * torch.randn(P, D, generator=g, dtype=D64)).requires_grad_() if cell == "lstm_proj" else None
    lengths, resets = torch.tensor([5, 3]), torch.zeros(B, T, dtype=torch.bool)
    resets[0, 2] = True

    def f(gi, W, b, s0, *rest):
        return pnewton.newton_rnn(cell, gi, W, b, s0, W_hr=rest[0] if rest else None, lengths=lengths,
                                  resets=resets)[0]

    assert gradgradcheck(f, (gi, W, b, s0) + ((W_hr,) if W_hr is not None else ()))


def test_layer_gradient_penalty_matches_torch_nn():
    torch.manual_seed(3)
    ref = torch.nn.GRU(3, 4, num_layers=2, dtype=D64)
    ours = pnewton.from_torch(ref)
    x = torch.randn(7, 2, 3, dtype=D64, requires_grad=True)
    penalties = []
    for layer in (ours, ref):
        out, _ = layer(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        penalty = grad_x.square().sum()
        penalties.append(torch.autograd.grad(penalty, [x] + list(layer.parameters())))
    for mine, theirs in zip(*penalties):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-10)


def test_ops_that_cannot_be_differentiated_twice_say_so():
    W = (0.3 * torch.randn(3, 3, dtype=D64)).requires_grad_()
    states, _ = pnewton.solve(lambda s, u: torch.tanh(s @ W.T + u), torch.zeros(1, 3, dtype=D64),
                              torch.randn(1, 6, 3, dtype=D64))
    # The gradient itself is right; a graph of it would miss the Jacobians' dependence on
    # the solution, so asking for one (create_graph=True) raises instead of returning it.
    (grad,) = torch.autograd.grad(states.square().sum(), W, retain_graph=True)
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(states.square().sum(), W, create_graph=True)
    r = torch.randn(2, 5, 3, dtype=D64, requires_grad=True)
    delta = ops.elk_step(torch.rand(2, 5, 3, dtype=D64), r, torch.ones(2, dtype=D64), True)
    with pytest.raises(RuntimeError, match="elk_step is not differentiable"):
        delta.sum().backward()


# ---- pnewton.solve checks the step's output once, for every method -----------------------

@pytest.mark.parametrize("method", pnewton.solve.__globals__["METHODS"])
def test_solve_rejects_a_step_of_the_wrong_shape(method):
    def f(s, u):
        return torch.tanh(u[:, :1] + 0 * s[:, :1])  # [N, 1] for a state [N, 3]: would broadcast

    with pytest.raises(ValueError, match=r"must return the next state \[N, D\]"):
        pnewton.solve(f, torch.zeros(2, 3), torch.randn(2, 6, 3), method=method, structure="diag")


# ---- non-finite sequences: never converged, residual NaN, the loop's NaN pattern -------

PATHS = [dict(method=m, fallback=fb) for m in ("sequential", "deer", "quasi_deer", "picard", "jacobi", "auto")
         for fb in (True, False)] + [dict(method="quasi_deer", fixed_iterations=True, max_iter=6)]


@pytest.mark.parametrize("options", PATHS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("cell", ["gru", "diag_gru"])
def test_a_nan_input_gives_the_loops_nan_pattern_and_is_never_converged(cell, options):
    gi, W, b, s0 = gru_args(B=3, T=6, D=4)
    if cell == "diag_gru":
        W = W[:, 0].contiguous()
    gi[0, 2, 1] = math.nan  # one gate entry: the diagonal cell carries it in one channel only
    loop = pnewton.newton_rnn(cell, gi, W, b, s0, method="sequential")[0]
    states, stats = pnewton.newton_rnn(cell, gi, W, b, s0, **options)
    assert torch.equal(states.isnan(), loop.isnan())
    assert not stats.converged[0] and math.isnan(stats.residual[0])
    if not options.get("fixed_iterations"):
        assert stats.converged[1:].all()
    finite = ~loop.isnan()
    torch.testing.assert_close(states[finite][:6], loop[finite][:6])  # the exact prefix of row 0
    assert int(stats.iterations.max()) <= 6


def test_layers_keep_torch_nns_nan_pattern():
    torch.manual_seed(4)
    ref = torch.nn.LSTM(3, 4, dtype=D64)
    x = torch.randn(9, 3, 3, dtype=D64)
    x[3, 0, 1] = math.nan
    expected, _ = ref(x)
    for fallback in (True, False):
        ours = pnewton.from_torch(ref, fallback=fallback)
        out, _ = ours(x)
        assert torch.equal(out.isnan(), expected.isnan())
        assert not ours.last_stats.converged[0] and ours.last_stats.converged[1:].all()


def test_undamped_methods_stop_at_T_iterations_and_stuck_sequences_stop_early():
    gi, W, b, s0 = gru_args(B=2, T=8, dtype=torch.float32)
    gi[0, 5, 0] = math.nan
    for method in ("deer", "quasi_deer", "picard", "jacobi"):
        _, stats = pnewton.newton_rnn("gru", gi, W, b, s0, method=method, max_iter=2 ** 40, fallback=False)
        assert int(stats.iterations.max()) <= 8, method
    for method in ("elk", "elk_filter", "quasi_elk"):  # no exact prefix: the non-finite merit stops it
        _, stats = pnewton.newton_rnn("gru", gi, W, b, s0, method=method, max_iter=2 ** 40, fallback=False)
        assert int(stats.iterations[0]) <= 20 and not stats.converged[0], method
    # pnewton.solve: the same cap, the same stop, the loop's NaN pattern for either structure.
    W = 0.5 * torch.randn(3, 3, dtype=D64)
    steps = {"diag": lambda s, u: torch.tanh(s + u), "dense": lambda s, u: torch.tanh(s @ W.T + u)}
    u = torch.randn(2, 8, 3, dtype=D64)
    u[0, 5, 0] = math.nan
    for structure, f in steps.items():
        loop = pnewton.solve(f, torch.zeros(2, 3, dtype=D64), u, method="sequential")[0]
        for method in ("deer", "quasi_deer", "jacobi"):
            states, stats = pnewton.solve(f, torch.zeros(2, 3, dtype=D64), u, method=method, max_iter=10 ** 9,
                                          fallback=False, structure=structure)
            assert int(stats.iterations.max()) <= 8 and not stats.converged[0] and stats.converged[1], method
            assert torch.equal(states.isnan(), loop.isnan()), (structure, method)
            assert math.isnan(stats.residual[0])


def test_solve_flags_nan_rows_on_the_sequential_path_and_after_the_fallback():
    u = torch.randn(2, 5, 3, dtype=D64)
    u[1, 2, 0] = math.nan
    for method in ("sequential", "deer", "auto"):
        _, stats = pnewton.solve(lambda s, u: torch.tanh(s + u), torch.zeros(2, 3, dtype=D64), u, method=method)
        assert stats.converged.tolist() == [True, False], method
        assert stats.residual[0] < 1e-10 and math.isnan(stats.residual[1]), method


# ---- empty sizes behave as torch.nn does ------------------------------------------------

def test_empty_batches_and_zero_sizes_give_empty_outputs():
    gi, W, b, s0 = gru_args(B=0)
    states, stats = pnewton.newton_rnn("gru", gi, W, b, s0)
    assert states.shape == (0, 6, 3) and stats.converged.shape == (0,)
    out, h = pnewton.GRU(4, 3, num_layers=2)(torch.randn(5, 0, 4))
    ref_out, ref_h = torch.nn.GRU(4, 3, num_layers=2)(torch.randn(5, 0, 4))
    assert out.shape == ref_out.shape and h.shape == ref_h.shape
    states, stats = pnewton.solve(lambda s, u: torch.tanh(s + u), torch.zeros(0, 3), torch.randn(0, 5, 3))
    assert states.shape == (0, 5, 3)
    states, stats = pnewton.newton_rnn("gru", torch.randn(2, 5, 0), torch.randn(0, 0), None, torch.zeros(2, 0))
    assert states.shape == (2, 5, 0) and stats.converged.all()


# ---- gradients of unconverged sequences are flagged -------------------------------------

def test_gradients_of_unconverged_sequences_warn():
    gi, W, b, s0 = gru_args(T=40)
    gi.requires_grad_()
    states, stats = pnewton.newton_rnn("gru", gi, W, b, s0, method="jacobi", max_iter=2, fallback=False)
    assert not stats.converged.any()
    prior = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # the warning is once per process otherwise
    try:
        with pytest.warns(UserWarning, match="did not converge"):
            states.sum().backward()
    finally:
        torch.set_warn_always(prior)
    states, stats = pnewton.newton_rnn("gru", gi, W, b, s0, method="deer", fallback=False)
    assert stats.converged.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states.sum().backward()


# ---- options: validated where they enter, errors name them ------------------------------

def test_options_are_validated_and_errors_name_the_argument():
    gi, W, b, s0 = gru_args(dtype=torch.float32)
    f = lambda s, u: torch.tanh(s + u)  # noqa: E731
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
        pnewton.newton_rnn("gru", gi, W, b, s0, max_iter=-1)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
        pnewton.GRU(3, 3, max_iter=-1)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        pnewton.GRU(3, 3, atol=float("nan"))
    for kwargs, name in ((dict(atol=float("nan")), "atol"), (dict(rtol=float("nan")), "rtol"),
                         (dict(max_iter=float("nan")), "max_iter"), (dict(max_iter=2.5), "max_iter"),
                         (dict(init="bogus"), "init")):
        with pytest.raises(ValueError, match=name):
            pnewton.solve(f, torch.zeros(2, 3), x, **kwargs)
    with pytest.raises(ValueError, match="damping"):
        pnewton.newton_rnn("gru", gi, W, b, s0, method="elk", damping=1e300)
    with pytest.raises(RuntimeError, match="pnewton.cell_step: s must have the dtype of gi"):
        ops.cell_step("gru", s0.double(), gi[:, 0], W, b)
    states = pnewton.newton_rnn("gru", gi, W, b, s0)[0]
    for dtype in (torch.complex64, torch.long):
        with pytest.raises(RuntimeError, match="grad_states must be float32"):
            ops.newton_rnn_backward(torch.ones_like(states, dtype=dtype), "gru", gi, W, b, s0, states)
    with pytest.raises(RuntimeError, match="init_states must be float32"):
        pnewton.newton_rnn("gru", gi, W, b, s0, init="states", init_states=torch.zeros(2, 6, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="init_states is only for init='states'"):
        pnewton.newton_rnn("gru", gi, W, b, s0, init_states=torch.zeros(2, 6, 3))
    with pytest.raises(RuntimeError, match="dropout must be a probability"):
        ops.rnn_stack("gru", torch.randn(5, 2, 3), torch.zeros(2, 2, 3), [W, W, b, b] * 2, True, 2, float("nan"),
                      True, False, False)
    # torch.nn's own check and wording (which changed between torch versions).
    x = torch.randn(5, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as theirs:
        torch.nn.GRU(4, 3)(x)
    with pytest.raises(ValueError) as ours:
        pnewton.GRU(4, 3)(x)
    assert str(ours.value) == str(theirs.value)
