"""The edges of a layer call that the third adversarial round found (issue 27): packed
batches (the diagnostics' order, dropout masks, torch.compile), CPU autocast dtypes, exact
warm starts, lengths on the meta device and the short-call plan cache. Each is checked
against torch.nn's behaviour where it has one, on the short path (torch.nn's own forward,
under 256 steps) and on the solver's."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import pnewton

SHORT, LONG = 10, 300  # steps under and over auto's parallel threshold


@pytest.mark.parametrize("method", ["auto", "deer", "quasi_deer", "sequential"])
@pytest.mark.parametrize("T", [SHORT, LONG])
def test_packed_unsorted_diagnostics_are_in_the_callers_order(method, T, monkeypatch):
    monkeypatch.setenv("PNEWTON_AUTO", "measure")  # auto as users meet it: torch's loop under 256 steps
    torch.manual_seed(0)
    layer = pnewton.GRU(3, 4, method=method)
    x = torch.randn(T, 4, 3)
    x[1, 0, 0] = float("nan")  # the caller's sequence 0
    lengths = torch.tensor([3, T, 6, 8])
    layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    stats = layer.last_stats
    assert stats.converged.tolist() == [False, True, True, True]
    assert stats.residual[0].isnan() and not stats.residual[1:].isnan().any()
    if method in ("auto", "sequential") and T == SHORT:  # torch's loop: every step exact
        assert stats.iterations.tolist() == lengths.tolist()


def test_an_exact_warm_start_converges_in_one_confirming_iteration():
    # The float64 loop's solution rounded to float32: auto's first stage confirms it in one
    # iteration; a stage that converged a sequence no longer hands it back to its start
    # because a confirming step moved the residual by an ulp (it did for 29 of 60 seeds).
    for seed in range(20):
        torch.manual_seed(seed)
        B, T, D = 4, 30, 5
        gi = torch.randn(B, T, 4 * D, dtype=torch.float64)
        W, b = torch.randn(4 * D, D, dtype=torch.float64) / 3, torch.randn(4 * D, dtype=torch.float64) * 0.1
        s0 = torch.zeros(B, 2 * D, dtype=torch.float64)
        truth, _ = pnewton.newton_rnn("lstm", gi, W, b, s0, method="sequential")
        f = [t.float() for t in (gi, W, b, s0)]
        states, stats = pnewton.newton_rnn("lstm", *f, method="auto", init="states", init_states=truth.float(),
                                           fallback=False)
        assert bool(stats.converged.all()), (seed, stats)
        assert int(stats.iterations.max()) <= 1, (seed, stats)
        assert (states.double() - truth).abs().max() < 1e-6


@pytest.mark.parametrize("method", ["deer", "auto"])
def test_packed_dropout_masks_are_torch_nns_for_the_same_seed(method):
    torch.manual_seed(6)
    ref = nn.GRU(3, 5, num_layers=3, dropout=0.5).double().train()
    ours = pnewton.GRU(3, 5, num_layers=3, dropout=0.5, method=method).double().train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(LONG, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([40, LONG, 7, 150]), enforce_sorted=False)
    torch.manual_seed(7)
    out_ref, h_ref = ref(packed)
    torch.manual_seed(7)
    out, h = ours(packed)
    torch.testing.assert_close(out.data, out_ref.data, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(h, h_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("T", [SHORT, LONG])
def test_compile_of_a_call_on_a_packed_sequence_runs_as_torch_nns(T, train):
    torch.manual_seed(0)
    ours = pnewton.GRU(3, 4, num_layers=2, dropout=0.5).train(train)
    ref = nn.GRU(3, 4, num_layers=2, dropout=0.5).train(train)
    ref.load_state_dict(ours.state_dict())
    x, lengths = torch.randn(T, 4, 3), torch.tensor([3, T, 6, 8])
    outs = []
    for layer in (ref, ours):
        compiled = torch.compile(lambda x, L: layer(pack_padded_sequence(x, L, enforce_sorted=False))[0].data,
                                 backend="eager")
        torch.manual_seed(5)
        outs.append(compiled(x, lengths))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)


def _dtypes(result):
    out, final = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out.dtype] + [f.dtype for f in (final if isinstance(final, tuple) else (final,))]


@pytest.mark.parametrize("kind, kwargs", [("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"}),
                                          ("LSTM", {}), ("LSTM", {"proj_size": 2})])
def test_cpu_autocast_dtypes_are_torch_nns_on_every_path(kind, kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4, **kwargs)
    for T in (SHORT, LONG):
        x = torch.randn(T, 2, 3)
        for packed in (False, True):
            call = pack_padded_sequence(x, torch.tensor([T, T // 2])) if packed else x
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want = _dtypes(ref(call))
                for method in ("auto", "quasi_deer"):
                    ours = getattr(pnewton, kind)(3, 4, method=method, **kwargs)
                    ours.load_state_dict(ref.state_dict())
                    assert _dtypes(ours(call)) == want, (T, packed, method)


def test_lengths_and_resets_on_the_meta_device_raise_naming_them():
    gi, W, s0 = torch.randn(2, 5, 12), torch.randn(12, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="lengths must hold values"):
        pnewton.newton_rnn("gru", gi, W, None, s0, lengths=torch.tensor([5, 3], device="meta"))
    with pytest.raises(RuntimeError, match="resets must hold values"):
        pnewton.newton_rnn("gru", gi, W, None, s0, resets=torch.zeros(2, 5, dtype=torch.bool, device="meta"))


def test_the_short_call_plans_stay_few_over_many_lengths():
    # One plan per class of T and B in powers of two (as rnn_stack's): a layer called at 40
    # lengths of one such class measures once and remembers one plan, not 40.
    torch.manual_seed(0)
    layer = pnewton.GRU(2, 3)
    for T in range(260, 300):
        layer(torch.randn(T, 1, 2))
    assert len(layer._loop_plans) == 1
