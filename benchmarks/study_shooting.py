"""A study, not a feature: multiple shooting for a per-channel (diag) GRU, the iteration
counts it needs against the solver's DEER on the same layer (benchmarks/RESULTS.md, session 8).

    python benchmarks/study_shooting.py [--B 16] [--T 65536] [--chunks 64 256 1024] [--z-shift 0 4 7]

The sequence is cut into C chunks of L = T / C steps. Each iteration runs every chunk's loop
from a guessed start S_c (all chunks at once), giving its end E_c and, per channel, the
derivative P_c = dE_c/dS_c (the product of the step Jacobians, a scalar for the diag GRU),
then takes Newton's step on the chunk boundaries, S_c ← E_{c−1} + P_{c−1} (S_{c−1}^new − S_{c−1})
(S_0 = h0): a linear recurrence over C elements, the scan of every Newton step here. One
more chunk is exact per iteration, as one more step is in DEER. The loops are written in
torch ops over [B, C, D] here (float64 unless --float32), one step at a time: this counts
iterations and checks the answer against the float64 loop; it does not time anything.
--z-shift adds to the update gate's recurrent bias, lengthening the cell's memory (z → 1).
"""
import argparse

import torch

import pnewton


def diag_gru_step(h, g, w, b):
    """One step of the diag GRU and its derivative dh'/dh per channel; g [..., 3, D]."""
    r = torch.sigmoid(g[..., 0, :] + w[0] * h + b[0])
    z = torch.sigmoid(g[..., 1, :] + w[1] * h + b[1])
    hn = w[2] * h + b[2]
    n = torch.tanh(g[..., 2, :] + r * hn)
    dn = (1 - z) * (1 - n * n)
    J = dn * (r * w[2] + hn * r * (1 - r) * w[0]) + (h - n) * z * (1 - z) * w[1] + z
    return (1 - z) * n + z * h, J


def shoot(gi, w, b, chunks, rtol, max_iter=100):
    """(states [B, T, D], iterations) by multiple shooting from zero starts."""
    B, T, _, D = gi.shape
    L = T // chunks
    g = gi.view(B, chunks, L, 3, D)
    S = torch.zeros(B, chunks, D, dtype=gi.dtype)
    for it in range(1, max_iter + 1):
        h, P = S.clone(), torch.ones_like(S)
        for t in range(L):
            h, J = diag_gru_step(h, g[:, :, t], w, b)
            P = P * J
        new = S.clone()
        for c in range(1, chunks):
            new[:, c] = h[:, c - 1] + P[:, c - 1] * (new[:, c - 1] - S[:, c - 1])
        step = (new - S).abs().max()
        S = new
        if step <= rtol * max(1.0, S.abs().max().item()):
            break
    out, h = torch.empty(B, chunks, L, D, dtype=gi.dtype), S
    for t in range(L):
        h, _ = diag_gru_step(h, g[:, :, t], w, b)
        out[:, :, t] = h
    return out.view(B, T, D), it


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--z-shift", type=float, nargs="+", default=[0.0, 4.0, 7.0])
    parser.add_argument("--float32", action="store_true")
    args = parser.parse_args()
    dtype = torch.float32 if args.float32 else torch.float64
    print(f"{'z shift':>7} {'DEER iters':>10} {'chunks':>6} {'L':>6} {'iters':>5} {'max err vs loop':>15}")
    for shift in args.z_shift:
        torch.manual_seed(0)
        layer = pnewton.DiagGRU(args.D, args.D, batch_first=True, method="quasi_deer").double()
        with torch.no_grad():
            layer.bias_hh_l0.view(3, args.D)[1] += shift
            x = torch.randn(args.B, args.T, args.D, dtype=torch.float64)
            layer(x)
            deer = int(layer.last_stats.iterations.max())
            loop = pnewton.DiagGRU(args.D, args.D, batch_first=True, method="sequential").double()
            loop.load_state_dict(layer.state_dict())
            truth = loop(x)[0]
            gi = (x @ layer.weight_ih_l0.T + layer.bias_ih_l0).view(args.B, args.T, 3, args.D).to(dtype)
            w, b = layer.weight_hh_l0.view(3, args.D).to(dtype), layer.bias_hh_l0.view(3, args.D).to(dtype)
            rtol = 1e-6 if args.float32 else 1e-12
            for chunks in args.chunks:
                states, iters = shoot(gi, w, b, chunks, rtol)
                err = (states.double() - truth).abs().max().item()
                print(f"{shift:7.1f} {deer:10d} {chunks:6d} {args.T // chunks:6d} {iters:5d} {err:15.1e}", flush=True)


if __name__ == "__main__":
    main()
