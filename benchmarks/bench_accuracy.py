"""Accuracy at default options against a float64 sequential truth, beside torch.nn's own
error in the same dtype, with the iterations it took.

    python benchmarks/bench_accuracy.py            # the grid of the README (T up to 65,536)
    python benchmarks/bench_accuracy.py --quick    # T up to 2048

Each row: a 2-layer layer of hidden size 32 (default init; "x3": recurrent weights times 3,
a slower, more amplifying recurrence), B = 4. error = max |output − truth| over outputs and
final states, the truth being torch.nn's layer in float64; grad = the same for the
gradients of Σ output · g (g fixed, random) with respect to the input and every
parameter. "torch.nn" columns: torch.nn's own error in the same dtype. Iterations are the
largest over the stack and the batch.
"""
import argparse

import torch

import pnewton

CELLS = {"GRU": (torch.nn.GRU, pnewton.GRU, {}), "LSTM": (torch.nn.LSTM, pnewton.LSTM, {}),
         "RNN": (torch.nn.RNN, pnewton.RNN, {})}


def tensors(result):
    out, hidden = result
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def flat_result(result):
    out, rest = result
    return [out, *rest]


def max_error(got, truth):
    return max(float((a.double() - b).abs().max()) for a, b in zip(flat_result(got), flat_result(truth)))


def outputs_and_gradients(layer, x, dtype, cotangent):
    x = x.to(dtype).requires_grad_(True)
    result = layer.to(dtype)(x)
    grads = torch.autograd.grad((result[0] * cotangent.to(dtype)).sum(), [x, *layer.parameters()])
    return tuple(t.detach() for t in tensors(result)), grads


def grad_error(grads, truth):
    return max(float((a.double() - b).abs().max()) for a, b in zip(grads, truth))


def row(name, scale, T, dtype, seed=0):
    torch_cls, ours_cls, kw = CELLS[name]
    torch.manual_seed(seed)
    ref = torch_cls(8, 32, num_layers=2, **kw)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.startswith("weight_hh"):
                p.mul_(scale)
    x, g = torch.randn(T, 4, 8), torch.randn(T, 4, 32)
    ours = pnewton.from_torch(ref)
    truth, truth_grads = outputs_and_gradients(ref, x, torch.float64, g)
    got, grads = outputs_and_gradients(ours, x, dtype, g)
    stats = ours.last_stats
    ref_out, ref_grads = outputs_and_gradients(ref, x, dtype, g)
    ref_err = max_error((ref_out[0], ref_out[1:]), (truth[0], truth[1:]))
    err = max_error((got[0], got[1:]), (truth[0], truth[1:]))
    g_err, g_ref_err = grad_error(grads, truth_grads), grad_error(ref_grads, truth_grads)
    # In float64 the truth is torch.nn's own answer: the bar is the difference itself.
    ratio = err / ref_err if dtype != torch.float64 and ref_err > 0 else float("nan")
    return dict(cell=name, scale=scale, T=T, dtype=str(dtype).replace("torch.", ""), err=err, torch_err=ref_err,
                ratio=ratio, g_err=g_err, g_torch_err=g_ref_err, iterations=int(stats.iterations.max()),
                method=stats.method, fallback=stats.fallback)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 2048")
    args = parser.parse_args()
    lengths = [1, 16, 256, 2048] + ([] if args.quick else [16384, 65536])
    print(f"{'cell':5} {'W_hh':>4} {'T':>6} {'dtype':8} {'error':>9} {'torch.nn':>9} {'ratio':>7} {'grad':>9} "
          f"{'torch.nn':>9} {'ratio':>7} {'iters':>5} {'method':24} fallback", flush=True)
    worst = worst64 = worst_grad = 0.0
    for dtype in (torch.float32, torch.float64):
        for name in CELLS:
            for scale in (1, 3):
                for T in lengths:
                    r = row(name, scale, T, dtype)
                    g_ratio = r["g_err"] / r["g_torch_err"] if dtype == torch.float32 else float("nan")
                    if dtype == torch.float32:
                        worst, worst_grad = max(worst, r["ratio"]), max(worst_grad, g_ratio)
                    else:
                        worst64 = max(worst64, r["err"])
                    print(f"{r['cell']:5} {'x' + str(r['scale']):>4} {r['T']:>6} {r['dtype']:8} {r['err']:9.2e} "
                          f"{r['torch_err']:9.2e} {r['ratio']:7.1f} {r['g_err']:9.2e} {r['g_torch_err']:9.2e} "
                          f"{g_ratio:7.1f} {r['iterations']:>5} {r['method']:24} {r['fallback']}", flush=True)
    print(f"worst float32 error / torch.nn's: outputs {worst:.1f}x, gradients {worst_grad:.1f}x; "
          f"worst float64 difference from torch.nn: {worst64:.1e}")


if __name__ == "__main__":
    main()
