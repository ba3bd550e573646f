"""The layers' auto: torch's own fused RNN kernels where the parallel solve does not pay,
chosen by measuring (csrc/solver/auto_plan.h), and method="sequential" on them. Where the
fused loop runs, the layers *are* torch.nn: outputs, final states, gradients and dropout
masks bitwise equal to torch.nn's."""
import math

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import pnewton


@pytest.fixture
def measured(monkeypatch):
    monkeypatch.setenv("PNEWTON_AUTO", "measure")


CONFIGS = [
    (torch.nn.GRU, dict(num_layers=2, bidirectional=True)),
    (torch.nn.LSTM, dict(num_layers=2, batch_first=True)),
    (torch.nn.LSTM, dict(proj_size=3, bidirectional=True)),
    (torch.nn.RNN, dict(nonlinearity="relu", num_layers=2)),
]


def _pair(kind, options, seed=0):
    torch.manual_seed(seed)
    ref = kind(4, 5, **options)
    return ref, pnewton.from_torch(ref)


def _equal(a, b):
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("kind,options", CONFIGS, ids=lambda c: getattr(c, "__name__", str(c)))
def test_short_sequences_run_torch_nns_kernels_bitwise(measured, kind, options):
    ref, ours = _pair(kind, options)
    x = torch.randn(3, 12, 4) if options.get("batch_first") else torch.randn(12, 3, 4)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, h_ref = ref(x_ref)
    out, h = ours(x_ours)
    assert ours.last_stats.method == "fused_loop" and not ours.last_stats.fallback
    assert ours.last_stats.converged.all() and (ours.last_stats.iterations == 12).all()
    assert torch.equal(out, out_ref) and _equal(h, h_ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    assert torch.equal(x_ours.grad, x_ref.grad)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name


def test_packed_sequences_and_dropout_masks_are_torch_nns(measured):
    ref, ours = _pair(torch.nn.LSTM, dict(num_layers=3, dropout=0.4))
    lengths = torch.tensor([9, 4, 7, 1])
    x = torch.randn(9, 4, 4)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    for seed in (0, 1):
        torch.manual_seed(seed)
        out_ref, (h_ref, c_ref) = ref(packed)
        torch.manual_seed(seed)
        out, (h, c) = ours(packed)
        assert ours.last_stats.method == "fused_loop"
        assert torch.equal(out.data, out_ref.data) and torch.equal(h, h_ref) and torch.equal(c, c_ref)
    padded, _ = pad_packed_sequence(out)
    assert (padded[lengths[3]:, 3] == 0).all()


def test_method_sequential_is_the_fused_loop_whatever_auto_does():
    # The suite runs with PNEWTON_AUTO=parallel (conftest): method="sequential" is not auto.
    torch.manual_seed(1)
    ref = torch.nn.GRU(4, 5, num_layers=2)
    ours = pnewton.from_torch(ref, method="sequential")
    x = torch.randn(300, 2, 4)
    out, h = ours(x)
    out_ref, h_ref = ref(x)
    assert ours.last_stats.method == "fused_loop" and not ours.last_stats.fallback
    assert torch.equal(out, out_ref) and torch.equal(h, h_ref)


def test_long_sequences_are_measured_once_per_shape_class_and_exact(measured):
    torch.manual_seed(2)
    ref = torch.nn.GRU(4, 6, dtype=torch.float64)
    ours = pnewton.from_torch(ref)
    x = torch.randn(300, 2, 4, dtype=torch.float64)
    out, _ = ours(x)  # the first call of its class: both paths timed, the faster returned
    first = ours.last_stats.method
    assert first in ("fused_loop", "quasi_deer", "quasi_deer->deer")
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-10, atol=1e-11)
    for T in (300, 400):  # the same class (T in (256, 512]): the remembered choice
        ours(torch.randn(T, 2, 4, dtype=torch.float64))
        assert (ours.last_stats.method == "fused_loop") == (first == "fused_loop")


def test_non_finite_input_on_the_fused_loop_is_not_converged(measured):
    ref, ours = _pair(torch.nn.GRU, {})
    x = torch.randn(10, 3, 4)
    x[4, 1, 0] = math.nan
    out, _ = ours(x)
    assert torch.equal(out.isnan(), ref(x)[0].isnan())
    assert ours.last_stats.converged.tolist() == [True, False, True]
    assert math.isnan(ours.last_stats.residual[1]) and ours.last_stats.residual[0] == 0


def test_compiled_layers_trace_the_solver(measured):
    # A trace keeps the solver's ops (torch's fused CPU LSTM has no working fake kernel).
    ref, ours = _pair(torch.nn.LSTM, dict(num_layers=2))
    x = torch.randn(16, 3, 4)
    compiled = torch.compile(ours, fullgraph=True)
    out, (h, c) = compiled(x)
    out_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(c, c_ref)


