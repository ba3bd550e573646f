"""pnewton.GRU / LSTM / RNN as torch.nn users meet them: torch.nn's own module samples and
error cases (torch.testing's module_db), packed and padded variable-length batches, the
module interface, autocast, dropout masks and pickling — each against torch.nn itself."""
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import pnewton

from torch.testing._internal import common_modules  # noqa: E402  (torch.nn's own module test inputs)

OURS = {nn.GRU: pnewton.GRU, nn.LSTM: pnewton.LSTM, nn.RNN: pnewton.RNN}
MODULE_INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
# Outputs agree to the solve's stopping tolerance; per dtype.
TOL = {torch.float64: dict(rtol=1e-8, atol=1e-8), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def flat(outputs):
    """Every tensor of a layer's (output, hidden) result, PackedSequence data included."""
    out, hidden = outputs
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def inputs_of(args):
    tensors = []
    for a in args:
        a = a.data if isinstance(a, PackedSequence) else a
        tensors += list(a) if isinstance(a, tuple) else [a]
    return [t for t in tensors if t.requires_grad]


def pair(info, constructor):
    """A torch.nn layer and the pnewton layer with its weights."""
    torch.manual_seed(0)
    ref = info.module_cls(*constructor.args, **constructor.kwargs)
    ours = OURS[info.module_cls](*constructor.args, **constructor.kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [False, True])
def test_torch_nn_module_samples_give_torch_nns_outputs_and_gradients(info, dtype, training):
    """torch.nn's own samples for its RNN/GRU/LSTM tests (unbatched inputs, initial states,
    packed sequences, every bias / batch_first / bidirectional combination)."""
    kwargs = {"with_packed_sequence": True} if info.module_cls is not nn.LSTM else {}
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training,
                                      **kwargs)
    assert samples
    for sample in samples:
        constructor, forward = sample.constructor_input, sample.forward_input
        ref, ours = pair(info, constructor)
        ref, ours = ref.to(dtype).train(training), ours.to(dtype).train(training)
        with common_modules.freeze_rng_state():
            expected = flat(ref(*forward.args, **forward.kwargs))
        with common_modules.freeze_rng_state():
            got = flat(ours(*forward.args, **forward.kwargs))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL[dtype])
        packed = isinstance(forward.args[0], PackedSequence)
        if sample.reference_fn is not None and not packed:  # unbatched == batched with one sequence
            for a, b in zip(got, flat(sample.reference_fn(ours, *forward.args, **forward.kwargs))):
                torch.testing.assert_close(a, b, **TOL[dtype])
        wrt = inputs_of(forward.args) + list(ours.parameters())
        wrt_ref = inputs_of(forward.args) + list(ref.parameters())
        cotangents = [torch.randn_like(t) for t in got]
        grads = torch.autograd.grad(got, wrt, cotangents, allow_unused=True)
        grads_ref = torch.autograd.grad(expected, wrt_ref, cotangents, allow_unused=True)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda i: i.name)
def test_torch_nn_error_cases_raise_torch_nns_errors(info):
    cases = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                          training=False)
    assert cases
    for case in cases:
        sample = case.module_error_input
        constructor = sample.constructor_input
        make = lambda: OURS[info.module_cls](*constructor.args, **constructor.kwargs)  # noqa: E731
        with pytest.raises(case.error_type, match=case.error_regex):
            if case.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
                make()
            else:
                make()(*sample.forward_input.args, **sample.forward_input.kwargs)


# ---- variable-length batches ---------------------------------------------------------------

LAYERS = [(nn.GRU, pnewton.GRU, {}), (nn.LSTM, pnewton.LSTM, {}), (nn.RNN, pnewton.RNN, {"nonlinearity": "tanh"}),
          (nn.RNN, pnewton.RNN, {"nonlinearity": "relu"})]


@pytest.mark.parametrize("torch_cls,ours_cls,kw", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("enforce_sorted,batch_first,with_h0", [(False, False, True), (True, True, False)])
def test_packed_sequences_match_torch_nn(torch_cls, ours_cls, kw, dtype, enforce_sorted, batch_first, with_h0):
    torch.manual_seed(3)
    config = dict(num_layers=2, bidirectional=True, batch_first=batch_first, **kw)
    ref = torch_cls(3, 6, **config).to(dtype)
    ours = ours_cls(3, 6, **config).to(dtype)
    ours.load_state_dict(ref.state_dict())
    lengths = torch.tensor([40, 1, 23, 40, 7]) if not enforce_sorted else torch.tensor([40, 40, 23, 7, 1])
    x = torch.randn(5, 40, 3, dtype=dtype) if batch_first else torch.randn(40, 5, 3, dtype=dtype)
    x.requires_grad_(True)
    h0 = None
    if with_h0:
        h0 = torch.randn(4, 5, 6, dtype=dtype, requires_grad=True)
        h0 = (h0, torch.randn(4, 5, 6, dtype=dtype, requires_grad=True)) if torch_cls is nn.LSTM else h0
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    got, expected = flat(ours(packed, h0)), flat(ref(packed, h0))
    tol = TOL[dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)
    wrt = [x] + ([] if h0 is None else list(h0) if isinstance(h0, tuple) else [h0])
    cotangents = [torch.randn_like(t) for t in got]
    grads = torch.autograd.grad(got, wrt + list(ours.parameters()), cotangents, retain_graph=True)
    grads_ref = torch.autograd.grad(expected, wrt + list(ref.parameters()), cotangents)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)


