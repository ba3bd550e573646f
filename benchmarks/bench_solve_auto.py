"""pnewton.solve with method="auto" on user step functions (torch.func Jacobians), 1 thread.

    python benchmarks/bench_solve_auto.py

Prints auto's path, iterations and time (after a warm-up) on problems of pnewton.problems
without ``jacobian=``, where auto runs exact Newton first (RESULTS.md, issue 24).
"""
import time

import torch

import pnewton
from pnewton import problems


def main():
    torch.set_num_threads(1)
    cases = {"mean-field g=0.8 D=100 T=1000": problems.mean_field(0.8),
             "mean-field g=0.8 D=20 T=1000 B=4": problems.mean_field(0.8, D=20, B=4),
             "Lorenz observer T=500": problems.lorenz_observer(500), "permutation D=5 T=50": problems.permutation()}
    for name, (f, s0, u, _) in cases.items():
        pnewton.solve(f, s0, u)  # warm-up
        start = time.perf_counter()
        _, stats = pnewton.solve(f, s0, u)
        seconds = time.perf_counter() - start
        print(f"{name:34s} {stats.method:28s} {int(stats.iterations.max()):4d} iterations {seconds:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
