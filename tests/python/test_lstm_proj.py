"""The projected LSTM (torch.nn.LSTM's proj_size; solver cell lstm_proj, state [h | c]):
every method against the sequential loop, exact Jacobians (deer converges quadratically),
gradcheck for every adjoint, opcheck, and pnewton.LSTM(proj_size=...) against torch.nn."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import pnewton

D, P = 5, 3  # hidden and projection sizes


def problem(B=3, T=200, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    gi = torch.randn(B, T, 4 * D, dtype=torch.float64, generator=gen)
    W = torch.randn(4 * D, P, dtype=torch.float64, generator=gen) * 0.5 / P ** 0.5
    b = torch.randn(4 * D, dtype=torch.float64, generator=gen) * 0.1
    s0 = torch.randn(B, P + D, dtype=torch.float64, generator=gen) * 0.1
    W_hr = torch.randn(P, D, dtype=torch.float64, generator=gen) * 0.5 / D ** 0.5
    return [t.requires_grad_(requires_grad) for t in (gi, W, b, s0, W_hr)]


def run(gi, W, b, s0, W_hr, method, **kw):
    return pnewton.newton_rnn("lstm_proj", gi, W, b, s0, method=method, W_hr=W_hr, **kw)


@pytest.mark.parametrize("method", ["deer", "quasi_deer", "jacobi", "auto"])
def test_every_method_converges_to_the_sequential_states(method):
    gi, W, b, s0, W_hr = problem()
    expected, _ = run(gi, W, b, s0, W_hr, "sequential")
    states, stats = run(gi, W, b, s0, W_hr, method, max_iter=200, fallback=False, atol=1e-12, rtol=1e-12)
    assert bool(stats.converged.all())
    torch.testing.assert_close(states, expected, rtol=1e-9, atol=1e-9)


def test_deer_converges_quadratically_so_the_jacobian_is_exact():
    gi, W, b, s0, W_hr = problem(T=1000)
    _, stats = run(gi, W, b, s0, W_hr, "deer", fallback=False)
    assert bool(stats.converged.all()) and int(stats.iterations.max()) <= 8


@pytest.mark.parametrize("adjoint", ["scan", "iterative", "sequential"])
def test_gradcheck_every_adjoint(adjoint):
    inputs = problem(B=2, T=7, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda gi, W, b, s0, W_hr: run(gi, W, b, s0, W_hr, "quasi_deer", atol=1e-14, rtol=1e-14,
                                       adjoint=adjoint)[0], inputs)


def test_opcheck_and_clear_errors():
    gi, W, b, s0, W_hr = problem(B=2, T=6, requires_grad=True)
    torch.library.opcheck(torch.ops.pnewton.newton_rnn.default, ("lstm_proj", gi, W, b, s0, "deer"),
                          {"W_hr": W_hr})
    states, *_ = torch.ops.pnewton.newton_rnn("lstm_proj", gi.detach(), W.detach(), b.detach(), s0.detach(),
                                              W_hr=W_hr.detach())
    torch.library.opcheck(torch.ops.pnewton.newton_rnn_backward.default,
                          (torch.randn_like(states), "lstm_proj", gi.detach(), W.detach(), b.detach(), s0.detach(),
                           states), {"W_hr": W_hr.detach()})
    with pytest.raises(RuntimeError, match="W_hr .* is required by cell 'lstm_proj'"):
        pnewton.newton_rnn("lstm_proj", gi, W, b, s0)
    with pytest.raises(RuntimeError, match=r"W_hr must be \[proj_size, hidden\] = \[3, 5\]"):
        run(gi, W, b, s0, W_hr.t(), "deer")
    with pytest.raises(RuntimeError, match="block_deer.* needs .* 2x2 blocks"):
        run(gi, W, b, s0, W_hr, "block_deer")


@pytest.mark.parametrize("method", ["auto", "quasi_deer", "deer"])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_torch_nn_and_loads_its_state_dict(method, packed):
    torch.manual_seed(1)
    ref = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2).double()
    ours = pnewton.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, method=method).double()
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict()) and "weight_hr_l1_reverse" in ours.state_dict()
    x = torch.randn(150, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = (torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64))
    args = (pack_padded_sequence(x, torch.tensor([150, 90, 1]), enforce_sorted=True) if packed else x, h0)
    out, (h, c) = ours(*args)
    out_ref, (h_ref, c_ref) = ref(*args)
    out, out_ref = (out.data, out_ref.data) if packed else (out, out_ref)
    for a, b_ in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum() + c.sum(), [x] + list(ours.parameters()), retain_graph=True)
    grads_ref = torch.autograd.grad((out_ref * g).sum() + c_ref.sum(), [x] + list(ref.parameters()))
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)
    ref.load_state_dict(ours.state_dict())  # and back
