"""pnewton's building block: a linear recurrence solved by a parallel scan.

Fits the per-channel decay and input gain of a linear recurrent filter
x_t = a ⊙ x_{t-1} + g ⊙ u_t to the output of a hidden "true" filter, by gradient
descent through pnewton.scan_diag (whose backward is itself a reverse scan). It then
checks the scan against a step-by-step loop and times both.

    python examples/scan_demo.py [--steps 200] [--T 2048]
"""
import argparse
import time

import torch

import pnewton


def loop_filter(a, b):
    x, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        x = a[:, t] * x + b[:, t]
        out.append(x)
    return torch.stack(out, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    B, T, D = 8, args.T, args.channels

    true_decay = torch.linspace(0.5, 0.99, D)
    true_gain = torch.linspace(2.0, 0.1, D)
    u = torch.randn(B, T, D)
    target = pnewton.scan_diag(true_decay.expand(B, T, D), true_gain * u)

    # Parameters in unconstrained form: decay = sigmoid(p), so it stays in (0, 1).
    decay_logit = torch.zeros(D, requires_grad=True)
    log_gain = torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([decay_logit, log_gain], lr=0.05)
    print(f"fitting a {D}-channel linear recurrent filter on B={B}, T={T} with pnewton.scan_diag")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        a = torch.sigmoid(decay_logit).expand(B, T, D)
        x = pnewton.scan_diag(a, log_gain.exp() * u)
        loss = (x - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 10) == 0:
            bar = "#" * (30 * step // args.steps)
            print(f"  [{bar:<30}] step {step:4d}/{args.steps}  loss {loss.item():.3e}", flush=True)
    print(f"trained in {time.perf_counter() - start:.1f}s; "
          f"max decay error {(torch.sigmoid(decay_logit) - true_decay).abs().max().item():.2e}, "
          f"max gain error {(log_gain.exp() - true_gain).abs().max().item():.2e}")

    with torch.no_grad():
        a = torch.sigmoid(decay_logit).expand(B, T, D).contiguous()
        b = (log_gain.exp() * u).contiguous()
        t0 = time.perf_counter()
        x_scan = pnewton.scan_diag(a, b)
        t1 = time.perf_counter()
        x_loop = loop_filter(a, b)
        t2 = time.perf_counter()
    print(f"scan vs step-by-step loop: max |difference| {(x_scan - x_loop).abs().max().item():.2e}; "
          f"scan {1e3 * (t1 - t0):.2f} ms, loop {1e3 * (t2 - t1):.1f} ms")


if __name__ == "__main__":
    main()
