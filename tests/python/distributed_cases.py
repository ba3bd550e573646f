"""The sequence-parallel cases of test_distributed.py, run inside every spawned rank.

Each case solves a sequence split over the ranks of a gloo group and compares this rank's
shard with the single-process solve of the whole sequence (computed by every rank from the
same seed): states in float64 to 1e-10, the same iteration counts, the same gradients (the
parameters' and h0's summed over the ranks, as DDP would)."""
import datetime
import os
import traceback

import torch
import torch.distributed as dist

TOL = 1e-10


def cuts(T, world):
    """Uneven shards; with 4 ranks one of them empty."""
    if world == 2:
        return [0, 23, T]
    if world == 4:
        return [0, 10, 10, 25, T]
    return [0, T]


def close(x, y, what, tol=TOL):
    assert x.shape == y.shape, f"{what}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
    if x.numel():
        err = (x - y).abs().max().item()
        assert err <= tol * max(1.0, y.abs().max().item()), f"{what}: max error {err:.3g}"


def summed(t, like):
    """t summed over the ranks (None: this rank does not use the tensor)."""
    t = torch.zeros_like(like) if t is None else t.clone()
    dist.all_reduce(t)
    return t


def case_scans(rank, world, group):
    import pnewton
    torch.manual_seed(0)
    B, T, D = 3, 37, 4
    lo, hi = cuts(T, world)[rank:rank + 2]
    a = torch.rand(B, T, D, dtype=torch.float64) * 1.6 - 0.8
    b, x0, w = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    A = torch.randn(B, T, 2, 2, 2, dtype=torch.float64) * 0.6
    bb, wb = torch.randn(B, T, 2, 2, dtype=torch.float64), torch.randn(B, T, 2, 2, dtype=torch.float64)
    for reverse in (False, True):
        full = [t.clone().requires_grad_() for t in (a, b, x0)]
        (pnewton.scan_diag(*full, reverse=reverse) * w).sum().backward()
        mine = [a[:, lo:hi].clone().requires_grad_(), b[:, lo:hi].clone().requires_grad_(), x0.clone().requires_grad_()]
        x = pnewton.distributed.scan_diag(*mine, reverse=reverse, group=group)
        close(x, pnewton.scan_diag(a, b, x0, reverse=reverse)[:, lo:hi], "scan_diag")
        (x * w[:, lo:hi]).sum().backward()
        close(mine[0].grad, full[0].grad[:, lo:hi], "scan_diag grad a")
        close(mine[1].grad, full[1].grad[:, lo:hi], "scan_diag grad b")
        close(summed(mine[2].grad, x0), full[2].grad, "scan_diag grad x0")
        for transpose in (False, True):
            full = [t.clone().requires_grad_() for t in (A, bb)]
            (pnewton.scan_block(*full, reverse=reverse, transpose=transpose) * wb).sum().backward()
            mine = [A[:, lo:hi].clone().requires_grad_(), bb[:, lo:hi].clone().requires_grad_()]
            x = pnewton.distributed.scan_block(*mine, reverse=reverse, transpose=transpose, group=group)
            close(x, pnewton.scan_block(A, bb, reverse=reverse, transpose=transpose)[:, lo:hi], "scan_block")
            (x * wb[:, lo:hi]).sum().backward()
            close(mine[0].grad, full[0].grad[:, lo:hi], "scan_block grad A")
            close(mine[1].grad, full[1].grad[:, lo:hi], "scan_block grad b")


def case_scans_low_precision(rank, world, group):
    # bf16 storage, fp32 accumulation and fold: as close to the one-process scan as bf16 rounds.
    import pnewton
    torch.manual_seed(2)
    B, T, D = 2, 37, 5
    lo, hi = cuts(T, world)[rank:rank + 2]
    a, b = torch.rand(B, T, D) * 0.4 + 0.6, torch.randn(B, T, D)
    full = pnewton.scan_diag(a.bfloat16(), b.bfloat16()).float()
    mine = pnewton.distributed.scan_diag(a[:, lo:hi].bfloat16(), b[:, lo:hi].bfloat16(), group=group)
    assert mine.dtype == torch.bfloat16
    close(mine.float(), full[:, lo:hi], "bf16 scan_diag", tol=3e-2)


