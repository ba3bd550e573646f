"""Multi-head (block-diagonal) cells: pnewton.HeadGRU / HeadLSTM (solver cells head_gru,
head_lstm) against torch.nn.GRU / LSTM with the dense block-diagonal W_hh built here, for
every method, direction and packing; heads = hidden_size against DiagGRU / DiagLSTM and
heads = 1 against GRU / LSTM; exact Newton's few iterations, gradcheck, opcheck, errors,
state_dict, pickling and the fused pass against the ATen form."""
import io
import pickle

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import pnewton

CASES = [(pnewton.HeadGRU, torch.nn.GRU, 3), (pnewton.HeadLSTM, torch.nn.LSTM, 4)]


def dense(w):
    """[H, G·k, k] head blocks -> torch.nn's [G·H·k, H·k]: head h's row g·k + j of gate g at
    row g·hidden + h·k + j, columns h·k .. h·k + k − 1 (written independently of the layer's
    dense_weight_hh, which the tests check against it)."""
    H, Gk, k = w.shape
    G = Gk // k
    out = w.new_zeros(G * H * k, H * k)
    for h in range(H):
        for g in range(G):
            out[g * H * k + h * k: g * H * k + (h + 1) * k, h * k:(h + 1) * k] = w[h, g * k:(g + 1) * k]
    return out


def torch_nn_twin(ours, torch_cls):
    ref = torch_cls(ours.input_size, ours.hidden_size, num_layers=ours.num_layers, bias=ours.bias,
                    batch_first=ours.batch_first, bidirectional=ours.bidirectional, dtype=torch.float64)
    ref.load_state_dict({name: dense(p.detach()) if name.startswith("weight_hh") else p.detach()
                         for name, p in ours.state_dict().items()})
    return ref


def head_grads(ours, ref):
    """Our gradients and torch.nn's, weight_hh's read at the head blocks of the dense one."""
    pairs = []
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if name.startswith("weight_hh"):
            H, Gk, k = p.shape
            G = Gk // k
            blocks = q.grad.view(G, H, k, H, k).diagonal(0, 1, 3).permute(3, 0, 1, 2).reshape(H, Gk, k)
            pairs.append((name, p.grad, blocks))
        else:
            pairs.append((name, p.grad, q.grad))
    return pairs


