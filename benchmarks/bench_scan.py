"""Scan speed against copying the same input bytes (clone), fp32, one process.

    python benchmarks/bench_scan.py [--device cpu|cuda] [--repeats 20] [--threads N]

For each case it times the scan and `clone()` of every input tensor, and reports
scan time / copy time (1.0 = the scan runs at copy speed; a scan reads its inputs
once and writes one output, so about 1 is the memory-bound floor).
"""
import argparse
import platform
import torch

import pnewton
from timing import median_seconds


def cases(B, T, D, device):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, normal=True):
        t = torch.randn(*shape, generator=gen) if normal else torch.rand(*shape, generator=gen)
        return t.to(device)

    a = rand(B, T, D, normal=False)
    b = rand(B, T, D)
    yield f"scan_diag B={B} T={T} D={D}", lambda: pnewton.scan_diag(a, b), (a, b)
    for k in (2, 4, 8):
        H = D // k
        A = rand(B, T, H, k, k) / k
        bb = rand(B, T, H, k)
        yield f"scan_block k={k} B={B} T={T} H={H}", lambda A=A, bb=bb: pnewton.scan_block(A, bb), (A, bb)
    a1, b1 = rand(1, 1 << 20, 1, normal=False), rand(1, 1 << 20, 1)
    yield "scan_diag B=1 T=1048576 D=1 (time-chunked)", lambda: pnewton.scan_diag(a1, b1), (a1, b1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--D", type=int, default=256)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"device: {where}, torch {torch.__version__}")
    print(f"{'case':<46} {'scan ms':>9} {'copy ms':>9} {'scan/copy':>9}")
    for name, scan, inputs in cases(args.B, args.T, args.D, args.device):
        t_scan = median_seconds(scan, args.repeats, args.device)
        t_copy = median_seconds(lambda: [t.clone() for t in inputs], args.repeats, args.device)
        print(f"{name:<46} {1e3 * t_scan:9.2f} {1e3 * t_copy:9.2f} {t_scan / t_copy:9.2f}", flush=True)


if __name__ == "__main__":
    main()