def _cell_problem(cell, B=3, T=41, H=6, scale=0.5, seed=1):
    torch.manual_seed(seed)
    gates = {"gru": 3, "lstm": 4, "rnn_tanh": 1, "diag_gru": 3, "head_gru": 3, "head_lstm": 4}[cell]
    S = 2 * H if cell in ("lstm", "head_lstm") else H
    gi = torch.randn(B, T, gates * H, dtype=torch.float64)
    if cell.startswith("head_"):  # 3 heads of 2
        W = torch.randn(3, gates * 2, 2, dtype=torch.float64) * scale
    elif cell == "diag_gru":
        W = torch.rand(gates * H, dtype=torch.float64)
    else:
        W = torch.randn(gates * H, H, dtype=torch.float64) * scale / H ** 0.5
    b = torch.randn(gates * H, dtype=torch.float64) * 0.1
    s0 = torch.randn(B, S, dtype=torch.float64) * 0.5
    return gi, W, b, s0


def _solve_both(rank, world, group, cell, method, scale=0.5, resets=False, **options):
    import pnewton
    gi, W, b, s0 = _cell_problem(cell, scale=scale)
    B, T = gi.shape[:2]
    lo, hi = cuts(T, world)[rank:rank + 2]
    R = None
    if resets:
        R = torch.zeros(B, T, dtype=torch.bool)
        R[0, [9, 10, 24, 30]] = True  # at and next to shard boundaries
        R[2, 25] = True
    w = torch.randn(B, T, s0.shape[1], dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (gi, W, b, s0)]
    states, stats = pnewton.newton_rnn(cell, *full, method=method, resets=R, **options)
    (states * w).sum().backward()
    mine = [gi[:, lo:hi].clone().requires_grad_()] + [t.clone().requires_grad_() for t in (W, b, s0)]
    shard, shard_stats = pnewton.newton_rnn(cell, *mine, method=method, resets=None if R is None else R[:, lo:hi],
                                            group=group, **options)
    close(shard, states[:, lo:hi].detach(), f"{cell} {method} states")
    assert torch.equal(shard_stats.iterations, stats.iterations), (shard_stats.iterations, stats.iterations)
    assert torch.equal(shard_stats.converged, stats.converged)
    assert torch.equal(shard_stats.path, stats.path), (shard_stats.path, stats.path)
    (shard * w[:, lo:hi]).sum().backward()
    close(mine[0].grad, full[0].grad[:, lo:hi], f"{cell} {method} grad gi")
    for name, m, f in zip(("W_hh", "b_hh", "s0"), mine[1:], full[1:]):
        close(summed(m.grad, f), f.grad, f"{cell} {method} grad {name}")
    return stats


def case_newton_methods(rank, world, group):
    for cell, method in (("gru", "quasi_deer"), ("gru", "deer"), ("gru", "auto"), ("lstm", "block_deer"),
                         ("lstm", "auto"), ("diag_gru", "deer"), ("rnn_tanh", "jacobi"), ("rnn_tanh", "picard"),
                         ("gru", "sequential"), ("head_gru", "deer"), ("head_lstm", "auto"),
                         ("head_lstm", "block_deer")):
        _solve_both(rank, world, group, cell, method)
    _solve_both(rank, world, group, "head_gru", "quasi_deer", resets=True)


def case_elk(rank, world, group):
    # The ELK step of a diagonal approximation over shards: covariance elements folded over
    # the shards, sharded filter and smoother scans.
    for cell, method, options in (("diag_gru", "elk", {}), ("diag_gru", "elk_filter", dict(damping=0.1)),
                                  ("gru", "quasi_elk", {}), ("gru", "quasi_elk_filter", dict(damping=0.1)),
                                  ("lstm", "quasi_elk", dict(resets=True))):
        _solve_both(rank, world, group, cell, method, **options)
    # auto's last stage on a problem the Newton stages leave unconverged within their budgets.
    _solve_both(rank, world, group, "rnn_tanh", "auto", scale=3.0)


