"""pnewton layers against sequential layers: time, peak memory, Newton iterations, agreement.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--B 16] [--D 16 64] [--T 1024 8192]
        [--layers GRU:quasi_deer LSTM:block_deer DiagGRU:auto] [--deadline 300] [--adjoint auto]

GRU/LSTM/RNN run against torch.nn on the same weights (cuDNN on a GPU); DiagGRU/DiagLSTM
against the same layer with method="sequential" (their own step-by-step loop). For each
(layer, method, B, D, T): median forward and forward+backward times of both and the
speed-ups (a torch.nn layer that cuDNN refuses at length T runs over chunks of
T, the state carried: noted in the row), peak memory of the forward+backward (CUDA), the Newton iterations and the
largest difference between the two outputs (fp32). Runs slower than a second are timed
once; cases after --deadline seconds are skipped and listed.
"""
import argparse
import time

import torch

import pnewton
from timing import median_seconds


class Chunked(torch.nn.Module):
    """A torch.nn layer run over consecutive time chunks, the state carried between them:
    the same sequential computation, for lengths cuDNN refuses in one call
    (CUDNN_STATUS_NOT_SUPPORTED on long sequences)."""

    def __init__(self, layer, chunk):
        super().__init__()
        self.layer, self.chunk = layer, chunk

    def forward(self, x):
        outputs, state = [], None
        for part in x.split(self.chunk, dim=1):
            out, state = self.layer(part, state)
            outputs.append(out)
        return torch.cat(outputs, 1), state


def sequential_reference(ref, x):
    """ref, or ref over the longest power-of-two chunks it accepts, and the chunk length."""
    T = x.shape[1]
    chunk = T
    while True:
        try:
            with torch.no_grad():
                (ref if chunk == T else Chunked(ref, chunk))(x[:, :chunk])
            return (ref if chunk == T else Chunked(ref, chunk)), chunk
        except RuntimeError as error:
            if "CUDNN_STATUS_NOT_SUPPORTED" not in str(error) or chunk <= 1024:
                raise
            chunk //= 2


def layers(kind, D, method, x, adjoint="auto"):
    """(ours, reference, reference chunk length) on the same weights."""
    device, T = x.device, x.shape[1]
    if kind.startswith("Diag"):
        ours = getattr(pnewton, kind)(D, D, batch_first=True, method=method, adjoint=adjoint).to(device)
        ref = getattr(pnewton, kind)(D, D, batch_first=True, method="sequential").to(device)
        ref.load_state_dict(ours.state_dict())
        return ours, ref, T
    ref = getattr(torch.nn, kind)(D, D, batch_first=True).to(device)
    return (pnewton.from_torch(ref, method=method, adjoint=adjoint), *sequential_reference(ref, x))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")
FUSED_OPS = ("pnewton::fused_cell_pass", "pnewton::newton_update")


def iteration_split(layer, x, iterations):
    """ms per Newton iteration of one forward: (GEMM, fused passes, scans, rest)."""
    import warnings
    from torch.profiler import ProfilerActivity, profile
    warnings.filterwarnings("ignore", message=".*Profiler clears events")
    cuda = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        layer(x)
        if cuda:
            torch.cuda.synchronize()
    split = {"gemm": 0.0, "fused": 0.0, "scan": 0.0, "total": 0.0}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        split["total"] += us
        if event.key in GEMM_OPS:
            split["gemm"] += us
        elif event.key in FUSED_OPS:
            split["fused"] += us
        elif event.key.startswith("pnewton::scan_"):
            split["scan"] += us
    rest = split["total"] - split["gemm"] - split["fused"] - split["scan"]
    return [v / 1e3 / max(iterations, 1) for v in (split["gemm"], split["fused"], split["scan"], rest)]


def iteration_traffic(kind, method, B, T, D, itemsize=4):
    """(MiB moved per Newton iteration by the solver's passes, the least an iteration can
    move) for a GRU/LSTM/RNN layer whose input size is D, in numbers of N = B·T rows: G gate
    pre-activations, S state numbers (LSTM: h and c), S_h of them the GEMM reads, S_J Jacobian
    numbers the scan reads (quasi_deer: S, block_deer: 2S).
    Passes: GEMM S_h in, G out; fused pass gi, W_hh h (G each), the states in (S: each row
    reads its own and, in place, the previous one), F, r and J out (2S + S_J); the scan J, r
    in, δ out; the update s, δ in, next out (3S).
    Least: gi in, W_hh h out and in (3G), h in to the GEMM (S_h), the states in once (S), J and
    r out and back in (2S + 2S_J), the next states out (S)."""
    gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[kind]
    S = 2 * D if kind == "LSTM" else D
    G, S_h, S_J = gates * D, D, 2 * S if method == "block_deer" else S
    ours = (S_h + G) + (2 * G + S + 2 * S + S_J) + (S_J + 2 * S) + 3 * S
    least = 3 * G + S_h + S + 2 * S + 2 * S_J + S
    rows = B * T * itemsize / 2**20
    return ours * rows, least * rows


