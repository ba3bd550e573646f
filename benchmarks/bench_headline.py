"""The GPU headline of issue 26: B=16, D=64, T=65,536 (input size = hidden size).

    python benchmarks/bench_headline.py [--T 65536] [--B 16] [--D 64] [--repeats 10] [--cases ...]

For each case: median forward and forward+backward times (ms), the reference's (cuDNN
for GRU/LSTM, run over chunks of 32768 steps where it refuses the length in one call;
none for the diagonal layers: their loop is the :sequential cases), the speed-ups, peak device memory
of the forward+backward beyond what was live before (MB), the Newton iterations, and the
largest output error against the same layer solved in float64 (and, for GRU/LSTM, the
error of cuDNN in the same dtype against that float64 answer). The targets of issue 26:
DiagGRU forward <= 10 ms and forward+backward <= 20 ms (pararnn-torch's fused ParaGRU:
10.6 / 22.5 ms fp32, 7.3 / 14.0 ms bf16), GRU quasi_deer >= 10x cuDNN forward and >= 5x
forward+backward, peak memory <= 1.5x cuDNN's.
"""
import argparse
import time

import torch

import pnewton
from bench_layers import Chunked
from timing import median_seconds

# DiagGRU:sequential: the diag cells' one-pass loop (a thread per channel), which auto
# weighs against the solve on the CPU only until this measures it on a GPU.
CASES = ["DiagGRU:auto:float32", "DiagGRU:auto:bfloat16", "DiagGRU:sequential:float32", "GRU:quasi_deer:float32",
         "GRU:quasi_deer:bfloat16", "DiagLSTM:auto:float32", "DiagLSTM:sequential:float32", "LSTM:block_deer:float32"]


def make(kind, method, D, device, dtype):
    """(ours, reference or None) on the same weights, in dtype."""
    if kind.startswith("Diag"):
        return getattr(pnewton, kind)(D, D, batch_first=True, method=method).to(device, dtype), None
    ref = getattr(torch.nn, kind)(D, D, batch_first=True).to(device, dtype)
    return pnewton.from_torch(ref, method=method), ref


def peak_mb(fn):
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=CASES, help="layer:method:dtype")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cpu: to try the script")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later cases are skipped")
    args = parser.parse_args()
    B, D, T = args.B, args.D, args.T
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}; B={B} D={D} T={T}")
    print(f"{'case':<26} {'fwd ms':>7} {'ref':>7} {'x':>5} {'f+b ms':>7} {'ref':>7} {'x':>5} "
          f"{'MB':>6} {'ref MB':>6} {'iters':>5} {'err':>8} {'ref err':>8}")
    start = time.perf_counter()
    for case in args.cases:
        if time.perf_counter() - start > args.deadline:
            print(f"{case:<26} skipped (deadline)")
            continue
        kind, method, dtype_name = case.split(":")
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        try:
            ours, ref = make(kind, method, D, dev, dtype)
            x = torch.randn(B, T, D, device=dev, dtype=dtype)
            if ref is not None:
                ref.flatten_parameters()  # cuDNN's weights in one buffer (else it compacts them every call)
            chunked = Chunked(ref, 32768) if ref is not None and T > 32768 else ref
            with torch.no_grad():
                out = ours(x)[0]
                iters = int(ours.last_stats.iterations.max())
                # The float64 answer: the same weights solved in float64 (a parallel solve,
                # checked converged), against which both dtypes' errors are measured.
                exact = ours.to(torch.float64)
                truth = exact(x.double())[0]
                assert bool(exact.last_stats.converged.all()), "float64 reference did not converge"
                ours.to(dtype)
                err = (out.double() - truth).abs().max().item()
                ref_err = (chunked(x)[0].double() - truth).abs().max().item() if ref is not None else float("nan")
                del exact, truth, out

            def fwd(m):
                with torch.no_grad():
                    m(x)

            def fwd_bwd(m):
                m(x)[0].float().square().mean().backward()

            t = [median_seconds(lambda: fwd(ours), args.repeats, dev),
                 median_seconds(lambda: fwd_bwd(ours), args.repeats, dev)]
            mem = peak_mb(lambda: fwd_bwd(ours))
            if ref is not None:
                r = [median_seconds(lambda: fwd(chunked), args.repeats, dev),
                     median_seconds(lambda: fwd_bwd(chunked), args.repeats, dev)]
                ref_mem = peak_mb(lambda: fwd_bwd(chunked))
            else:
                r, ref_mem = [float("nan")] * 2, float("nan")
        except Exception as error:  # out of memory, or a failed case: report it, go on
            print(f"{case:<26} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        finally:
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(f"{case:<26} {1e3 * t[0]:7.2f} {1e3 * r[0]:7.2f} {r[0] / t[0]:5.1f} {1e3 * t[1]:7.2f} {1e3 * r[1]:7.2f} "
              f"{r[1] / t[1]:5.1f} {mem:6.0f} {ref_mem:6.0f} {iters:>5} {err:8.1e} {ref_err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