def case_adjoints(rank, world, group):
    # The matrix-free iterative adjoint (sharded diagonal scans, halo products) and the
    # pipelined reverse sweep, beside the scan adjoint of case_newton_methods.
    for adjoint in ("iterative", "sequential"):
        _solve_both(rank, world, group, "gru", "quasi_deer", adjoint=adjoint)
        _solve_both(rank, world, group, "lstm", "block_deer", adjoint=adjoint, resets=True)


def case_lengths(rank, world, group):
    # Lengths of the whole sequence: ending at a shard boundary, inside a shard, at 0 and at T;
    # the states held past them come from the shard that holds the last valid step.
    for cell, method, lengths in (("gru", "quasi_deer", [41, 10, 17]), ("lstm", "auto", [0, 25, 41]),
                                  ("diag_gru", "deer", [23, 5, 41])):
        for adjoint in ("scan", "sequential"):
            _solve_both(rank, world, group, cell, method, lengths=torch.tensor(lengths), adjoint=adjoint)
    _solve_both(rank, world, group, "rnn_tanh", "quasi_deer", scale=6.0, max_iter=3, lengths=torch.tensor([41, 12, 30]))


def case_resets(rank, world, group):
    _solve_both(rank, world, group, "gru", "quasi_deer", resets=True)
    _solve_both(rank, world, group, "lstm", "auto", resets=True)


def case_fallback(rank, world, group):
    # A strongly expanding tanh RNN: a few quasi-DEER iterations cannot converge, the
    # pipelined loop computes every sequence.
    stats = _solve_both(rank, world, group, "rnn_tanh", "quasi_deer", scale=6.0, max_iter=3)
    assert bool(stats.fallback), "the case is meant to fall back"


def case_layers(rank, world, group):
    import pnewton
    torch.manual_seed(3)
    T = 41
    lo, hi = cuts(T, world)[rank:rank + 2]
    for cls, kwargs in ((pnewton.GRU, dict(num_layers=2)), (pnewton.LSTM, dict(num_layers=2, bidirectional=True)),
                        (pnewton.GRU, dict(bidirectional=True, batch_first=True)),
                        (pnewton.LSTM, dict(proj_size=3)), (pnewton.RNN, dict(nonlinearity="relu", num_layers=2))):
        ref = cls(5, 7, dtype=torch.float64, **kwargs)
        mine = cls(5, 7, dtype=torch.float64, sequence_group=group, **kwargs)
        mine.load_state_dict(ref.state_dict())
        bf = kwargs.get("batch_first", False)
        x = torch.randn(3, T, 5, dtype=torch.float64) if bf else torch.randn(T, 3, 5, dtype=torch.float64)
        xs = (x[:, lo:hi] if bf else x[lo:hi]).clone().requires_grad_()
        x = x.requires_grad_()
        out, hn = ref(x)
        out_s, hn_s = mine(xs)
        w = torch.randn_like(out)
        ws = w[:, lo:hi] if bf else w[lo:hi]
        hn, hn_s = (hn, hn_s) if isinstance(hn, tuple) else ((hn,), (hn_s,))
        close(out_s, (out[:, lo:hi] if bf else out[lo:hi]).detach(), f"{cls.__name__} output")
        for h, h_s in zip(hn, hn_s):
            close(h_s, h.detach(), f"{cls.__name__} final state")  # on every rank
        loss = (out * w).sum() + sum(h.sum() for h in hn)
        # h_n is on every rank: each counts it 1/P times, so that the sum over ranks is the loss.
        loss_s = (out_s * ws).sum() + sum(h.sum() for h in hn_s) / world
        loss.backward()
        loss_s.backward()
        close(xs.grad, (x.grad[:, lo:hi] if bf else x.grad[lo:hi]), f"{cls.__name__} grad input")
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            close(summed(q.grad, p), p.grad, f"{cls.__name__} grad {name}")