@pytest.mark.parametrize("cls,torch_cls,gates", CASES)
@pytest.mark.parametrize("method", ["auto", "deer", "quasi_deer", "elk", "quasi_elk_filter", "picard", "sequential"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_equals_torch_nn_with_the_dense_block_diagonal_weight(cls, torch_cls, gates, method, bidirectional, packed):
    torch.manual_seed(0)
    ours = cls(3, 8, heads=4, num_layers=2, bidirectional=bidirectional, method=method, dtype=torch.float64)
    assert ours.weight_hh_l0.shape == (4, gates * 2, 2)
    ref = torch_nn_twin(ours, torch_cls)
    x = torch.randn(40, 3, 3, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    lengths = torch.tensor([40, 25, 3])
    wrap = (lambda t: pack_padded_sequence(t, lengths)) if packed else (lambda t: t)
    out, hidden = ours(wrap(x_ours))
    out_ref, hidden_ref = ref(wrap(x_ref))
    out, out_ref = (out.data, out_ref.data) if packed else (out, out_ref)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                    hidden_ref if isinstance(hidden_ref, tuple) else (hidden_ref,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    (out.square().sum() + out.sum()).backward()
    (out_ref.square().sum() + out_ref.sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-8)
    for name, g, g_ref in head_grads(ours, ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-8, msg=name)


@pytest.mark.parametrize("cls,torch_cls,gates", CASES)
def test_dense_weight_hh_is_the_block_diagonal_twin(cls, torch_cls, gates):
    ours = cls(2, 6, heads=3, bidirectional=True, dtype=torch.float64)
    for reverse in (False, True):
        w = ours.weight_hh_l0_reverse if reverse else ours.weight_hh_l0
        assert torch.equal(ours.dense_weight_hh(0, reverse), dense(w.detach()))


@pytest.mark.parametrize("cls,diag_cls", [(pnewton.HeadGRU, pnewton.DiagGRU), (pnewton.HeadLSTM, pnewton.DiagLSTM)])
def test_one_unit_heads_are_the_diagonal_cells(cls, diag_cls):
    torch.manual_seed(1)
    ours, diag = cls(3, 5, heads=5, dtype=torch.float64), diag_cls(3, 5, dtype=torch.float64)
    state = dict(diag.state_dict())
    state["weight_hh_l0"] = diag.weight_hh_l0.detach().view(-1, 5).t().reshape(5, -1, 1)  # [G·D] -> [D, G, 1]
    ours.load_state_dict(state)
    x = torch.randn(4, 60, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], diag(x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,dense_cls", [(pnewton.HeadGRU, pnewton.GRU), (pnewton.HeadLSTM, pnewton.LSTM)])
def test_one_head_is_the_dense_cell(cls, dense_cls):
    torch.manual_seed(2)
    ours, full = cls(3, 4, heads=1, dtype=torch.float64), dense_cls(3, 4, dtype=torch.float64)
    state = dict(full.state_dict())
    state["weight_hh_l0"] = full.weight_hh_l0.detach().unsqueeze(0)
    ours.load_state_dict(state)
    x = torch.randn(2, 80, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], full(x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [pnewton.HeadGRU, pnewton.HeadLSTM])
def test_exact_newton_takes_a_few_iterations_where_quasi_newton_takes_many(cls):
    torch.manual_seed(3)
    layer = cls(8, 32, heads=8, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_hh_l0.normal_(0, 0.5)  # coupled within heads: the diagonal approximation is poor
    x = torch.randn(2, 2000, 8, dtype=torch.float64)
    layer.solver_options = {"method": "sequential"}
    expected = layer(x)[0]
    iterations = {}
    for method in ("deer", "quasi_deer"):
        layer.solver_options = {"method": method, "fallback": False, "max_iter": 2000}
        out = layer(x)[0]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        iterations[method] = int(layer.last_stats.iterations.max())
    assert iterations["deer"] <= 10 and iterations["deer"] * 3 <= iterations["quasi_deer"], iterations


def cell_problem(cell, B=2, T=6, H=2, k=2, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    G = 3 if cell == "head_gru" else 4
    S = H * k * (2 if cell == "head_lstm" else 1)
    gi = torch.randn(B, T, G * H * k, dtype=torch.float64, generator=gen)
    W = torch.randn(H, G * k, k, dtype=torch.float64, generator=gen) * 0.6
    b = torch.randn(G * H * k, dtype=torch.float64, generator=gen) * 0.1
    s0 = torch.randn(B, S, dtype=torch.float64, generator=gen) * 0.3
    return [t.requires_grad_(requires_grad) for t in (gi, W, b, s0)]


@pytest.mark.parametrize("cell", ["head_gru", "head_lstm"])
@pytest.mark.parametrize("adjoint", ["scan", "iterative", "sequential"])
def test_gradcheck_every_adjoint(cell, adjoint):
    inputs = cell_problem(cell, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda gi, W, b, s0: pnewton.newton_rnn(cell, gi, W, b, s0, method="deer", atol=1e-14, rtol=1e-14,
                                                adjoint=adjoint)[0], inputs)


@pytest.mark.parametrize("cell", ["head_gru", "head_lstm"])
def test_opcheck(cell):
    gi, W, b, s0 = cell_problem(cell, requires_grad=True)
    torch.library.opcheck(torch.ops.pnewton.newton_rnn.default, (cell, gi, W, b, s0, "deer"))
    states, *_ = torch.ops.pnewton.newton_rnn(cell, gi.detach(), W.detach(), b.detach(), s0.detach())
    torch.library.opcheck(torch.ops.pnewton.newton_rnn_backward.default,
                          (torch.randn_like(states), cell, gi.detach(), W.detach(), b.detach(), s0.detach(), states))


@pytest.mark.parametrize("cell", ["head_gru", "head_lstm"])
@pytest.mark.parametrize("method", ["quasi_deer", "deer", "picard", "block_deer"])
@pytest.mark.parametrize("heads,k", [(4, 3), (5, 1), (1, 4), (2, 9)])
def test_fused_pass_equals_the_aten_form(cell, method, heads, k, monkeypatch):
    if method == "block_deer" and cell == "head_gru":
        pytest.skip("2x2 blocks are an LSTM's")
    gi, W, b, s0 = cell_problem(cell, B=3, T=300, H=heads, k=k)
    fused = pnewton.newton_rnn(cell, gi, W, b, s0, method=method, fallback=False, max_iter=300)
    monkeypatch.setenv("PNEWTON_FUSED_CELLS", "0")
    aten = pnewton.newton_rnn(cell, gi, W, b, s0, method=method, fallback=False, max_iter=300)
    assert bool(fused[1].converged.all())
    # (Picard's path first diverges: rounding moves where it stops, within its tolerance.)
    torch.testing.assert_close(fused[0], aten[0], rtol=0, atol=1e-9 if method == "picard" else 1e-12)
    if method != "picard":
        assert torch.equal(fused[1].iterations, aten[1].iterations)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be a multiple of heads \(4\)"):
        pnewton.HeadGRU(3, 10, heads=4)
    with pytest.raises(ValueError, match="heads should be a positive integer"):
        pnewton.HeadLSTM(3, 10, heads=0)
    with pytest.raises(ValueError, match="proj_size is not supported by HeadLSTM"):
        pnewton.HeadLSTM(3, 8, heads=2, proj_size=2)
    gi, W, b, s0 = cell_problem("head_gru")
    with pytest.raises(RuntimeError, match=r"W_hh of cell 'head_gru' must be \[heads, 3 \* head_size, head_size\]"):
        pnewton.newton_rnn("head_gru", gi, W.transpose(1, 2), b, s0)
    with pytest.raises(RuntimeError, match="block_deer.* needs"):
        pnewton.newton_rnn("head_gru", gi, W, b, s0, method="block_deer")


@pytest.mark.parametrize("cls", [pnewton.HeadGRU, pnewton.HeadLSTM])
def test_state_dict_repr_pickle_and_unbatched_input(cls):
    layer = cls(3, 8, heads=2, num_layers=2, batch_first=True, dtype=torch.float64)
    assert "heads=2" in repr(layer) and repr(layer).startswith(f"{cls.__name__}(3, 8, heads=2")
    again = pickle.loads(pickle.dumps(layer))
    assert again.heads == 2 and again.head_size == 4
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = cls(3, 8, heads=2, num_layers=2, batch_first=True, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(30, 3, dtype=torch.float64)
    out, _ = fresh(x)
    torch.testing.assert_close(out, layer(x.unsqueeze(0))[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(again(x)[0], out, rtol=0, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,torch_cls,gates", CASES)
def test_cuda_equals_torch_nn(cls, torch_cls, gates):
    torch.manual_seed(4)
    ours = cls(3, 16, heads=4, bidirectional=True, dtype=torch.float64)
    ref = torch_nn_twin(ours, torch_cls)
    ours, ref = ours.cuda(), ref.cuda()
    x = torch.randn(500, 4, 3, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,k", [(pnewton.HeadGRU, 4), (pnewton.HeadGRU, 16), (pnewton.HeadLSTM, 8)])
@pytest.mark.parametrize("masks", [False, True])
def test_cuda_fused_blocks_and_vjp_match_the_aten_form(cls, k, masks, monkeypatch):
    """The CUDA cell kernel's head blocks (FusedPart::blocks), the chunked block scan of
    k + 1 column threads (blocks of 9..16: HeadGRU k = 16, HeadLSTM's 2k = 16) and the fused
    VJP, against the ATen form on the GPU and torch.nn's dense twin, gradients included."""
    torch.manual_seed(5)
    ours = cls(3, 32, heads=32 // k, method="deer", batch_first=True, dtype=torch.float64).cuda()
    x = torch.randn(3, 2000, 3, dtype=torch.float64, device="cuda")
    if masks:
        x = pack_padded_sequence(x, torch.tensor([2000, 1311, 7]), batch_first=True)

    def run():
        ours.zero_grad()
        out, _ = ours(x)
        data = out.data if masks else out
        data.square().sum().backward()
        return data.detach(), [p.grad.clone() for p in ours.parameters()]

    fused, grads = run()
    monkeypatch.setenv("PNEWTON_FUSED_CELLS", "0")
    aten, grads_aten = run()
    torch.testing.assert_close(fused, aten, rtol=1e-10, atol=1e-10)
    for g, g_aten in zip(grads, grads_aten):
        torch.testing.assert_close(g, g_aten, rtol=1e-8, atol=1e-8)
    ref = torch_nn_twin(ours.cpu(), torch.nn.GRU if cls is pnewton.HeadGRU else torch.nn.LSTM)
    expected, _ = ref(x.cpu() if not masks else x.to("cpu"))
    torch.testing.assert_close(fused.cpu(), expected.data if masks else expected, rtol=0, atol=1e-10)


def test_the_example_trains_and_plots(tmp_path):
    """examples/train_head_gru.py, shortened: the loss falls, every step's solve converges in
    a few exact Newton iterations, and the plot is written."""
    import importlib.util
    import os
    import sys
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_head_gru.py")
    spec = importlib.util.spec_from_file_location("train_head_gru", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    plot = tmp_path / "plot.png"
    argv = sys.argv
    sys.argv = ["train_head_gru.py", "--steps", "30", "--T", "256", "--plot", str(plot)]
    try:
        losses, iterations = example.main()
    finally:
        sys.argv = argv
    assert losses[-1] < 0.5 * losses[0], losses
    assert max(iterations) <= 20 and sorted(iterations)[len(iterations) // 2] <= 8, iterations
    assert plot.stat().st_size > 1000
