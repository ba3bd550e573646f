"""Parallel Newton methods on problems with known behaviour (issue 5), with plots.

    python examples/stability.py [--out stability_plots] [--quick]

Prints, per problem and method, the iterations to converge (float64, tolerance 1e-10),
the time and the error against the sequential loop; the adaptive trust-region λ against
a sweep of fixed λ; and saves PNGs: residual vs iteration per method, and deer's
iterations vs the largest Lyapunov exponent of the mean-field RNN over its gain g.
"""
import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import pnewton  # noqa: E402
from pnewton import problems  # noqa: E402
from pnewton.solve import sequential  # noqa: E402


def residual_history(f, s0, u, J, method, structure, max_iter, damping=0.0):
    """max_t |r_t| after each iteration: the solve rerun with max_iter = 0, 1, 2, ...
    (cheap at these sizes, and it uses nothing but the public API)."""
    out = []
    for i in range(max_iter + 1):
        _, stats = pnewton.solve(f, s0, u, method=method, structure=structure, jacobian=J, max_iter=i,
                                 damping=damping, atol=0.0, rtol=0.0, fallback=False)
        out.append(float(stats.residual.max()))
    return out


def solve_row(name, f, s0, u, J, method, structure, max_iter, damping=0.0):
    ref = sequential(f, s0, u)
    start = time.perf_counter()
    states, stats = pnewton.solve(f, s0, u, method=method, structure=structure, jacobian=J, max_iter=max_iter,
                                  damping=damping, fallback=method == "auto")
    elapsed = time.perf_counter() - start
    ok = bool(stats.converged.all()) and not (method != "auto" and stats.fallback)
    err = float((states - ref).abs().max())
    return dict(problem=name, method=method if not damping else f"{method} λ={damping:g}",
                iterations=int(stats.iterations.max()) if ok else None, path=stats.method, seconds=elapsed,
                error=err)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="stability_plots")
    parser.add_argument("--quick", action="store_true", help="smaller sweeps (for a smoke run)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    cases = {
        "permutation D=5 T=50": (problems.permutation(), "dense", ["deer", "quasi_deer", "picard", "auto"]),
        "mean-field g=0.8 D=100 T=1000": (problems.mean_field(0.8), "dense", ["deer", "quasi_deer", "quasi_elk", "auto"]),
        "langevin T=1000": (problems.langevin(1000), "diag", ["deer", "elk_filter", "auto"]),
        "lorenz T=500": (problems.lorenz(500), "dense", ["deer", "quasi_deer", "auto"]),
        "lorenz observer T=500": (problems.lorenz_observer(500), "dense", ["deer", "quasi_deer", "auto"]),
        "unstable start T=3500": (problems.unstable_start(), "diag", ["deer", "elk_filter", "auto"]),
    }
    rows = []
    print(f"{'problem':34s} {'method':24s} {'iters':>6s} {'path':38s} {'time':>8s} {'max err':>9s}")
    for name, ((f, s0, u, J), structure, methods) in cases.items():
        lle = float(pnewton.lyapunov(f, s0, u, states=sequential(f, s0, u), jacobian=J)[0])
        print(f"{name} — largest Lyapunov exponent {lle:+.3f} per step")
        for method in methods:
            kw = dict(max_iter=None if method == "auto" else u.shape[1])
            row = solve_row(name, f, s0, u, J, method, structure, **kw)
            rows.append(row)
            iters = "—" if row["iterations"] is None else str(row["iterations"])
            print(f"{'':34s} {row['method']:24s} {iters:>6s} {row['path']:38s} {row['seconds']:7.2f}s "
                  f"{row['error']:9.1e}")

    print("\nadaptive trust-region λ vs fixed λ (iterations; — = not converged in 300)")
    lambdas = [0.01, 0.1, 1.0] if args.quick else [0.001, 0.01, 0.1, 1.0, 10.0]
    sweeps = {"gru D=8 T=300": None, "unstable start T=3500": problems.unstable_start()}
    gen = torch.Generator().manual_seed(0)
    gi, W = torch.randn(2, 300, 24, generator=gen, dtype=torch.float64), torch.randn(24, 8, generator=gen, dtype=torch.float64) * 0.5
    s0g = torch.zeros(2, 8, dtype=torch.float64)
    for name, problem in sweeps.items():
        for method in ("quasi_elk", "quasi_elk_filter"):
            line = []
            for lam in [0.0] + lambdas:
                if problem is None:
                    _, stats = pnewton.newton_rnn("gru", gi, W, None, s0g, method=method, damping=lam, max_iter=300,
                                                  fallback=False)
                else:
                    f, s0, u, J = problem
                    _, stats = pnewton.solve(f, s0, u, method=method, structure="diag", jacobian=J, damping=lam,
                                             max_iter=300, fallback=False)
                it = int(stats.iterations.max()) if bool(stats.converged.all()) else None
                line.append(f"{'adaptive' if lam == 0 else f'λ={lam:g}'}: {'—' if it is None else it}")
            print(f"  {name:24s} {method:18s} " + ", ".join(line))

    # Residual vs iteration per method.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    plots = [("lorenz T=500 vs observer", [(problems.lorenz(500), "dense", "deer", "lorenz deer"),
                                           (problems.lorenz_observer(500), "dense", "deer", "observer deer")], 40),
             ("permutation D=5 T=50", [(problems.permutation(), "dense", m, m) for m in ("deer", "quasi_deer", "picard")], 50),
             ("unstable start T=3500", [(problems.unstable_start(), "diag", "deer", "deer"),
                                        (problems.unstable_start(), "diag", "elk_filter", "elk_filter λ=0.1")], 40)]
    for ax, (title, series, n) in zip(axes, plots):
        for (f, s0, u, J), structure, method, label in series:
            damping = 0.1 if "elk" in method else 0.0
            hist = residual_history(f, s0, u, J, method, structure, n if not args.quick else n // 2, damping)
            ax.semilogy([max(h, 1e-16) if h == h else 1e300 for h in hist], label=label)
        ax.set_title(title), ax.set_xlabel("iteration"), ax.set_ylabel("max |r_t|"), ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "residual_vs_iteration.png"), dpi=100)

    # Iterations vs the largest Lyapunov exponent over the mean-field gain.
    gains = [0.6, 1.0, 1.4, 1.8] if args.quick else [0.5, 0.7, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.2]
    T = 300 if args.quick else 1000
    lles, iters = [], []
    print(f"\nmean-field RNN D=100 T={T}: gain, exponent, deer iterations (cap 200)")
    for g in gains:
        f, s0, u, J = problems.mean_field(g, T=T)
        _, stats = pnewton.solve(f, s0, u, method="deer", jacobian=J, max_iter=200, fallback=False)
        lle = float(pnewton.lyapunov(f, s0, u, states=sequential(f, s0, u), jacobian=J)[0])
        lles.append(lle), iters.append(int(stats.iterations[0]))
        print(f"  g={g:4.2f}  λ={lle:+.3f}  {iters[-1]}{'' if bool(stats.converged[0]) else ' (not converged)'}")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(lles, iters, "o-")
    for g, x, y in zip(gains, lles, iters):
        ax.annotate(f"g={g}", (x, y), fontsize=7)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("largest Lyapunov exponent (per step)"), ax.set_ylabel("deer iterations (cap 200)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "iterations_vs_lyapunov.png"), dpi=100)
    print(f"\nplots saved in {args.out}/")


if __name__ == "__main__":
    main()
