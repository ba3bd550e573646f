"""Solver options: one check (csrc/solver/options.cpp), run at a layer's construction and at
every call, whichever path then runs (torch.nn's forward for short calls, rnn_stack's
fused loop, the parallel solve), and by pnewton.solve. A bad value is a ValueError naming
the option."""
import pytest
import torch

import pnewton

# (options, the text the error must hold)
BAD = [
    (dict(damping=1.5), "damping must be in"),
    (dict(damping=-0.1), "damping must be in"),
    (dict(damping=float("nan")), "damping must be in"),
    (dict(method="elk", damping=1e300), "damping"),
    (dict(clip=-1.0), "clip must be >= 0"),
    (dict(adjoint="x"), "adjoint must be one of"),
    (dict(method="newton"), "method must be one of"),
    (dict(init="bogus"), "init must be"),
    (dict(max_iter=-1), "max_iter must be an integer >= 0"),
    (dict(atol=float("nan")), "atol must be >= 0"),
    (dict(rtol=-1.0), "rtol must be >= 0"),
    (dict(fixed_iterations=True), "fixed_iterations needs an explicit max_iter"),
]
IDS = [f"{'-'.join(f'{k}={v}' for k, v in o.items())}" for o, _ in BAD]
LAYERS = (pnewton.GRU, pnewton.LSTM, pnewton.RNN, pnewton.DiagGRU, pnewton.DiagLSTM)


@pytest.mark.parametrize("options,text", BAD, ids=IDS)
def test_a_layer_checks_its_options_at_construction(options, text):
    for layer in LAYERS:
        with pytest.raises(ValueError, match=text):
            layer(3, 4, **options)


@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("options,text", BAD, ids=IDS)
def test_every_call_checks_the_options_whichever_path_runs(options, text, T, monkeypatch):
    # auto as users get it: T = 10 runs torch.nn's forward without measuring, T = 1000 the
    # measured plan (parallel or rnn_stack's fused loop).
    monkeypatch.delenv("PNEWTON_AUTO", raising=False)
    torch.manual_seed(0)
    gru = pnewton.GRU(3, 4)
    gru.solver_options.update(options)  # changed after construction: checked at the call
    with pytest.raises(ValueError, match=text):
        gru(torch.randn(T, 2, 3))
    # The ops themselves, rnn_stack's fused loop (method "sequential") included.
    o = {**pnewton.nn.SOLVER_DEFAULTS, "method": "sequential", **options}
    with pytest.raises(ValueError, match=text):
        limits = pnewton.nn._limits(o["max_iter"], o["atol"], o["rtol"])  # None as the ops spell it
        torch.ops.pnewton.rnn_stack("gru", torch.randn(T, 2, 3), torch.zeros(1, 2, 4), list(gru.parameters()), True,
                                    1, 0.0, False, False, False, o["method"], *limits, float(o["damping"]), o["clip"],
                                    o["init"], o["fixed_iterations"], o["fallback"], o["adjoint"])
    gi, W, b = torch.randn(2, T, 12), torch.randn(12, 4) / 2, torch.randn(12)
    with pytest.raises(ValueError, match=text):
        pnewton.newton_rnn("gru", gi, W, b, torch.zeros(2, 4), **options)


SOLVE_BAD = [(o, t) for o, t in BAD if set(o) <= {"method", "max_iter", "atol", "rtol", "damping", "init"}]


@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("options,text", SOLVE_BAD, ids=[IDS[BAD.index(b)] for b in SOLVE_BAD])
def test_solve_checks_its_options(options, text, T):
    with pytest.raises(ValueError, match=text):
        pnewton.solve(lambda s, u: torch.tanh(s + u), torch.zeros(2, 3), torch.randn(2, T, 3), **options)
