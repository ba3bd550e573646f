"""pnewton layers against torch.nn's sequential layers: time, Newton iterations, agreement.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--T 1024 8192] [--D 16 64]

For each (layer, method, B, D, T) it reports the median forward and forward+backward
times of pnewton and of torch.nn (cuDNN on a GPU), the speed-up, the Newton iterations
and the largest difference between the two outputs (fp32).
"""
import argparse
import torch

import pnewton
from timing import median_seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--B", type=int, nargs="+", default=[16])
    parser.add_argument("--D", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--layers", nargs="+", default=["GRU:quasi_deer", "GRU:deer", "LSTM:block_deer"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'layer':<16} {'B':>3} {'D':>4} {'T':>7} {'fwd ms':>9} {'nn fwd':>9} {'x':>6} "
          f"{'f+b ms':>9} {'nn f+b':>9} {'x':>6} {'iters':>5} {'max|diff|':>9}")
    for spec in args.layers:
        kind, method = spec.split(":")
        for B in args.B:
            for D in args.D:
                for T in args.T:
                    torch.manual_seed(0)
                    ref = getattr(torch.nn, kind)(D, D, batch_first=True).to(dev)
                    ours = pnewton.from_torch(ref, method=method)
                    x = torch.randn(B, T, D, device=dev)
                    with torch.no_grad():
                        diff = (ours(x)[0] - ref(x)[0]).abs().max().item()
                    iters = int(ours.last_stats.iterations.max())

                    def fwd(m):
                        with torch.no_grad():
                            m(x)

                    def fwd_bwd(m):
                        m(x)[0].square().mean().backward()

                    t = [median_seconds(lambda: f(m), args.repeats, dev) for f in (fwd, fwd_bwd) for m in (ours, ref)]
                    print(f"{spec:<16} {B:>3} {D:>4} {T:>7} {1e3 * t[0]:9.1f} {1e3 * t[1]:9.1f} {t[1] / t[0]:6.2f} "
                          f"{1e3 * t[2]:9.1f} {1e3 * t[3]:9.1f} {t[3] / t[2]:6.2f} {iters:>5} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    main()