def timed(fn, repeats, device):
    """(median seconds, peak MB allocated beyond what was live before; CUDA only). A run
    slower than a second is timed once."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if seconds <= 1.0:
        seconds = median_seconds(fn, repeats, device, warm_up=False)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return seconds, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--B", type=int, nargs="+", default=[16])
    parser.add_argument("--D", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--layers", nargs="+", default=["GRU:quasi_deer", "GRU:deer", "LSTM:block_deer"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later cases are skipped")
    parser.add_argument("--tag", default="", help="appended to the layer column (e.g. a variant's name)")
    parser.add_argument("--adjoint", default="auto", choices=["auto", "scan", "iterative", "sequential"])
    parser.add_argument("--split", action="store_true", help="per-iteration time split and traffic (see above)")
    args = parser.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'layer':<16} {'B':>3} {'D':>4} {'T':>7} {'fwd ms':>9} {'ref fwd':>9} {'x':>6} "
          f"{'f+b ms':>9} {'ref f+b':>9} {'x':>6} {'MB':>7} {'ref MB':>7} {'iters':>5} {'max|diff|':>9}")
    start, skipped = time.perf_counter(), []
    for spec in args.layers:
        kind, method = spec.split(":")
        label = spec + args.tag
        for B in args.B:
            for D in args.D:
                for T in args.T:
                    if time.perf_counter() - start > args.deadline:
                        skipped.append(f"{spec} B={B} D={D} T={T}")
                        continue
                    torch.manual_seed(0)
                    x = torch.randn(B, T, D, device=dev)
                    try:
                        ours, ref, chunk = layers(kind, D, method, x, args.adjoint)
                        with torch.no_grad():
                            diff = (ours(x)[0] - ref(x)[0]).abs().max().item()
                        iters = int(ours.last_stats.iterations.max())

                        def fwd(m):
                            with torch.no_grad():
                                m(x)

                        def fwd_bwd(m):
                            m(x)[0].square().mean().backward()

                        t = [timed(lambda: fwd(m), args.repeats, dev)[0] for m in (ours, ref)]
                        if method == "auto":  # its first call with grad measures its paths (auto_plan.h)
                            fwd_bwd(ours)
                        (t_ours, mem_ours), (t_ref, mem_ref) = (timed(lambda: fwd_bwd(m), args.repeats, dev)
                                                                for m in (ours, ref))
                        t += [t_ours, t_ref]
                        mem = [mem_ours, mem_ref]
                    except torch.OutOfMemoryError:
                        print(f"{label:<16} {B:>3} {D:>4} {T:>7} out of memory", flush=True)
                        continue
                    finally:
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                    print(f"{label:<16} {B:>3} {D:>4} {T:>7} {1e3 * t[0]:9.1f} {1e3 * t[1]:9.1f} {t[1] / t[0]:6.1f} "
                          f"{1e3 * t[2]:9.1f} {1e3 * t[3]:9.1f} {t[3] / t[2]:6.1f} {mem[0]:7.0f} {mem[1]:7.0f} "
                          f"{iters:>5} {diff:9.1e}" + ("" if chunk == T else f"  (ref in chunks of {chunk})"), flush=True)
                    if args.split and not kind.startswith("Diag"):
                        gemm, fused, scan, rest = iteration_split(ours, x, iters)
                        line = f"  per iteration ms: GEMM {gemm:.2f}, fused passes {fused:.2f}, scan {scan:.2f}, rest {rest:.2f}"
                        if method in ("quasi_deer", "block_deer"):
                            moved, least = iteration_traffic(kind, method, B, T, D)
                            line += f"; traffic {moved:.1f} MiB vs least {least:.1f} MiB ({moved / least:.2f}x)"
                        print(line, flush=True)
    if skipped:
        print(f"skipped after the {args.deadline:.0f} s deadline: " + ", ".join(skipped))


if __name__ == "__main__":
    main()
