"""Dynamics fuzzing: random cells from contracting to strongly chaotic, random lengths,
methods and budgets. Whatever happens, no result may be flagged converged unless every
step satisfies its recurrence to the stated tolerance — checked against torch's own cell
ops (torch.gru_cell, lstm_cell, rnn_*_cell), not against pnewton's cell code.

    python tests/python/test_dynamics_fuzz.py   # prints the counts for benchmarks/RESULTS.md
"""
import math
from collections import Counter

import torch

import pnewton

GATES = {"gru": 3, "lstm": 4, "rnn_tanh": 1, "rnn_relu": 1}
CASES = 1000


def torch_step(cell, W, b, s, gi):
    """f(s, gi) by torch's fused cell ops, with the input projection as the identity."""
    G = gi.shape[-1]
    eye, zero = torch.eye(G, dtype=gi.dtype), torch.zeros(G, dtype=gi.dtype)
    if cell == "lstm":
        D = W.shape[1]
        pairs = s.view(-1, D, 2)
        h, c = torch.lstm_cell(gi, (pairs[..., 0], pairs[..., 1]), eye, W, zero, b)
        return torch.stack([h, c], -1).view(-1, 2 * D)
    op = {"gru": torch.gru_cell, "rnn_tanh": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell}[cell]
    return op(gi, s, eye, W, zero, b)


def check_case(i, gen):
    """Runs one random case; returns (outcome, wrong) per sequence."""
    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    cell = list(GATES)[i % 4]
    D, T, B = randint(1, 6), randint(1, 1500), 2
    G, S = GATES[cell] * D, (2 if cell == "lstm" else 1) * D
    gain = math.exp(math.log(0.1) + torch.rand(1, generator=gen).item() * math.log(50.0))  # 0.1 .. 5
    W = torch.randn(G, D, dtype=torch.float64, generator=gen) * gain / math.sqrt(D)
    b = torch.randn(G, dtype=torch.float64, generator=gen) * 0.5
    gi = torch.randn(B, T, G, dtype=torch.float64, generator=gen)
    s0 = torch.randn(B, S, dtype=torch.float64, generator=gen) * 0.5
    methods = ["deer", "quasi_deer", "jacobi"] + (["block_deer"] if cell == "lstm" else [])
    method = methods[randint(0, len(methods) - 1)]
    max_iter, fallback = randint(1, 60), bool(randint(0, 1))
    states, stats = pnewton.newton_rnn(cell, gi, W, b, s0, method=method, max_iter=max_iter, fallback=fallback)
    results = []
    for row in range(B):
        if not bool(stats.converged[row]):
            results.append(("not converged", False))
            continue
        # Converged, by Newton or by the sequential fallback: every step must satisfy its
        # recurrence. (The residual, not a comparison of trajectories: on chaotic cells
        # the last bit of a GEMM is amplified along the sequence, the residual is not.)
        s_prev = torch.cat([s0[row:row + 1], states[row, :-1]])
        F = torch_step(cell, W, b, s_prev, gi[row])
        residual = (states[row] - F).abs().max().item()
        bound = 1e-10 + 1e-10 * F.abs().max().item()
        # The two implementations of f round differently: allow 1e-13 of slack.
        outcome = "fell back" if bool(stats.fell_back[row]) else "converged"
        results.append((outcome, not residual <= bound + 1e-13))
    return results


def run_fuzz(cases=CASES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts, wrong = Counter(), []
    for i in range(cases):
        for outcome, is_wrong in check_case(i, gen):
            counts[outcome] += 1
            if is_wrong:
                wrong.append((i, outcome))
    return counts, wrong


def test_no_wrong_answer_is_ever_flagged_converged():
    counts, wrong = run_fuzz()
    assert not wrong, f"wrong answers flagged as good: {wrong[:10]} (counts {dict(counts)})"
    # The fuzz must exercise every outcome, or it proves nothing about the flags.
    assert counts["converged"] > 100 and counts["fell back"] > 100 and counts["not converged"] > 100, counts


def test_generic_cells_from_python_are_never_wrong_when_flagged_converged():
    gen = torch.Generator().manual_seed(1)
    bad = []
    for i in range(100):
        D, T = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 400, (1,), generator=gen))
        gain = 0.2 + 4.0 * torch.rand(1, generator=gen).item()
        W = torch.randn(D, D, dtype=torch.float64, generator=gen) * gain / math.sqrt(D)
        f = lambda s, u, W=W: torch.tanh(s @ W.T + u)  # noqa: E731
        s0 = torch.randn(2, D, dtype=torch.float64, generator=gen)
        u = torch.randn(2, T, D, dtype=torch.float64, generator=gen)
        method = ["deer", "quasi_deer", "jacobi"][i % 3]
        states, stats = pnewton.solve(f, s0, u, method=method, max_iter=int(torch.randint(1, 40, (1,), generator=gen)),
                                      fallback=False)
        for row in range(2):
            if bool(stats.converged[row]):
                F = f(torch.cat([s0[row:row + 1], states[row, :-1]]), u[row])
                if (states[row] - F).abs().max().item() > 1e-10 + 1e-10 * F.abs().max().item() + 1e-13:
                    bad.append(i)
    assert not bad


if __name__ == "__main__":
    counts, wrong = run_fuzz()
    total = sum(counts.values())
    print(f"{CASES} random cells, {total} sequences: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
          f"; wrong answers flagged good: {len(wrong)}")