@pytest.mark.parametrize("kind,options", CONFIGS)
def test_short_calls_run_torch_nn_forward_with_the_loops_diagnostics(kind, options, measured, monkeypatch):
    # Below 256 steps the layer calls torch.nn's own forward (no rnn_stack wrapper); its
    # outputs, states and diagnostics are those of rnn_stack's fused loop, for padded,
    # packed (unsorted) and unbatched input, with a non-finite sequence.
    ref, ours = _pair(kind, options)
    x = torch.randn(4, 30, 4) if ours.batch_first else torch.randn(30, 4, 4)
    x[(2, 3, 1) if ours.batch_first else (3, 2, 1)] = float("nan")
    packed = pack_padded_sequence(x, torch.tensor([30, 12, 30, 5]), batch_first=ours.batch_first,
                                  enforce_sorted=False)
    for inp in (x, packed, x[0] if ours.batch_first else x[:, 0]):
        results = []
        for stack in (False, True):
            if stack:  # the rnn_stack route the short path replaces
                monkeypatch.setattr(ours, "_torch_loop_steps", lambda input: None)
            out, final = ours(inp)
            stats = [(s.iterations.tolist(), s.converged.tolist(), s.path.tolist(), s.residual.isnan().tolist())
                     for s in ours.last_layer_stats]
            results.append((out, final, stats, ours.last_stats.method))
            monkeypatch.undo()
            monkeypatch.setenv("PNEWTON_AUTO", "measure")
        (out, final, stats, method), (out_s, final_s, stats_s, method_s) = results
        expected, expected_final = ref(inp)
        for a, b in ((out, out_s), (out, expected)):
            a, b = (a.data, b.data) if isinstance(a, PackedSequence) else (a, b)
            assert torch.equal(a.nan_to_num(9), b.nan_to_num(9))
        for a, b in zip(torch.utils._pytree.tree_leaves(final), torch.utils._pytree.tree_leaves(final_s)):
            assert torch.equal(a.nan_to_num(9), b.nan_to_num(9))
        assert stats == stats_s and method == method_s == "fused_loop"


def test_a_shape_whose_plan_is_the_loop_then_runs_torch_nn_forward(monkeypatch):
    # From 256 steps the first call of a shape goes through rnn_stack; once its plan is the
    # loop, the layer remembers it and later calls of the shape take torch.nn's forward.
    monkeypatch.setenv("PNEWTON_AUTO", "fused_loop")
    ref, ours = _pair(torch.nn.LSTM, dict(num_layers=2))
    x = torch.randn(300, 3, 4)
    first, (h1, c1) = ours(x)
    stats = ours.last_stats
    assert list(ours._loop_plans.values()) == [True]
    assert ours._torch_loop_steps(x) == 300
    second, (h2, c2) = ours(x)
    expected, (h_ref, c_ref) = ref(x)
    for a, b, c in ((first, second, expected), (h1, h2, h_ref), (c1, c2, c_ref)):
        assert torch.equal(a, b) and torch.equal(b, c)
    for name in ("iterations", "residual", "converged", "path"):
        assert torch.equal(getattr(ours.last_stats, name), getattr(stats, name))
    # A shape of its class (T and B in the same powers of two) takes the plan too; one of
    # another class, or another grad mode, goes through rnn_stack again.
    assert ours._torch_loop_steps(torch.randn(301, 4, 4)) == 301
    assert ours._torch_loop_steps(torch.randn(600, 3, 4)) is None
    assert ours._torch_loop_steps(torch.randn(300, 5, 4)) is None
    with torch.no_grad():
        assert ours._torch_loop_steps(x) is None


@pytest.mark.parametrize("cls", [pnewton.DiagGRU, pnewton.DiagLSTM])
def test_diag_cells_weigh_their_own_one_pass_loop_on_the_cpu(cls, measured, monkeypatch):
    # No torch kernels for these cells: auto's loop is the solver's, one fused pass per
    # layer (Cell::loop) — below 256 steps without measuring, from 256 steps measured — and
    # it is method="sequential"'s result exactly, packed sequences included.
    torch.manual_seed(4)
    options = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    layer, looped = cls(4, 6, **options), cls(4, 6, method="sequential", **options)
    looped.load_state_dict(layer.state_dict())
    for T in (40, 300):
        x = torch.randn(3, T, 4, dtype=torch.float64)
        out, _ = layer(x)
        expected, _ = looped(x)
        if T < 256:
            assert layer.last_stats.method == "fused_loop" and not layer.last_stats.fallback
        assert layer.last_stats.method in ("fused_loop", "deer")
        if layer.last_stats.method == "fused_loop":
            assert torch.equal(out, expected)
        else:
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-11)
    monkeypatch.setenv("PNEWTON_AUTO", "fused_loop")
    x = torch.randn(3, 300, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([300, 120, 7]), batch_first=True, enforce_sorted=False)
    for inp in (x, packed):
        out, _ = layer(inp)
        assert layer.last_stats.method == "fused_loop"
        expected, _ = looped(inp)
        assert torch.equal(out.data if isinstance(out, PackedSequence) else out,
                           expected.data if isinstance(expected, PackedSequence) else expected)
    monkeypatch.setenv("PNEWTON_AUTO", "parallel")  # the solve: the same states to tolerance
    out, _ = layer(x)
    assert layer.last_stats.method == "deer"
    torch.testing.assert_close(out, looped(x)[0], rtol=1e-10, atol=1e-11)
