"""pnewton layers against torch.nn as a drop-in user meets them: the same layer (from_torch)
and input, default options, in one process. Inference (forward under no_grad) and a training
step (forward + backward), median of 5 calls (more for short calls: 50 ms of them) after one warm-up call (which, for the layers'
auto, is the call that measures its choice), torch.nn and pnewton interleaved twice.
Prints the time ratio pnewton / torch.nn and the path auto took.

    python benchmarks/bench_dropin.py THREADS [grid]

grid: instead of the named cases, single-layer GRU/LSTM/RNN over T 16, 256, 4096, B 1 and 16,
hidden 16 and 128 (input size = hidden), float32; the worst ratio is printed last.
"""
import statistics
import sys
import time

import torch

import pnewton

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)

# (name, torch.nn layer, B, T, dtype): the issue's shapes and three training scripts' shapes.
CASES = [
    ("GRU x2, one long sequence", lambda: torch.nn.GRU(64, 64, num_layers=2), 1, 4096, torch.float32),
    ("GRU x2", lambda: torch.nn.GRU(32, 32, num_layers=2), 16, 256, torch.float32),
    ("GRU x2, word LM (bptt 35)", lambda: torch.nn.GRU(200, 200, num_layers=2), 20, 35, torch.float32),
    ("LSTM x2 bidirectional, sentiment", lambda: torch.nn.LSTM(64, 64, num_layers=2, bidirectional=True), 64, 128,
     torch.float32),
    ("LSTM x2, time series float64", lambda: torch.nn.LSTM(1, 51, num_layers=2), 21, 299, torch.float64),
]
if sys.argv[2:] == ["grid"]:
    CASES = [(f"{kind} hidden {D}", (lambda kind=kind, D=D: getattr(torch.nn, kind)(D, D)), B, T, torch.float32)
             for kind in ("GRU", "LSTM", "RNN") for D in (16, 128) for B in (1, 16) for T in (16, 256, 4096)]


def median_time(call):
    """Median of at least 5 calls, and of as many as fill 50 ms (sub-millisecond calls)."""
    call()
    times = []
    while len(times) < 5 or (sum(times) < 0.05 and len(times) < 500):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inference(layer, x):
    def call():
        with torch.no_grad():
            layer(x)
    return call


def training(layer, x):
    def call():
        out, _ = layer(x)
        out.square().mean().backward()
    return call


print(f"threads {sys.argv[1]}")
worst = (0.0, "")
for name, make, B, T, dtype in CASES:
    ref = make().to(dtype)
    ours = pnewton.from_torch(ref)
    x = torch.randn(T, B, ref.input_size, dtype=dtype)
    for mode, wrap in (("inference", inference), ("training", training)):
        r = [median_time(wrap(ref, x)), median_time(wrap(ours, x)), median_time(wrap(ref, x)),
             median_time(wrap(ours, x))]
        ratio = (r[1] + r[3]) / (r[0] + r[2])
        print(f"{name}, B={B} T={T} {mode}: torch.nn {1e3 * (r[0] + r[2]) / 2:.1f} ms, "
              f"pnewton {1e3 * (r[1] + r[3]) / 2:.1f} ms, ratio {ratio:.2f}x, path {ours.last_stats.method}",
              flush=True)
        worst = max(worst, (ratio, f"{name}, B={B} T={T} {mode}"))
print(f"worst ratio {worst[0]:.2f}x: {worst[1]}")
