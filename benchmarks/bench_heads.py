"""pnewton.HeadGRU / HeadLSTM (multi-head, block-diagonal recurrences) against torch.nn's
GRU / LSTM of the same hidden size and against pnewton.DiagGRU / DiagLSTM, with the
iterations of exact Newton (deer, k×k block scans) and quasi_deer (diagonal) on the same
layer.

    python benchmarks/bench_heads.py [--B 1 16] [--T 4096 65536] [--hidden 64 256]
                                     [--k 2 4 8 16] [--cells gru lstm] [--threads 1]
                                     [--device cpu] [--backward]

One row per (cell, B, T, hidden, k): median times in ms (interleaved, after a warm-up) of
torch.nn, DiagGRU/DiagLSTM, and the head layer with deer and quasi_deer, the ratio
torch.nn / head-deer (> 1: the head layer is faster), and the iterations of both methods.
float32, the layers' default initialisation (torch.nn's), inputs N(0, 1). Grids whose
Jacobian blocks would not fit in memory are skipped with a note.
"""
import argparse

import torch

import pnewton
from timing import median_seconds


def layers(cell, hidden, k, device):
    torch.manual_seed(0)
    head_cls, diag_cls, torch_cls = ((pnewton.HeadGRU, pnewton.DiagGRU, torch.nn.GRU) if cell == "gru"
                                     else (pnewton.HeadLSTM, pnewton.DiagLSTM, torch.nn.LSTM))
    head = head_cls(hidden, hidden, heads=hidden // k, batch_first=True).to(device)
    diag = diag_cls(hidden, hidden, batch_first=True, method="deer" if cell == "gru" else "block_deer").to(device)
    ref = torch_cls(hidden, hidden, batch_first=True).to(device)
    return head, diag, ref


def timed(module, x, backward, repeats, device):
    def run():
        if backward:
            out = module(x)[0]
            out.sum().backward()
        else:
            with torch.no_grad():
                module(x)
    return median_seconds(run, repeats, device) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[1])
    p.add_argument("--T", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, nargs="+", default=[64])
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--cells", nargs="+", default=["gru", "lstm"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backward", action="store_true", help="forward+backward instead of the forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory_gb", type=float, default=8.0, help="skip grids whose blocks need more")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    what = "forward+backward" if a.backward else "forward"
    print(f"{what}, float32, {a.device}, {a.threads} thread(s); times in ms")
    print("| cell | B | T | hidden | k | torch.nn | Diag | Head deer | Head quasi | torch.nn / Head deer "
          "| iterations deer / quasi |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in a.cells:
        for B in a.B:
            for T in a.T:
                for hidden in a.hidden:
                    for k in a.k:
                        width = k * (2 if cell == "lstm" else 1)
                        need = 4 * B * T * hidden * width * 4 / 1e9  # a few copies of the blocks
                        if need > a.memory_gb:
                            print(f"| {cell} | {B} | {T} | {hidden} | {k} | skipped: the blocks need ~{need:.0f} GB |")
                            continue
                        head, diag, ref = layers(cell, hidden, k, a.device)
                        x = torch.randn(B, T, hidden, device=a.device)
                        times, iterations = {}, {}
                        times["torch.nn"] = timed(ref, x, a.backward, a.repeats, a.device)
                        times["diag"] = timed(diag, x, a.backward, a.repeats, a.device)
                        for method in ("deer", "quasi_deer"):
                            head.solver_options = {"method": method}
                            times[method] = timed(head, x, a.backward, a.repeats, a.device)
                            iterations[method] = int(head.last_stats.iterations.max())
                        print(f"| {cell} | {B} | {T} | {hidden} | {k} | {times['torch.nn']:.1f} | {times['diag']:.1f} "
                              f"| {times['deer']:.1f} | {times['quasi_deer']:.1f} "
                              f"| {times['torch.nn'] / times['deer']:.2f} "
                              f"| {iterations['deer']} / {iterations['quasi_deer']} |", flush=True)


if __name__ == "__main__":
    main()
