"""The fused per-iteration pass (kernels/cell_fused.h on the CPU: csrc/cpu/cell_kernels.cpp,
one build per CPU capability) against the ATen form it replaces (PNEWTON_FUSED_CELLS=0):
the same iterations, states and gradients for every built-in cell and every part it
writes, with padding (lengths), resets and hidden sizes off the vector width; the float32
tanh against float64; each CPU capability in its own process."""
import os
import subprocess
import sys

import pytest
import torch

from test_newton_rnn import problem, run

CASES = [("gru", "quasi_deer"), ("gru", "sequential"), ("lstm", "block_deer"), ("lstm", "quasi_deer"),
         ("rnn_tanh", "quasi_deer"), ("rnn_relu", "quasi_deer"), ("rnn_tanh", "picard"), ("diag_gru", "deer"),
         ("diag_lstm", "deer"), ("gru", "quasi_elk"), ("diag_gru", "elk_filter"),
         # the per-channel cells' loop in one pass (fused_loop_channel)
         ("diag_gru", "sequential"), ("diag_lstm", "sequential")]


def compare_with_aten(cell, method, D, monkeypatch, masks):
    gi, W, b, s0 = problem(cell, B=3, T=120, D=D, requires_grad=True)
    kwargs = {}
    if masks:
        kwargs["lengths"] = torch.tensor([120, 57, 0])
        resets = torch.zeros(3, 120, dtype=torch.bool)
        resets[0, [1, 40, 41]] = True
        resets[1, 56] = True
        kwargs["resets"] = resets
    if "elk" in method:
        # The ELK methods converge to the rounding floor, where whether the last step passes
        # the stop test (|δ| vs 1e-12) is a rounding-level comparison that two correct
        # passes may decide differently: compare them over the same iterations.
        kwargs.update(fixed_iterations=True, max_iter=14)
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("PNEWTON_FUSED_CELLS", fused)
        states, stats = run(cell, gi, W, b, s0, method, **kwargs)
        grads = torch.autograd.grad(states.square().sum(), (gi, W, b, s0))
        results.append((states, stats, grads))
    (fused, stats, grads), (aten, stats_aten, grads_aten) = results
    assert stats.iterations.tolist() == stats_aten.iterations.tolist()
    assert stats.converged.tolist() == stats_aten.converged.tolist()
    torch.testing.assert_close(fused, aten, rtol=1e-13, atol=1e-13)
    for g, g_aten in zip(grads, grads_aten):
        torch.testing.assert_close(g, g_aten, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cell,method", CASES)
@pytest.mark.parametrize("D", [6, 37])
def test_the_fused_pass_matches_the_aten_form(cell, method, D, monkeypatch):
    compare_with_aten(cell, method, D, monkeypatch, masks=False)


@pytest.mark.parametrize("cell,method", [("gru", "quasi_deer"), ("lstm", "block_deer"), ("diag_lstm", "deer"),
                                         ("rnn_relu", "quasi_deer"), ("diag_gru", "sequential"),
                                         ("diag_lstm", "sequential")])
def test_the_fused_pass_masks_padding_and_resets_as_the_aten_form(cell, method, monkeypatch):
    compare_with_aten(cell, method, 19, monkeypatch, masks=True)


def test_the_fused_pass_in_float32_agrees_with_the_aten_form(monkeypatch):
    gi, W, b, s0 = (t.float() for t in problem("lstm", B=2, T=300, D=24))
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("PNEWTON_FUSED_CELLS", fused)
        results.append(run("lstm", gi, W, b, s0, "block_deer"))
    (fused, stats), (aten, stats_aten) = results
    truth, _ = run("lstm", *(t.double() for t in (gi, W, b, s0)), "sequential")
    assert bool(stats.converged.all())
    # Rounding only: both within a few float32 ulps of the float64 states, and of each other.
    error, error_aten = (fused.double() - truth).abs().max(), (aten.double() - truth).abs().max()
    assert error < 4 * error_aten + 1e-7 and error < 2e-6


def tanh_ulps(x):
    """The largest error of the fused float32 tanh (rnn_tanh with zero weights: F = tanh(gi))
    over x, in units in the last place of the float64 tanh rounded to float32."""
    N, D = x.shape
    with torch.no_grad():
        ours = torch.ops.pnewton.cell_step("rnn_tanh", torch.zeros(N, D), x, torch.zeros(D, D), None)
    truth = torch.tanh(x.double())
    nearest = truth.float().abs()
    spacing = torch.nextafter(nearest, torch.tensor(float("inf"))).double() - nearest.double()
    finite = truth != 0
    return ours, ((ours.double() - truth).abs()[finite] / spacing[finite]).max().item()


def test_the_float32_tanh_is_within_two_ulps():
    x = torch.cat([torch.linspace(-12, 12, 1 << 17), torch.randn(1 << 17) * 0.4,
                   torch.logspace(-30, 1, 1 << 14), -torch.logspace(-30, 1, 1 << 14)]).view(-1, 64)
    _, ulps = tanh_ulps(x)
    assert ulps < 2.0
    special = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 60.0, -60.0, 1e-38, -0.625]])
    ours, _ = tanh_ulps(special)
    torch.testing.assert_close(ours, torch.tanh(special), equal_nan=True, rtol=2e-7, atol=0)


CAPABILITY_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, {tests!r})
from test_newton_rnn import problem, run
for cell, method in [("gru", "quasi_deer"), ("lstm", "block_deer"), ("diag_lstm", "deer"), ("rnn_relu", "quasi_deer")]:
    for D in (6, 37):
        gi, W, b, s0 = problem(cell, B=2, T=90, D=D)
        out = []
        for fused in ("1", "0"):
            os.environ["PNEWTON_FUSED_CELLS"] = fused
            out.append(run(cell, gi, W, b, s0, method))
        assert out[0][1].iterations.tolist() == out[1][1].iterations.tolist(), (cell, D)
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-13, atol=1e-13)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_cpu_capability_build_matches_the_aten_form(capability):
    # The pass is built once per capability; ATen's choice (ATEN_CPU_CAPABILITY) picks it.
    available = {"AVX512": ["default", "avx2", "avx512"], "AVX2": ["default", "avx2"]}
    if capability not in available.get(torch.backends.cpu.get_cpu_capability(), ["default"]):
        pytest.skip("this CPU lacks " + capability)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == capability.upper()