def test_pack_sequence_of_unequal_tensors_round_trips():
    torch.manual_seed(4)
    ref = nn.GRU(2, 4).double()
    ours = pnewton.GRU(2, 4).double()
    ours.load_state_dict(ref.state_dict())
    seqs = [torch.randn(n, 2, dtype=torch.float64) for n in (5, 9, 1)]
    out, h = ours(pack_sequence(seqs, enforce_sorted=False))
    out_ref, h_ref = ref(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    torch.testing.assert_close(padded, pad_packed_sequence(out_ref)[0], **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])
    assert lengths.tolist() == [5, 9, 1]


@pytest.mark.parametrize("cell,method", [("gru", "quasi_deer"), ("gru", "deer"), ("lstm", "block_deer"),
                                         ("rnn_tanh", "sequential")])
def test_newton_rnn_lengths_equal_separate_solves(cell, method):
    """Padding is no part of a sequence: the solve with lengths equals each sequence solved
    alone, its states hold still past the length, and so do the gradients."""
    torch.manual_seed(5)
    D = 4
    S, G = (2 * D, 4 * D) if cell == "lstm" else (D, 3 * D if cell == "gru" else D)
    lengths = torch.tensor([12, 1, 0, 7])
    gi = torch.randn(4, 12, G, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(G, D, dtype=torch.float64) / D).requires_grad_(True)
    b = torch.randn(G, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(4, S, dtype=torch.float64, requires_grad=True)
    states, stats = pnewton.newton_rnn(cell, gi, W, b, s0, method=method, lengths=lengths)
    assert bool(stats.converged.all())
    g = torch.randn_like(states)
    grads = torch.autograd.grad((states * g).sum(), [gi, W, b, s0])
    expected_grads = [torch.zeros_like(t) for t in (gi, W, b, s0)]
    for i, L in enumerate(lengths.tolist()):
        if L == 0:
            torch.testing.assert_close(states[i], s0[i].expand(12, S))
            expected_grads[3][i] += g[i].sum(0)
            continue
        alone, _ = pnewton.newton_rnn(cell, gi[i:i + 1, :L], W, b, s0[i:i + 1], method="sequential")
        torch.testing.assert_close(states[i, :L], alone[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(states[i, L:], alone[0, -1].expand(12 - L, S), rtol=1e-9, atol=1e-9)
        # The cotangent of a held state belongs to the state it holds.
        g_alone = g[i:i + 1, :L].clone()
        g_alone[:, -1] += g[i, L:].sum(0)
        for acc, part in zip(expected_grads, torch.autograd.grad((alone * g_alone).sum(), [gi, W, b, s0])):
            acc += part
    for a, b_ in zip(grads, expected_grads):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8)
    assert stats.iterations[2] == 0


def test_newton_rnn_lengths_are_checked():
    gi, W, s0 = torch.randn(2, 5, 3), torch.randn(3, 1), torch.zeros(2, 1)
    with pytest.raises(RuntimeError, match=r"lengths must be in \[0, T = 5\]"):
        pnewton.newton_rnn("gru", gi, W, None, s0, lengths=torch.tensor([6, 2]))
    with pytest.raises(RuntimeError, match="lengths must be a 1-d tensor"):
        pnewton.newton_rnn("gru", gi, W, None, s0, lengths=torch.tensor([2]))
    with pytest.raises(RuntimeError, match="lengths must be an integer tensor"):
        pnewton.newton_rnn("gru", gi, W, None, s0, lengths=torch.tensor([2.0, 1.0]))


# ---- the module interface ------------------------------------------------------------------

def test_interface_of_torch_nn_layers():
    layer = pnewton.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25)
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25)
    assert isinstance(layer, nn.RNNBase) and layer.mode == "LSTM"
    assert layer._flat_weights_names == ref._flat_weights_names
    assert [[tuple(p.shape) for p in w] for w in layer.all_weights] == \
        [[tuple(p.shape) for p in w] for w in ref.all_weights]
    layer.flatten_parameters()
    assert repr(layer).startswith(repr(ref)[:-1])  # torch.nn's repr (batch_first, dropout, ...)
    assert "method" in repr(pnewton.GRU(2, 3, method="deer"))
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        pnewton.GRU(2, 3, dropout=0.5)


