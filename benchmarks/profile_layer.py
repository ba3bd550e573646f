"""Where one pnewton layer's time goes: the kernels of a forward (and optionally a
backward) by total time, from torch.profiler, with the Newton iterations it took.

    python benchmarks/profile_layer.py [--device cuda] [--layer GRU:quasi_deer] [--B 16] [--D 64] [--T 65536]
        [--backward] [--dtype bfloat16]

--layer is a torch.nn kind (GRU, LSTM, RNN: the torch.nn layer's weights through from_torch)
or a pnewton one (DiagGRU, DiagLSTM), then the method.

On CUDA the table is device time per kernel (the gate kernel, the GEMM, the scans, the
ATen element-wise passes of each iteration); on the CPU it is operator time. Use it
before optimising: the largest rows are the next thing to fuse or remove.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import pnewton


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layer", default="GRU:quasi_deer")
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--backward", action="store_true", help="profile forward+backward")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = parser.parse_args()
    kind, method = args.layer.split(":")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if kind.startswith("Diag"):
        layer = getattr(pnewton, kind)(args.D, args.D, batch_first=True, method=method)
    else:
        layer = pnewton.from_torch(getattr(torch.nn, kind)(args.D, args.D, batch_first=True), method=method)
    layer = layer.to(args.device, dtype)
    x = torch.randn(args.B, args.T, args.D, device=args.device, dtype=dtype)

    def run():
        if args.backward:
            layer(x)[0].square().mean().backward()
        else:
            with torch.no_grad():
                layer(x)

    run()  # warm-up: allocator, handles, module load
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    iterations = int(layer.last_stats.iterations.max())
    print(f"{args.layer} B={args.B} D={args.D} T={args.T} on {args.device}"
          f"{' (forward+backward)' if args.backward else ''}: {iterations} Newton iterations, {layer.last_stats.method}")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if cuda:
        # Host synchronisations (each a device-to-host read) and allocations of the call.
        events = {e.key: e.count for e in prof.key_averages()}
        syncs = sum(n for k, n in events.items() if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        copies = sum(n for k, n in events.items() if k.startswith("cudaMemcpy"))
        print(f"host syncs {syncs}, cudaMemcpy calls {copies}, kernel launches "
              f"{sum(n for k, n in events.items() if k in ('cudaLaunchKernel', 'cudaLaunchKernelExC'))}")


if __name__ == "__main__":
    main()
