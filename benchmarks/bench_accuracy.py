"""Accuracy at default options against a float64 sequential truth, beside torch.nn's own
error in the same dtype, with the iterations it took.

    python benchmarks/bench_accuracy.py            # the grid of the README (T up to 65,536)
    python benchmarks/bench_accuracy.py --quick    # T up to 2048

Each row: a 2-layer layer of hidden size 32 (default init; "x3": recurrent weights times 3,
a slower, more amplifying recurrence), B = 4. err = max |output − truth| over outputs and
final states; the truth is torch.nn's layer in float64.
"""
import argparse

import torch

import pnewton

CELLS = {"GRU": (torch.nn.GRU, pnewton.GRU, {}), "LSTM": (torch.nn.LSTM, pnewton.LSTM, {}),
         "RNN": (torch.nn.RNN, pnewton.RNN, {})}


def tensors(result):
    out, hidden = result
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def max_error(got, truth):
    return max(float((a.double() - b).abs().max()) for a, b in zip(tensors(got), tensors(truth)))


def row(name, scale, T, dtype, seed=0):
    torch_cls, ours_cls, kw = CELLS[name]
    torch.manual_seed(seed)
    ref = torch_cls(8, 32, num_layers=2, **kw)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.startswith("weight_hh"):
                p.mul_(scale)
    x = torch.randn(T, 4, 8)
    with torch.no_grad():
        truth = ref.double()(x.double())
        ours = pnewton.from_torch(ref).to(dtype)
        got = ours(x.to(dtype))
        stats = ours.last_stats
        ref_err = max_error(ref.to(dtype)(x.to(dtype)), truth)
    err = max_error(got, truth)
    # In float64 the truth is torch.nn's own answer: the bar is the difference itself.
    ratio = err / ref_err if dtype != torch.float64 and ref_err > 0 else float("nan")
    return dict(cell=name, scale=scale, T=T, dtype=str(dtype).replace("torch.", ""), err=err, torch_err=ref_err,
                ratio=ratio, iterations=int(stats.iterations.max()),
                method=stats.method, fallback=stats.fallback)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 2048")
    args = parser.parse_args()
    lengths = [1, 16, 256, 2048] + ([] if args.quick else [16384, 65536])
    print(f"{'cell':5} {'W_hh':>4} {'T':>6} {'dtype':8} {'error':>9} {'torch.nn':>9} {'ratio':>7} {'iters':>5} "
          f"{'method':24} fallback", flush=True)
    worst = worst64 = 0.0
    for dtype in (torch.float32, torch.float64):
        for name in CELLS:
            for scale in (1, 3):
                for T in lengths:
                    r = row(name, scale, T, dtype)
                    if dtype == torch.float32:
                        worst = max(worst, r["ratio"])
                    else:
                        worst64 = max(worst64, r["err"])
                    print(f"{r['cell']:5} {'x' + str(r['scale']):>4} {r['T']:>6} {r['dtype']:8} {r['err']:9.2e} "
                          f"{r['torch_err']:9.2e} {r['ratio']:7.1f} {r['iterations']:>5} {r['method']:24} "
                          f"{r['fallback']}", flush=True)
    print(f"worst float32 error / torch.nn's: {worst:.1f}x; worst float64 difference from torch.nn: {worst64:.1e}")


if __name__ == "__main__":
    main()