def case_nan_inputs(rank, world, group):
    # A NaN input in one shard: the loop's NaN pattern, in every later shard too, with and
    # without the fallback; the sequence is not converged, its residual NaN, on every rank.
    import pnewton
    for cell, resets in (("gru", False), ("diag_gru", False), ("diag_gru", True)):
        gi, W, b, s0 = _cell_problem(cell)
        B, T = gi.shape[:2]
        lo, hi = cuts(T, world)[rank:rank + 2]
        gi[1, 5, 2] = float("nan")
        R = None
        if resets:
            R = torch.zeros(B, T, dtype=torch.bool)
            R[1, 30] = True  # a new segment after the NaN: finite again
        for fallback in (True, False):
            full, stats = pnewton.newton_rnn(cell, gi, W, b, s0, method="quasi_deer", fallback=fallback, resets=R)
            mine, mine_stats = pnewton.newton_rnn(cell, gi[:, lo:hi], W, b, s0, method="quasi_deer", fallback=fallback,
                                                  resets=None if R is None else R[:, lo:hi], group=group)
            what = f"{cell} resets={resets} fallback={fallback}"
            assert torch.equal(mine.isnan(), full[:, lo:hi].isnan()), what
            close(mine.nan_to_num(), full[:, lo:hi].nan_to_num(), what)
            assert torch.equal(mine_stats.converged, stats.converged), what
            assert mine_stats.residual[1].isnan() and not bool(mine_stats.converged[1]), what


def case_mismatch(rank, world, group):
    import pnewton
    gi, W, b, s0 = _cell_problem("gru")
    B = 3 if rank else 2  # rank 0 passes another batch size
    try:
        pnewton.newton_rnn("gru", gi[:B, :5], W, b, s0[:B], group=group)
    except RuntimeError as e:
        assert "disagree" in str(e) and "rank 0: [2" in str(e), str(e)
    else:
        raise AssertionError("mismatched shards did not raise")
    try:
        pnewton.distributed.scan_diag(torch.rand(2, 4, 3 + (rank == 1)), torch.rand(2, 4, 3 + (rank == 1)), group=group)
    except RuntimeError as e:
        assert "disagree" in str(e), str(e)
    else:
        raise AssertionError("mismatched scans did not raise")
    # Unsupported options are refused alike on every rank, before any collective.
    try:
        pnewton.newton_rnn("gru", gi[:, :5], W, b, s0, group=group, method="elk")  # a dense ELK step
    except RuntimeError as e:
        assert "time shards" in str(e), str(e)
    else:
        raise AssertionError("elk did not raise")
    # Lengths are the whole sequence's: every rank must pass the same.
    try:
        pnewton.newton_rnn("gru", gi[:, :5], W, b, s0, group=group, lengths=torch.tensor([3, 2, 1 + (rank == 1)]))
    except RuntimeError as e:
        assert "disagree" in str(e), str(e)
    else:
        raise AssertionError("different lengths did not raise")


def _raises_alike(call, *fragments):
    """call() raises a RuntimeError naming every fragment (on every rank: each runs this)."""
    try:
        call()
    except RuntimeError as e:
        assert all(f in str(e) for f in fragments), str(e)
    else:
        raise AssertionError(f"no error (wanted {fragments})")


def case_one_rank_failing_its_checks(rank, world, group):
    """Arguments that fail their checks on one rank alone raise the same error on every rank,
    in that call, and the group stays in step: the next call is right everywhere (before, the
    other ranks' call paired with the failing rank's next one and returned wrong states)."""
    import pnewton
    gi, W, b, s0 = _cell_problem("gru")
    T = gi.shape[1]
    lo, hi = cuts(T, world)[rank:rank + 2]
    last = world - 1
    ref, _ = pnewton.newton_rnn("gru", gi, W, b, s0)
    bad_W = W[:, :3] if rank == last else W
    _raises_alike(lambda: pnewton.newton_rnn("gru", gi[:, lo:hi], bad_W, b, s0, group=group),
                  "W_hh", f"rank {last}")
    out, _ = pnewton.newton_rnn("gru", gi[:, lo:hi], W, b, s0, group=group)
    close(out, ref[:, lo:hi], "the solve after a failed one")
    # The backward op's own checks, and the sharded scans'.
    states, g = out.detach(), torch.randn_like(out)
    bad_g = g[:, :, :2] if rank == last else g
    _raises_alike(lambda: torch.ops.pnewton.newton_rnn_backward(bad_g, "gru", gi[:, lo:hi], W, b, s0, states, "auto",
                                                                None, None, None, pnewton.distributed.group_name(group),
                                                                False), "grad_states", f"rank {last}")
    a = torch.rand(2, hi - lo, 3, dtype=torch.float64)
    bad_b = torch.rand(2, hi - lo, 4 if rank == last else 3, dtype=torch.float64)
    _raises_alike(lambda: pnewton.distributed.scan_diag(a, bad_b, group=group), f"rank {last}")
    x = pnewton.distributed.scan_diag(a, a, group=group)
    assert x.shape == a.shape
    # A layer: torch.nn's own checks (made in Python, before any op) fail on one rank.
    torch.manual_seed(9)
    layer = pnewton.GRU(4, 6, dtype=torch.float64, batch_first=True)
    xs = torch.randn(3, T, 4, dtype=torch.float64)
    full, _ = layer(xs)
    layer.sequence_group = group
    bad_x = xs[:, lo:hi, :3] if rank == last else xs[:, lo:hi]
    _raises_alike(lambda: layer(bad_x), "input.size(-1) must be equal to input_size", f"rank {last}")
    mine, _ = layer(xs[:, lo:hi])
    close(mine, full[:, lo:hi], "the layer's call after a failed one")


