"""CPU scan speed against copying the same input bytes (clone), fp32, one process.

    python benchmarks/bench_scan_cpu.py [--repeats 20] [--threads N]

For each case it times the scan and `clone()` of every input tensor, and reports
scan time / copy time (1.0 = the scan runs at copy speed; a scan reads its inputs
once and writes one output, so about 1 is the memory-bound floor).
"""
import argparse
import platform
import statistics
import time

import torch

import pnewton


def median_seconds(fn, repeats):
    fn()  # warm-up: first-touch page faults and thread-pool start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(B, T, D):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(B, T, D, generator=gen)
    b = torch.randn(B, T, D, generator=gen)
    yield f"scan_diag B={B} T={T} D={D}", lambda: pnewton.scan_diag(a, b), (a, b)
    for k in (2, 4, 8):
        H = D // k
        A = torch.randn(B, T, H, k, k, generator=gen) / k
        bb = torch.randn(B, T, H, k, generator=gen)
        yield f"scan_block k={k} B={B} T={T} H={H}", lambda A=A, bb=bb: pnewton.scan_block(A, bb), (A, bb)
    a1, b1 = torch.rand(1, 1 << 20, 1, generator=gen), torch.randn(1, 1 << 20, 1, generator=gen)
    yield "scan_diag B=1 T=1048576 D=1 (time-chunked)", lambda: pnewton.scan_diag(a1, b1), (a1, b1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--D", type=int, default=256)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"{'case':<46} {'scan ms':>9} {'copy ms':>9} {'scan/copy':>9}")
    for name, scan, inputs in cases(args.B, args.T, args.D):
        t_scan = median_seconds(scan, args.repeats)
        t_copy = median_seconds(lambda: [t.clone() for t in inputs], args.repeats)
        print(f"{name:<46} {1e3 * t_scan:9.2f} {1e3 * t_copy:9.2f} {t_scan / t_copy:9.2f}", flush=True)


if __name__ == "__main__":
    main()
