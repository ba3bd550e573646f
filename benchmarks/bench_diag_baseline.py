"""pnewton.DiagGRU (method="deer") against a straightforward PyTorch implementation of the
same parallel Newton iteration: torch ops called from Python, a Hillis–Steele scan of the
linear recurrence, the exact adjoint by the reverse scan and one autograd VJP of the cell
at the solution — what a Python package of the method does on the CPU.

    python benchmarks/bench_diag_baseline.py [--B 8] [--T 1024] [--D 64] [--threads 1 2]

Prints median forward and forward+backward times of both (interleaved), the ratios
(baseline / pnewton: > 1 means pnewton is faster), the iterations and the largest output
and gradient differences (float32, the same weights).
"""
import argparse

import torch

import pnewton
from timing import median_seconds


def scan(a, b, reverse=False):
    """x_t = a_t x_{t-1} + b_t (x_{-1} = 0) over dim 1 by Hillis–Steele doubling; reverse:
    x_t = a_t x_{t+1} + b_t."""
    if reverse:
        return scan(a.flip(1), b.flip(1)).flip(1)
    a, b = a.clone(), b.clone()
    T, k = a.shape[1], 1
    while k < T:
        b_new = b[:, k:] + a[:, k:] * b[:, :-k]
        a_new = a[:, k:] * a[:, :-k]
        b = torch.cat([b[:, :k], b_new], 1)
        a = torch.cat([a[:, :k], a_new], 1)
        k *= 2
    return b


def cell(h_prev, gi, w, b):
    """The diag_gru step for every t at once, and its (diagonal) Jacobian."""
    gr, gz, gn = gi.chunk(3, -1)
    wr, wz, wn = w.chunk(3)
    br, bz, bn = b.chunk(3)
    r = torch.sigmoid(gr + wr * h_prev + br)
    z = torch.sigmoid(gz + wz * h_prev + bz)
    hn = wn * h_prev + bn
    n = torch.tanh(gn + r * hn)
    f = (1 - z) * n + z * h_prev
    dn = (1 - z) * (1 - n * n)
    jac = dn * (r * wn + hn * r * (1 - r) * wr) + (h_prev - n) * z * (1 - z) * wz + z
    return f, jac


def shifted(h0, h):
    return torch.cat([h0.unsqueeze(1), h[:, :-1]], 1)


class BaselineDEER(torch.autograd.Function):
    """Newton's iterations on h_t = f(h_{t-1}, x_t) under no_grad; the backward solves the
    adjoint λ_t = g_t + J_{t+1} λ_{t+1} by the reverse scan and takes the parameter
    gradients from one VJP of the cell at the solution."""

    last_iterations = 0

    @staticmethod
    def forward(ctx, gi, w, b, h0, tol, max_iter):
        h = torch.zeros(gi.shape[0], gi.shape[1], h0.shape[-1], dtype=gi.dtype)
        iterations = 0
        for iterations in range(1, max_iter + 1):
            f, jac = cell(shifted(h0, h), gi, w, b)
            jac = torch.cat([torch.zeros_like(jac[:, :1]), jac[:, 1:]], 1)  # δ_{-1} = 0
            delta = scan(jac, f - h)
            h = h + delta
            if delta.abs().max() <= tol * (1 + h.abs().max()):
                break
        ctx.save_for_backward(gi, w, b, h0, h)
        BaselineDEER.last_iterations = iterations
        return h

    @staticmethod
    def backward(ctx, grad_h):
        gi, w, b, h0, h = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (gi, w, b, h0)]
            h_prev = shifted(inputs[3], h)
            f, jac = cell(h_prev, inputs[0], inputs[1], inputs[2])
            next_jac = torch.cat([jac[:, 1:], torch.zeros_like(jac[:, :1])], 1).detach()
            lam = scan(next_jac, grad_h, reverse=True)
            grads = torch.autograd.grad(f, inputs, lam)
        return (*grads, None, None)


def baseline(layer, x, tol, max_iter):
    """The layer's first (only) layer by the baseline: output [B, T, D], iterations."""
    gi = torch.nn.functional.linear(x, layer.weight_ih_l0, layer.bias_ih_l0)
    h0 = x.new_zeros(x.shape[0], layer.hidden_size)
    return BaselineDEER.apply(gi, layer.weight_hh_l0, layer.bias_hh_l0, h0, tol, max_iter)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, nargs="+", default=[8])
    parser.add_argument("--T", type=int, nargs="+", default=[1024])
    parser.add_argument("--D", type=int, nargs="+", default=[64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU")
    print(f"{'thr':>3} {'B':>3} {'T':>6} {'D':>4} {'pn fwd':>8} {'base fwd':>8} {'x':>5} {'pn f+b':>8} "
          f"{'base f+b':>8} {'x':>5} {'iters':>9} {'max|diff|':>9} {'grad diff':>9}")
    print("(ms; iters: pnewton / baseline)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for B in args.B:
            for T in args.T:
                for D in args.D:
                    torch.manual_seed(0)
                    layer = pnewton.DiagGRU(D, D, batch_first=True, method="deer")
                    x = torch.randn(B, T, D, requires_grad=True)
                    tol = 3e-7  # pnewton's float32 default
                    ours = lambda: layer(x)[0]
                    base = lambda: baseline(layer, x, tol, 100)

                    def train(fn):
                        return lambda: fn().sum().backward()

                    with torch.no_grad():
                        times = {}
                        for name, fn in (("pn", ours), ("base", base)) * 2:  # interleaved
                            times.setdefault(name, []).append(median_seconds(fn, args.repeats, "cpu"))
                    for name, fn in (("pn_fb", train(ours)), ("base_fb", train(base))) * 2:
                        times.setdefault(name, []).append(median_seconds(fn, args.repeats, "cpu"))
                    t = {k: min(v) * 1e3 for k, v in times.items()}
                    with torch.no_grad():
                        out, ref = layer(x)[0], baseline(layer, x, tol, 100)
                    iterations = f"{int(layer.last_stats.iterations.max())}/{BaselineDEER.last_iterations}"
                    g_ours = torch.autograd.grad(layer(x)[0].square().sum(), x)[0]
                    g_base = torch.autograd.grad(baseline(layer, x, tol, 100).square().sum(), x)[0]
                    print(f"{threads:>3} {B:>3} {T:>6} {D:>4} {t['pn']:>8.1f} {t['base']:>8.1f} "
                          f"{t['base'] / t['pn']:>5.2f} {t['pn_fb']:>8.1f} {t['base_fb']:>8.1f} "
                          f"{t['base_fb'] / t['pn_fb']:>5.2f} {iterations:>9} {(out - ref).abs().max():>9.1e} "
                          f"{(g_ours - g_base).abs().max():>9.1e}")


if __name__ == "__main__":
    main()