def test_empty_batch_and_empty_sequence_behave_as_torch_nn():
    for cls, ref_cls in ((pnewton.GRU, nn.GRU), (pnewton.LSTM, nn.LSTM)):
        out, hidden = cls(3, 4, num_layers=2)(torch.randn(6, 0, 3))
        out_ref, hidden_ref = ref_cls(3, 4, num_layers=2)(torch.randn(6, 0, 3))
        assert out.shape == out_ref.shape
        for h, h_ref in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                            hidden_ref if isinstance(hidden_ref, tuple) else (hidden_ref,)):
            assert h.shape == h_ref.shape
        with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
            cls(3, 4)(torch.randn(0, 2, 3))


def test_dropout_masks_are_torch_nns_for_the_same_seed():
    torch.manual_seed(6)
    ref = nn.GRU(3, 5, num_layers=3, dropout=0.5).double().train()
    ours = pnewton.GRU(3, 5, num_layers=3, dropout=0.5).double().train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 4, 3, dtype=torch.float64)
    torch.manual_seed(7)
    out_ref, h_ref = ref(x)
    torch.manual_seed(7)
    out, h = ours(x)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])


@pytest.mark.parametrize("torch_cls,ours_cls,kw", LAYERS[:3])
def test_autocast_follows_torch_nn(torch_cls, ours_cls, kw):
    """CPU autocast (bfloat16): the dtype torch.nn's layer returns, values near its own, and a
    backward that runs. Our solve computes in float32 whatever it stores."""
    torch.manual_seed(8)
    ref = torch_cls(4, 8, num_layers=2, **kw)
    ours = ours_cls(4, 8, num_layers=2, **kw)
    ours.load_state_dict(ref.state_dict())
    proj = nn.Linear(3, 4)
    x = torch.randn(30, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(proj(x))
        out_ref, _ = ref(proj(x))
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters())


def test_pickled_layers_carry_no_diagnostics_and_reload():
    layer = pnewton.GRU(3, 4).double()
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    assert layer.last_stats is not None
    assert b"SolveStats" not in pickle.dumps(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], out)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == set(layer.state_dict())


def test_a_normal_backward_warns_nothing():
    layer = pnewton.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(12, 2, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, (h, c) = layer(x, (torch.zeros(4, 2, 4, requires_grad=True), torch.zeros(4, 2, 4, requires_grad=True)))
        (out.sum() + h.sum() + c.sum()).backward()


def test_initial_state_gradients_are_contiguous_as_torch_nns():
    layer = pnewton.LSTM(3, 4, num_layers=2)
    h0, c0 = (torch.randn(2, 5, 4, requires_grad=True) for _ in range(2))
    out, _ = layer(torch.randn(7, 5, 3), (h0, c0))
    grads = torch.autograd.grad(out.sum(), (h0, c0))
    assert all(g.is_contiguous() for g in grads)


def test_fallback_warning_is_offered_and_off_by_default():
    torch.manual_seed(9)
    layer = pnewton.RNN(2, 8, max_iter=2)  # a budget too small: the loop finishes the solve
    x = torch.randn(50, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert layer.last_stats.fallback
    layer.warn_on_fallback = True
    with pytest.warns(UserWarning, match=r"sequential fallback computed 3 of 3 sequences in layer·direction \[0\]"):
        layer(x)
    assert len(layer.last_layer_stats) == 1 and layer.last_layer_stats[0].fallback


# ---- segments packed end to end ------------------------------------------------------------

def segment_resets(lengths_per_row, T):
    """[B, T] resets and the (row, start, length) of every segment."""
    resets = torch.zeros(len(lengths_per_row), T, dtype=torch.bool)
    segments = []
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            resets[row, start] = start > 0
            segments.append((row, start, n))
            start += n
    return resets, segments


@pytest.mark.parametrize("cell,method", [("gru", "quasi_deer"), ("lstm", "block_deer"), ("rnn_tanh", "deer"),
                                         ("gru", "sequential")])
@pytest.mark.parametrize("adjoint", ["scan", "iterative", "sequential"])
def test_newton_rnn_segments_equal_separate_solves(cell, method, adjoint):
    torch.manual_seed(10)
    D = 4
    S, G = (2 * D, 4 * D) if cell == "lstm" else (D, 3 * D if cell == "gru" else D)
    resets, segments = segment_resets([[5, 1, 7, 3], [16]], 16)
    gi = torch.randn(2, 16, G, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(G, D, dtype=torch.float64) / D).requires_grad_(True)
    b = torch.randn(G, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, S, dtype=torch.float64, requires_grad=True)
    states, stats = pnewton.newton_rnn(cell, gi, W, b, s0, method=method, resets=resets, adjoint=adjoint)
    assert bool(stats.converged.all())
    expected = torch.cat([torch.cat([pnewton.newton_rnn(cell, gi[r:r + 1, a:a + n], W, b, s0[r:r + 1],
                                                        method="sequential")[0]
                                     for row, a, n in segments if row == r], 1) for r in range(2)])
    torch.testing.assert_close(states, expected, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(states)
    grads = torch.autograd.grad((states * g).sum(), [gi, W, b, s0])
    grads_ref = torch.autograd.grad((expected * g).sum(), [gi, W, b, s0])
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("torch_cls,cell", [(nn.GRU, "gru"), (nn.LSTM, "lstm")])
def test_rnn_stack_segments_equal_torch_nn_on_each_sequence(torch_cls, cell):
    """Several sequences end to end in one row of a bidirectional 2-layer stack: each
    segment's outputs and gradients are torch.nn's on that sequence alone."""
    torch.manual_seed(11)
    ref = torch_cls(3, 5, num_layers=2, bidirectional=True).double()
    params = [getattr(ref, name) for name in ref._flat_weights_names]
    lengths = [[9, 1, 14], [4, 20]]
    T = 24
    resets, segments = segment_resets(lengths, T)
    x = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    S = 2 * 5 if cell == "lstm" else 5
    state0 = torch.zeros(4, 2, S, dtype=torch.float64)
    out, *_ = torch.ops.pnewton.rnn_stack(cell, x, state0, params, True, 2, 0.0, False, True, False,
                                          resets=resets)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x] + params)
    expected = torch.zeros_like(out)
    loss = 0
    for row, a, n in segments:
        seg_out, _ = ref(x[a:a + n, row:row + 1])
        expected[a:a + n, row:row + 1] = seg_out
        loss = loss + (seg_out * g[a:a + n, row:row + 1]).sum()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grads_ref = torch.autograd.grad(loss, [x] + params)
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8)


