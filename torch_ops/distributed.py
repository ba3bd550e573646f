"""Sequence parallelism: one long sequence split along time across the ranks of a
``torch.distributed`` process group (README "Long sequences across devices").

Every rank holds a contiguous time shard ``[B, T_r, ...]`` of the same batch (``T_r`` may
differ between ranks, even be 0); rank 0 holds the start. The parallel Newton iteration
composes across shards: the cell reads the state entering a shard from the previous one,
the Newton step is a scan whose shards exchange one summary each (an ``all_gather`` whose
size does not depend on T), and one all-reduce per iteration decides convergence, so every
rank takes the same iterations. The collectives are torch.distributed's (gloo, NCCL): their
timeout is the group's.

``group`` is a ``ProcessGroup``, a 1-D ``DeviceMesh`` or ``None`` (the default group). Pass it to
:func:`scan_diag`/:func:`scan_block` here, to :func:`pnewton.newton_rnn` (``group=``) or to the
layers (``pnewton.GRU(..., sequence_group=group)``). Gradients of tensors every rank holds
alike (parameters, ``h0``) are this shard's part: their sum over the group is the whole
gradient (``torch.distributed.all_reduce``, or DDP over the group with the loss scaled by
its size). Every rank must run the backward of every output it took part in.
"""
import torch
import torch.distributed as dist

__all__ = ["group_name", "shard_bounds", "shard", "scan_diag", "scan_block"]


def group_name(group=None):
    """The registered name of ``group`` (a ProcessGroup, a 1-D DeviceMesh or None: the default
    group), as the ops take it."""
    if group is None:
        group = dist.group.WORLD
    if hasattr(group, "get_group"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"pnewton: a sequence-parallel mesh must be 1-D, got {group.ndim}-D; pass mesh[name]")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"pnewton: group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, got "
                        f"{type(group).__name__}")
    return group.group_name


def shard_bounds(length, group=None):
    """``(start, stop)`` of this rank's shard of a sequence of ``length`` steps split as evenly
    as possible over the group (the first ``length % P`` ranks one step longer)."""
    if group is not None and hasattr(group, "get_group"):
        group = group.get_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(length, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(x, dim=1, group=None):
    """This rank's contiguous shard of ``x`` along ``dim`` (as :func:`shard_bounds`)."""
    start, stop = shard_bounds(x.shape[dim], group)
    return x.narrow(dim, start, stop - start)


def scan_diag(a, b, x0=None, *, reverse=False, group=None):
    """``pnewton.scan_diag`` over the whole sequence, sharded along time: ``a``, ``b`` are this
    rank's shard ``[B, T_r, D]``; ``x0`` enters the sequence (the first shard; the last when
    ``reverse``). Returns this rank's shard of x. Differentiable."""
    return torch.ops.pnewton.scan_diag_sharded(a, b, group_name(group), x0, reverse)


def scan_block(A, b, x0=None, *, reverse=False, transpose=False, group=None):
    """``pnewton.scan_block`` sharded along time, as :func:`scan_diag`."""
    return torch.ops.pnewton.scan_block_sharded(A, b, group_name(group), x0, reverse, transpose)
