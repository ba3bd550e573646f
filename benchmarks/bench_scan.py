"""Scan bandwidth against the device's own copy bandwidth, one process.

    python benchmarks/bench_scan.py [--device cpu|cuda] [--B 16] [--T 65536] [--D 256]

A scan must read A and b once and write x once; those bytes over the scan's time are its
bandwidth. The ceiling is a large device-to-device copy measured in the same run (bytes
read + bytes written over its time). The table gives both and their ratio, and the peak
memory of each scan beyond its inputs and output (its scratch). On CUDA, scans of blocks
k <= 2 run with both algorithms (PNEWTON_CUDA_SCAN=single_pass, chunked), and the main
diagonal case also with 8 and 32 steps per thread (PNEWTON_SINGLE_PASS_STEPS; 16 is the default).
"""
import argparse
import os
import platform

import torch

import pnewton
from timing import median_seconds


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth(device, repeats):
    """Bytes read + written per second by clone() of a 1 GiB (CUDA) / 256 MiB (CPU) tensor."""
    n = (1 << 28) if device == "cuda" else (1 << 26)
    src = torch.rand(n, device=device)
    seconds = median_seconds(lambda: src.clone(), repeats, device)
    return 2 * nbytes(src) / seconds


def cases(B, T, D, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, normal=True, dtype=torch.float32):
        draw = torch.randn if normal else torch.rand
        return draw(*shape, generator=gen, device=device).to(dtype)

    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        a, b = rand(B, T, D, normal=False, dtype=dtype), rand(B, T, D, dtype=dtype)
        tag = "" if dtype == torch.float32 else " bf16"
        yield f"scan_diag{tag} B={B} T={T} D={D}", lambda a=a, b=b: pnewton.scan_diag(a, b), (a, b)
        yield f"scan_diag{tag} reverse", lambda a=a, b=b: pnewton.scan_diag(a, b, reverse=True), (a, b)
    for k in (2, 4, 8):
        H = D // k
        A, bb = rand(B, T, H, k, k) / k, rand(B, T, H, k)
        yield f"scan_block k={k} H={H}", lambda A=A, bb=bb: pnewton.scan_block(A, bb), (A, bb)
        if k == 2:
            yield f"scan_block k={k} reverse transpose", \
                lambda A=A, bb=bb: pnewton.scan_block(A, bb, reverse=True, transpose=True), (A, bb)
    a1, b1 = rand(1, 1 << 24, 1, normal=False), rand(1, 1 << 24, 1)
    yield "scan_diag B=1 T=16777216 D=1 (time-chunked)", lambda: pnewton.scan_diag(a1, b1), (a1, b1)


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
    cuda = args.device == "cuda"
    where = (torch.cuda.get_device_name() if cuda
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    copy_bw = copy_bandwidth(args.device, args.repeats)
    print(f"device: {where}, torch {torch.__version__}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'case':<46} {'algorithm':<14} {'ms':>8} {'GB/s':>7} {'of copy':>7} {'scratch MB':>10}")
    for name, scan, inputs in cases(args.B, args.T, args.D, args.device):
        k = inputs[0].shape[-1] if inputs[0].dim() == 5 else 1
        algorithms = ["single_pass", "chunked"] if cuda and k <= 2 else ["chunked" if cuda else "cpu"]
        if cuda and name.startswith("scan_diag B="):  # the steps per thread of the single pass
            algorithms[1:1] = ["single_pass:8", "single_pass:32"]
        for algorithm in algorithms:
            kind, _, steps = algorithm.partition(":")
            os.environ["PNEWTON_CUDA_SCAN"] = kind if cuda else "auto"
            os.environ["PNEWTON_SINGLE_PASS_STEPS"] = steps or "0"
            run_case(name, algorithm, scan, inputs, cuda, copy_bw, args)
    os.environ.pop("PNEWTON_CUDA_SCAN", None)
    os.environ.pop("PNEWTON_SINGLE_PASS_STEPS", None)


def run_case(name, algorithm, scan, inputs, cuda, copy_bw, args):
    out = scan()
    scratch_text = f"{'-':>10}"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        scan()
        torch.cuda.synchronize()
        scratch_text = f"{(torch.cuda.max_memory_allocated() - base - nbytes(out)) / 2**20:10.1f}"
    seconds = median_seconds(scan, args.repeats, args.device, warm_up=False)
    bw = nbytes(*inputs, out) / seconds
    print(f"{name:<46} {algorithm:<14} {1e3 * seconds:8.3f} {bw / 1e9:7.0f} {bw / copy_bw:7.2f} {scratch_text}",
          flush=True)


if __name__ == "__main__":
    main()