# ---- accuracy at default options ------------------------------------------------------------

@pytest.mark.parametrize("torch_cls,ours_cls,kw", LAYERS[:3])
@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("T", [1, 300])
def test_default_float32_error_is_within_10x_torch_nns_own(torch_cls, ours_cls, kw, scale, T):
    """Against a float64 sequential truth (torch.nn in float64): pnewton's float32 error at
    default options is at most 10× torch.nn's own float32 error, outputs and final states
    (the full grid: benchmarks/bench_accuracy.py). Recurrent weights ×2: a slower recurrence
    that amplifies a residual into a larger state error."""
    torch.manual_seed(12)
    ref = torch_cls(8, 32, num_layers=2, **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(scale)
    ours = pnewton.from_torch(ref)
    x = torch.randn(T, 4, 8)
    with torch.no_grad():
        truth = flat(ref.double()(x.double()))
        torch_error = max(float((a.double() - b).abs().max()) for a, b in zip(flat(ref.float()(x)), truth))
        error = max(float((a.double() - b).abs().max()) for a, b in zip(flat(ours(x)), truth))
    assert error <= 10 * torch_error + 1e-7, (error, torch_error)


@pytest.mark.parametrize("torch_cls,ours_cls", [(torch.nn.GRU, pnewton.GRU), (torch.nn.LSTM, pnewton.LSTM)])
def test_default_float32_gradients_are_within_1_5x_torch_nns_own_error(torch_cls, ours_cls):
    """Gradients at default options (hidden 32: the iterative adjoint) against the float64
    truth, beside torch.nn's own float32 gradient error: the adjoint stops on its sweep's
    step, as the forward on its Newton step (a residual test left both at 2.4×, and the
    GRU of benchmarks/bench_accuracy.py at 5.4×)."""
    torch.manual_seed(0)
    ref = torch_cls(8, 32, num_layers=2)
    ours = pnewton.from_torch(ref)
    x, g = torch.randn(256, 4, 8), torch.randn(256, 4, 32)

    def grads(layer, dtype):
        xi = x.to(dtype).requires_grad_(True)
        out = layer.to(dtype)(xi)[0]
        return torch.autograd.grad((out * g.to(dtype)).sum(), [xi, *layer.parameters()])

    truth = grads(ref, torch.float64)
    torch_error = max(float((a.double() - b).abs().max()) for a, b in zip(grads(ref, torch.float32), truth))
    error = max(float((a.double() - b).abs().max()) for a, b in zip(grads(ours, torch.float32), truth))
    assert error <= 1.5 * torch_error, (error, torch_error)
