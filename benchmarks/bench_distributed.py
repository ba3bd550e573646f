"""Sequence parallelism over gloo on one machine: time per Newton iteration, what is
exchanged per iteration and the peak memory per rank, against the world size.

One GRU (hidden 64, B = 4, float32) solved by quasi-DEER with fixed_iterations (no host
reads) over a sequence split in time across P = 1, 2, 4 processes (1 thread each): with a
fixed total T (memory per rank should fall as 1/P) and with a fixed T per rank (the bytes
exchanged per iteration should not change with T). The peak is a training step's (forward
to tolerance and backward), in a process of its own. Per-iteration figures are differences
of two runs (4 and 12 iterations), so the call's fixed costs cancel. The forward + backward
time of a full solve (to tolerance) is reported beside.

    python benchmarks/bench_distributed.py [--total 32768] [--per-rank 8192]

A 2-core machine runs 4 processes on 2 cores: times at P = 4 measure oversubscription too.
"""
import argparse
import datetime
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, H = 4, 64


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank, world, port, T_rank, out_dir, memory, plain=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    import pnewton
    group = None if plain else dist.group.WORLD  # plain: one process, no shards
    torch.manual_seed(0)
    gi = torch.randn(B, T_rank, 3 * H)
    W = torch.randn(3 * H, H) * 0.5 / H ** 0.5
    b = torch.randn(3 * H) * 0.1
    s0 = torch.zeros(B, H)
    base = peak_rss_mib()
    if memory:  # a training step alone: its peak
        gi.requires_grad_()
        states, _ = pnewton.newton_rnn("gru", gi, W, b, s0, method="quasi_deer", group=group)
        states.sum().backward()
        torch.save(dict(peak_mib=peak_rss_mib() - base), os.path.join(out_dir, f"{rank}.pt"))
        dist.destroy_process_group()
        return

    def solve(n):
        dist.barrier()
        torch.ops.pnewton.shard_traffic(True)
        t0 = time.perf_counter()
        pnewton.newton_rnn("gru", gi, W, b, s0, method="quasi_deer", max_iter=n, fixed_iterations=True, group=group)
        seconds = time.perf_counter() - t0
        return seconds, torch.ops.pnewton.shard_traffic(True)

    solve(2)  # warm-up
    per_iteration = []
    for _ in range(3):
        (t4, c4), (t12, c12) = solve(4), solve(12)
        per_iteration.append((t12 - t4) / 8)
    collectives = (c12[0] - c4[0]) / 8
    exchanged = (c12[1] - c4[1]) / 8
    # A training step: the full solve to tolerance, then the backward.
    gi_g, W_g = gi.clone().requires_grad_(), W.clone().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    states, stats = pnewton.newton_rnn("gru", gi_g, W_g, b, s0, method="quasi_deer", group=group)
    states.sum().backward()
    train = time.perf_counter() - t0
    result = dict(rank=rank, iteration_ms=1e3 * statistics.median(per_iteration), collectives=collectives,
                  exchanged=exchanged, train_s=train,
                  iterations=int(stats.iterations.max()))
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def run(world, T_rank, memory=False, plain=False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The peak is measured with large blocks straight from mmap, returned on free: the peak RSS
    # is then the peak of live memory, not of what glibc's arenas kept (slower: timed apart).
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(worker, (world, port, T_rank, out, memory, plain), nprocs=world, join=True)
            return [torch.load(os.path.join(out, f"{r}.pt")) for r in range(world)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=32768)
    parser.add_argument("--per-rank", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    configs = [("no group", 1, args.total), ("no group", 1, args.per_rank)]
    configs += [("fixed total T", P, args.total // P) for P in (1, 2, 4)]
    configs += [("fixed T per rank", P, args.per_rank) for P in (1, 2, 4)]
    for mode, P, T_rank in configs:
        print(f"{mode}: P = {P}, T per rank = {T_rank} ...", flush=True)
        plain = mode == "no group"
        results = run(P, T_rank, plain=plain)
        peaks = run(P, T_rank, memory=True, plain=plain)
        worst = max(results, key=lambda r: r["iteration_ms"])
        rows.append((mode, P, T_rank * P, T_rank, worst["iteration_ms"], worst["collectives"], worst["exchanged"],
                     max(r["peak_mib"] for r in peaks), worst["train_s"], worst["iterations"]))
    print(f"\nGRU hidden {H}, B = {B}, float32, quasi_deer, gloo, 1 thread per rank")
    print(f"{'mode':<17} {'P':>2} {'T':>7} {'T/rank':>7} {'ms/iter':>8} {'coll/iter':>9} {'bytes/iter':>10} "
          f"{'peak MiB/rank':>13} {'fwd+bwd s':>9} {'iters':>5}")
    for mode, P, T, T_rank, ms, coll, exch, peak, train, its in rows:
        print(f"{mode:<17} {P:>2} {T:>7} {T_rank:>7} {ms:>8.2f} {coll:>9.1f} {exch:>10.0f} {peak:>13.0f} "
              f"{train:>9.2f} {its:>5}")


if __name__ == "__main__":
    main()
