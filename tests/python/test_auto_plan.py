"""The layers' auto: torch's own fused RNN kernels where the parallel solve does not pay,
chosen by measuring (csrc/solver/auto_plan.h), and method="sequential" on them. Where the
fused loop runs, the layers *are* torch.nn: outputs, final states, gradients and dropout
masks bitwise equal to torch.nn's."""
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
