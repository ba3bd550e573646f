"""Train a pnewton.GRU on one long sequence split in time across processes.

    torchrun --nproc_per_node 4 examples/train_gru_distributed.py [--T 8192] [--steps 40]

The task of examples/train_gru.py (predict a leaky running average of noisy ±1 bits) on a
batch of sequences of T steps, each rank holding a contiguous time shard of every sequence
(pnewton.distributed.shard). The GRU's Newton iterations run across the shards (the scans
exchange one summary per shard, convergence is one all-reduce per iteration); DDP over the
same group adds up the shards' parameter gradients. At the end every rank checks its shard
of the trained model's output against torch.nn.GRU run over the whole sequence.
Runs on the CPU with gloo (1 thread per process); --device cuda uses NCCL, one GPU per rank.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pnewton
from train_gru import make_batch  # the task of examples/train_gru.py (this folder is on sys.path)


class Model(nn.Module):
    def __init__(self, hidden, group):
        super().__init__()
        self.rnn = pnewton.GRU(1, hidden, batch_first=True, method="quasi_deer", sequence_group=group)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --nproc_per_node 4 examples/train_gru_distributed.py")
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    lo, hi = pnewton.distributed.shard_bounds(args.T, group)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Model(args.hidden, group).to(device)
    # DDP averages gradients over the ranks; each rank's loss below is its shard's part of the
    # batch mean, so the sum over ranks is the loss: scaled by the world size, DDP's average is
    # the whole gradient.
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)  # the same batches on every rank; each takes its shard
    if rank == 0:
        print(f"training pnewton.GRU(1, {args.hidden}) on T={args.T} (batch {args.batch}) split over {world} "
              f"processes ({args.device}), {args.steps} steps")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch, args.T, gen)
        x, y = x[:, lo:hi].to(device), y[:, lo:hi].to(device)
        loss = (ddp(x) - y).square().sum() / (args.batch * args.T)
        opt.zero_grad()
        (loss * world).backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps):
            stats = model.rnn.last_stats
            print(f"step {step:4d}  loss {total.item():.5f}  newton iterations {int(stats.iterations.max()):3d}  "
                  f"converged {bool(stats.converged.all())}  {time.perf_counter() - start:6.1f} s", flush=True)
    # The trained model against torch.nn.GRU over the whole sequence, shard by shard.
    with torch.no_grad():
        x, _ = make_batch(args.batch, args.T, gen)
        reference = nn.GRU(1, args.hidden, batch_first=True).to(device)
        reference.load_state_dict(model.rnn.state_dict())
        expected = reference(x.to(device))[0][:, lo:hi]
        error = (model.rnn(x[:, lo:hi].to(device))[0] - expected).abs().amax() if hi > lo else torch.zeros((), device=device)
        dist.all_reduce(error, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"max |pnewton - torch.nn.GRU| over all shards: {error.item():.2e}")
    dist.destroy_process_group()
    # torch 2.11's gloo backend aborts about one exit in seven at interpreter teardown
    # ("terminate called without an active exception"), with or without pnewton: a plain DDP
    # torch.nn.GRU script under torchrun does the same. Leave without the teardown, as
    # multiprocessing's workers do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