def case_compile_of_a_sharded_layer(rank, world, group):
    """torch.compile of a layer over time shards (not supported: its ranks agree on the
    shapes at run time) raises pnewton's message naming sequence_group, on every rank."""
    import pnewton
    layer = pnewton.GRU(3, 4, dtype=torch.float64, sequence_group=group)
    x = torch.randn(300, 2, 3, dtype=torch.float64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    _raises_alike(lambda: compiled(x), "sequence_group", "torch.compile")


def case_ddp_mesh(rank, world, group):
    """DDP over data parallelism × sequence parallelism on a 2 × 2 mesh."""
    if world != 4:
        return
    import pnewton
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    dp, sp = mesh["dp"].get_local_rank(), mesh["sp"].get_local_rank()
    torch.manual_seed(5)
    T = 30
    ref = pnewton.GRU(4, 6, dtype=torch.float64, batch_first=True)
    x = torch.randn(4, T, 4, dtype=torch.float64)  # dp shard d: batch rows 2d, 2d + 1
    out, _ = ref(x)
    (out.square().mean()).backward()
    model = pnewton.GRU(4, 6, dtype=torch.float64, batch_first=True, sequence_group=mesh["sp"])
    model.load_state_dict(ref.state_dict())
    ddp = DDP(model)  # all-reduces (averages) over all 4 ranks
    lo, hi = pnewton.distributed.shard_bounds(T, mesh["sp"])
    out_s, _ = ddp(x[2 * dp:2 * dp + 2, lo:hi])
    # This shard's part of the batch-mean loss; DDP's average over 4 ranks, times the 2 sequence
    # ranks, sums the shards and averages the 2 data shards.
    (out_s.square().sum() / (2 * T * 6) * 2).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        close(q.grad, p.grad, f"DDP grad {name}", tol=1e-9)


def case_fsdp2_mesh(rank, world, group):
    """FSDP2 (fully_shard) over all ranks, the sequence over the mesh's "sp" dimension."""
    if world != 4:
        return
    import pnewton
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    dp = mesh["dp"].get_local_rank()
    torch.manual_seed(6)
    T = 30
    ref = pnewton.GRU(4, 6, dtype=torch.float64, batch_first=True)
    x = torch.randn(4, T, 4, dtype=torch.float64)
    out, _ = ref(x)
    out.square().mean().backward()
    model = pnewton.GRU(4, 6, dtype=torch.float64, batch_first=True, sequence_group=mesh["sp"])
    model.load_state_dict(ref.state_dict())
    # The parameters sharded over all 4 ranks; the gradients reduce-scattered (averaged) over them.
    fully_shard(model, mesh=mesh._flatten("dp_sp"))
    lo, hi = pnewton.distributed.shard_bounds(T, mesh["sp"])
    out_s, _ = model(x[2 * dp:2 * dp + 2, lo:hi])
    (out_s.square().sum() / (2 * T * 6) * 2).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        close(q.grad.full_tensor(), p.grad, f"FSDP2 grad {name}", tol=1e-9)


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def run(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name, fn in CASES.items():
        try:
            fn(rank, world, dist.group.WORLD)
            results[name] = "ok"
        except Exception:  # recorded, so that the other cases still run (every rank runs them all)
            results[name] = traceback.format_exc()
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
