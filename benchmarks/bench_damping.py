"""The adaptive trust region (damping=0) against a log grid of fixed ELK λ (issue 24).

    python benchmarks/bench_damping.py [--quick] [--max-iter 1000]

For every problem of pnewton.problems (and the GRU of examples/stability.py), each ELK
method is run from the zero guess with the adaptive λ and with λ = 10⁻³ … 10³, float64,
default tolerance, no fallback; prints the iterations to converge (— for none within
--max-iter), the best fixed λ and the ratio adaptive / best as a Markdown table.
"""
import argparse
import time

import torch

import pnewton
from pnewton import problems

LAMBDAS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]


def gru():
    gen = torch.Generator().manual_seed(0)
    gi = torch.randn(2, 300, 24, generator=gen, dtype=torch.float64)
    W = torch.randn(24, 8, generator=gen, dtype=torch.float64) * 0.5
    return gi, W, torch.zeros(2, 8, dtype=torch.float64)


def cases(quick):
    # (name, problem, structure): structure None is the GRU layer's cell through newton_rnn.
    out = [("permutation D=5 T=50", problems.permutation(), "dense"),
           ("mean-field g=0.8 D=20 T=300", problems.mean_field(0.8, D=20, T=300), "dense"),
           ("langevin T=10⁴", problems.langevin(10_000), "diag"),
           ("lorenz T=500", problems.lorenz(500), "dense"),
           ("lorenz observer T=500", problems.lorenz_observer(500), "dense"),
           ("unstable start T=3500", problems.unstable_start(), "diag"),
           ("expanding start dt=0.2 T=3000", problems.unstable_start(T=3000, dt=0.2), "diag"),
           ("gru D=8 T=300 (B=2)", gru(), None)]
    return out[:3] + out[5:6] if quick else out


def iterations(problem, structure, method, damping, max_iter):
    if structure is None:
        gi, W, s0 = problem
        _, stats = pnewton.newton_rnn("gru", gi, W, None, s0, method=method, damping=damping, max_iter=max_iter,
                                      fallback=False)
    else:
        f, s0, u, J = problem
        _, stats = pnewton.solve(f, s0, u, method=method, structure=structure, jacobian=J, damping=damping,
                                 max_iter=max_iter, fallback=False)
    return int(stats.iterations.max()) if bool(stats.converged.all()) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four problems, the filter methods only")
    parser.add_argument("--max-iter", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = ["elk_filter", "quasi_elk_filter"] + ([] if args.quick else ["elk", "quasi_elk"])
    print("| problem | method | adaptive | best fixed λ | its | adaptive / best | " +
          " | ".join(f"λ={lam:g}" for lam in LAMBDAS) + " |")
    print("|---" * (6 + len(LAMBDAS)) + "|")
    start = time.perf_counter()
    for name, problem, structure in cases(args.quick):
        for method in methods:
            if structure == "diag" and method.startswith("quasi"):
                continue  # the same step as the full method for a diagonal Jacobian
            adaptive = iterations(problem, structure, method, 0.0, args.max_iter)
            fixed = [iterations(problem, structure, method, lam, args.max_iter) for lam in LAMBDAS]
            done = [(it, lam) for it, lam in zip(fixed, LAMBDAS) if it is not None]
            best_it, best_lam = min(done) if done else (None, None)
            ratio = f"{adaptive / best_it:.2f}" if adaptive and best_it else ("—" if adaptive is None else "no λ converges")
            show = lambda it: "—" if it is None else str(it)  # noqa: E731
            print(f"| {name} | {method} | {show(adaptive)} | {'—' if best_lam is None else f'{best_lam:g}'} | "
                  f"{show(best_it)} | {ratio} | " + " | ".join(show(it) for it in fixed) + " |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s; float64, 1 thread, zero guess, max_iter={args.max_iter})")


if __name__ == "__main__":
    main()
