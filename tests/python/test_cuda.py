"""The CUDA path end to end (skipped without a GPU): layers and solves in float32 on the
GPU against torch.nn / the sequential loop in float64 on the CPU, gradients too; the
fixed-iteration mode under CUDA graph capture; host synchronisations per iteration.

Every comparison is ‖got − ref‖ / ‖ref‖ ≤ 1e-5 on fresh random inputs (never zeros)."""
import copy

import pytest
import torch

import pnewton
from test_newton_rnn import problem  # random cell weights, inputs and states (float64)

pytestmark = pytest.mark.cuda
REL = 1e-5
TIGHT = dict(atol=3e-7, rtol=3e-7)  # float32 residual tolerance of the GPU solves


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


LAYERS = [("GRU", "quasi_deer"), ("GRU", "deer"), ("GRU", "auto"), ("LSTM", "block_deer"), ("LSTM", "auto"),
          ("RNN", "quasi_deer"), ("GRU", "elk_filter")]


@pytest.mark.parametrize("kind,method", LAYERS)
def test_layer_float32_on_gpu_matches_torch_nn_float64_with_gradients(kind, method):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(6, 24, num_layers=2, batch_first=True).double()
    ours = pnewton.from_torch(copy.deepcopy(ref).float().cuda(), method=method, **TIGHT)
    x = torch.randn(4, 700, 6, dtype=torch.float64)
    x_ours = x.float().cuda().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, state = ours(x_ours)
    out_ref, state_ref = ref(x_ref)
    assert rel_err(out, out_ref) <= REL
    for got, want in zip(state if kind == "LSTM" else (state,), state_ref if kind == "LSTM" else (state_ref,)):
        assert rel_err(got, want) <= REL
    weight = torch.randn(out_ref.shape, dtype=torch.float64)
    (out * weight.float().cuda()).sum().backward()
    (out_ref * weight).sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= REL
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) <= REL, name


@pytest.mark.parametrize("cell", ["diag_gru", "diag_lstm", "rnn_tanh"])
def test_newton_rnn_cells_on_gpu_match_the_float64_loop(cell):
    gi, W, b, s0 = problem(cell, B=3, T=5000, D=32, scale=0.5, seed=1)
    expected, _ = pnewton.newton_rnn(cell, gi, W, b, s0, method="sequential")
    # sequential: the per-channel cells' loop is one kernel (fused_loop_channel)
    for method in ("auto", "quasi_deer", "sequential"):
        got, stats = pnewton.newton_rnn(cell, *(t.float().cuda() for t in (gi, W, b, s0)), method=method, **TIGHT)
        assert got.is_cuda and bool(stats.converged.all()) and not bool(stats.fell_back.any())
        assert rel_err(got, expected) <= REL, method


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layers_solve_in_float32_on_gpu(dtype):
    torch.manual_seed(2)
    ref = torch.nn.GRU(8, 16, batch_first=True).cuda()
    ours = pnewton.from_torch(copy.deepcopy(ref).to(dtype), method="quasi_deer")
    x = torch.randn(2, 400, 8, device="cuda")
    out, _ = ours(x.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref(x)[0]) <= 2e-2


def gru_problem(B=4, T=2000, D=32, seed=3):
    return [t.float().cuda() for t in problem("gru", B=B, T=T, D=D, scale=0.5, seed=seed)]


def test_fixed_iterations_are_captured_by_a_cuda_graph_and_replay_new_inputs():
    gi, W, b, s0 = gru_problem()
    options = dict(method="quasi_deer", max_iter=40, fixed_iterations=True)
    static_gi = gi.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        pnewton.newton_rnn("gru", static_gi, W, b, s0, **options)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        states, stats = pnewton.newton_rnn("gru", static_gi, W, b, s0, **options)
    for seed in (4, 5):
        fresh = gru_problem(seed=seed)[0]
        static_gi.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_stats = pnewton.newton_rnn("gru", fresh, W, b, s0, **options)
        torch.testing.assert_close(states, eager, rtol=0, atol=0)
        assert stats.iterations.tolist() == eager_stats.iterations.tolist()
        assert bool(stats.converged.all())
        exact, _ = pnewton.newton_rnn("gru", fresh.double(), W.double(), b.double(), s0.double(), method="sequential")
        assert rel_err(states, exact) <= REL


def test_fixed_mode_never_synchronises_and_tolerance_mode_once_per_iteration(capfd):
    gi, W, b, s0 = gru_problem()
    pnewton.newton_rnn("gru", gi, W, b, s0, method="quasi_deer")  # warm-up (allocator, handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        pnewton.newton_rnn("gru", gi, W, b, s0, method="quasi_deer", max_iter=30, fixed_iterations=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    capfd.readouterr()
    torch.cuda.set_sync_debug_mode("warn")  # each synchronising call prints one warning
    try:
        _, stats = pnewton.newton_rnn("gru", gi, W, b, s0, method="quasi_deer")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = capfd.readouterr().err.count("called a synchronizing CUDA operation")
    iterations = int(stats.iterations.max())
    # One test per iteration, one after the last, one for the fallback test.
    assert 0 < syncs <= iterations + 2, (syncs, iterations)


def test_opcheck_newton_rnn_on_gpu():
    gi, W, b, s0 = (t.double().requires_grad_() for t in gru_problem(B=2, T=30, D=4))
    torch.library.opcheck(torch.ops.pnewton.newton_rnn.default, ("gru", gi, W, b, s0, "quasi_deer"))
    torch.library.opcheck(torch.ops.pnewton.elk_step.default,
                          (torch.rand(2, 30, 4, device="cuda"), torch.randn(2, 30, 4, device="cuda"),
                           torch.rand(2, device="cuda") + 0.1))


@pytest.mark.parametrize("cell,method", [("gru", "quasi_deer"), ("lstm", "block_deer"), ("diag_lstm", "deer"),
                                         ("rnn_tanh", "quasi_deer"), ("rnn_relu", "quasi_deer")])
@pytest.mark.parametrize("masks", [False, True])
def test_fused_cell_kernel_matches_the_aten_form_on_gpu(cell, method, masks, monkeypatch):
    # The kernel's shifted reads, residual, padding and reset masks against the ATen form.
    args = [t.cuda().requires_grad_() for t in problem(cell, B=3, T=3000, D=16, seed=6)]
    kwargs = {}
    if masks:
        resets = torch.zeros(3, 3000, dtype=torch.bool, device="cuda")
        resets[0, [1, 1500]] = True
        kwargs = dict(lengths=torch.tensor([3000, 1999, 0], device="cuda"), resets=resets)
    fused, stats = pnewton.newton_rnn(cell, *args, method=method, **kwargs)
    grads = torch.autograd.grad(fused.square().sum(), args)
    monkeypatch.setenv("PNEWTON_FUSED_CELLS", "0")
    aten, stats_aten = pnewton.newton_rnn(cell, *args, method=method, **kwargs)
    grads_aten = torch.autograd.grad(aten.square().sum(), args)
    assert stats.iterations.tolist() == stats_aten.iterations.tolist()
    torch.testing.assert_close(fused, aten, rtol=1e-12, atol=1e-12)
    for g, g_aten in zip(grads, grads_aten):
        torch.testing.assert_close(g, g_aten, rtol=1e-10, atol=1e-10)
