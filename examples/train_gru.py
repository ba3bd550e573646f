"""The main job: train a pnewton.GRU on a small generated task, on the CPU.

Task: a stream of noisy ±1 bits; at every step predict a leaky running average of the
clean bits (y_t = 0.95 y_{t-1} + 0.05 b_t), which needs memory over ~20 steps. The GRU is
evaluated by parallel quasi-Newton (quasi-DEER) iterations over the whole sequence;
gradients come from the exact adjoint scan. At the end the trained weights are loaded
into torch.nn.GRU to show both give the same outputs.

    python examples/train_gru.py [--steps 150] [--T 512] [--method quasi_deer]
"""
import argparse
import time

import torch
from torch import nn

import pnewton


def make_batch(B, T, gen):
    bits = torch.randint(0, 2, (B, T, 1), generator=gen).float() * 2 - 1
    noisy = bits + 0.5 * torch.randn(B, T, 1, generator=gen)
    target = pnewton.scan_diag(torch.full((B, T, 1), 0.95), 0.05 * bits)  # the leaky average
    return noisy, target


class Model(nn.Module):
    def __init__(self, hidden, method):
        super().__init__()
        self.rnn = pnewton.GRU(1, hidden, batch_first=True, method=method)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=24)
    parser.add_argument("--method", default="quasi_deer", choices=["quasi_deer", "deer", "jacobi", "sequential"])
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Model(args.hidden, args.method)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    print(f"training pnewton.GRU(1, {args.hidden}) with method={args.method} on T={args.T}, "
          f"batch {args.batch}, {args.steps} steps")
    start, first_loss = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch, args.T, gen)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first_loss = first_loss or loss.item()
        if step == 1 or step % max(1, args.steps // 15) == 0 or step == args.steps:
            stats = model.rnn.last_stats
            bar = "#" * (30 * step // args.steps)
            print(f"  [{bar:<30}] step {step:4d}/{args.steps}  loss {loss.item():.4e}  "
                  f"newton iterations {int(stats.iterations.max()):2d}/{args.T}  "
                  f"{'converged' if bool(stats.converged.all()) else 'NOT converged'}"
                  f"{' (fallback ran)' if stats.fallback else ''}", flush=True)
    print(f"loss {first_loss:.4e} -> {loss.item():.4e} in {time.perf_counter() - start:.1f}s")

    reference = nn.GRU(1, args.hidden, batch_first=True)
    reference.load_state_dict(model.rnn.state_dict())
    x, _ = make_batch(4, args.T, gen)
    with torch.no_grad():
        ours, theirs = model.rnn(x)[0], reference(x)[0]
    print(f"agreement with torch.nn.GRU on the trained weights: max |difference| "
          f"{(ours - theirs).abs().max().item():.2e} (float32; default tolerance 3e-7 on the Newton step)")


if __name__ == "__main__":
    main()
