"""pnewton.GRU / LSTM / RNN against torch.nn: outputs, gradients, state_dicts, options."""
import pytest
import torch

import pnewton

LAYERS = [
    (torch.nn.GRU, pnewton.GRU, {}),
    (torch.nn.LSTM, pnewton.LSTM, {}),
    (torch.nn.RNN, pnewton.RNN, {"nonlinearity": "tanh"}),
    (torch.nn.RNN, pnewton.RNN, {"nonlinearity": "relu"}),
]
# The solve stops at residual 1e-10 (float64 default), so outputs agree to about that;
# tighter tolerances tighten the agreement.
TOL = dict(rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("torch_cls,ours_cls,kw", LAYERS)
@pytest.mark.parametrize("config", [
    dict(num_layers=1, batch_first=False, bidirectional=False),
    dict(num_layers=2, batch_first=True, bidirectional=True),
])
@pytest.mark.parametrize("method", ["deer", "quasi_deer", "jacobi", "sequential"])
def test_outputs_and_gradients_match_torch_nn(torch_cls, ours_cls, kw, config, method):
    torch.manual_seed(0)
    ref = torch_cls(3, 5, **kw, **config).double()
    ours = ours_cls(3, 5, **kw, **config, method=method).double()
    ours.load_state_dict(ref.state_dict())
    T, B = 64, 2
    x = torch.randn((B, T, 3) if config["batch_first"] else (T, B, 3), dtype=torch.float64)
    out_ref, h_ref = ref(x)
    out, h = ours(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    for a, b in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple) else (h_ref,)):
        torch.testing.assert_close(a, b, **TOL)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-7, msg=name)
    assert bool(ours.last_stats.converged.all()) and not ours.last_stats.fallback


def test_lstm_block_deer_matches_torch_nn():
    torch.manual_seed(4)
    ref = torch.nn.LSTM(3, 6, batch_first=True).double()
    ours = pnewton.from_torch(ref, method="block_deer")
    x = torch.randn(2, 200, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    assert ours.last_stats.method == "block_deer"


@pytest.mark.parametrize("cls", [pnewton.DiagGRU, pnewton.DiagLSTM])
def test_diag_cells_newton_equals_their_sequential_loop(cls):
    torch.manual_seed(5)
    layer = cls(3, 7, num_layers=2, batch_first=True).double()
    loop = cls(3, 7, num_layers=2, batch_first=True, method="sequential").double()
    loop.load_state_dict(layer.state_dict())
    assert layer.weight_hh_l0.shape == ((3 if cls is pnewton.DiagGRU else 4) * 7,)
    x = torch.randn(2, 400, 3, dtype=torch.float64)
    out, _ = layer(x)
    torch.testing.assert_close(out, loop(x)[0], **TOL)
    # The method is exact Newton for these cells: quadratic convergence, few iterations.
    assert int(layer.last_stats.iterations.max()) <= 8
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), list(layer.parameters()))
    grads_loop = torch.autograd.grad((loop(x)[0] * g).sum(), list(loop.parameters()))
    for a, b in zip(grads, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_state_dict_round_trips_and_initial_state_and_unbatched_input():
    torch.manual_seed(1)
    ours = pnewton.LSTM(4, 6, num_layers=2).double()
    ref = torch.nn.LSTM(4, 6, num_layers=2).double()
    ref.load_state_dict(ours.state_dict())  # pnewton -> torch.nn
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(30, 4, dtype=torch.float64)  # unbatched [T, input]
    h0, c0 = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    out, (h, c) = ours(x, (h0, c0))
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(c, c_ref, **TOL)


def test_from_torch_float32_and_last_stats_fields():
    torch.manual_seed(2)
    ref = torch.nn.GRU(8, 16, batch_first=True)
    ours = pnewton.from_torch(ref)
    x = torch.randn(4, 500, 8)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-4, atol=1e-4)
    stats = ours.last_stats
    assert stats.iterations.shape == (4,) and stats.converged.dtype == torch.bool
    assert stats.method == "quasi_deer" and int(stats.iterations.max()) < 500


def test_unsupported_options_are_rejected_clearly():
    with pytest.raises(TypeError, match="unknown solver options"):
        pnewton.GRU(3, 4, metod="deer")
    with pytest.raises(ValueError, match="nonlinearity"):
        pnewton.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 7"):
        pnewton.GRU(3, 4)(torch.randn(5, 2, 7))
