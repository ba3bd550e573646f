"""Iteration counts the papers behind pnewton publish, measured here (issue 24).

    python benchmarks/bench_published.py

float64, default tolerance, zero guess unless stated. The published figure is quoted as
the paper states it (where the paper gives a curve, not a number, its shape).
"""
import torch

import pnewton
from pnewton import problems
from pnewton.solve import sequential


def solve_iterations(problem, method, structure="dense", max_iter=None, **kw):
    f, s0, u, J = problem
    _, stats = pnewton.solve(f, s0, u, method=method, structure=structure, jacobian=J, max_iter=max_iter,
                             fallback=False, **kw)
    return int(stats.iterations.max()) if bool(stats.converged.all()) else None


def lle(problem):
    f, s0, u, J = problem
    return float(pnewton.lyapunov(f, s0, u, states=sequential(f, s0, u), jacobian=J)[0])


def main():
    torch.set_num_threads(1)
    show = lambda it: "—" if it is None else str(it)  # noqa: E731
    rows = []
    for T in (250, 500, 1000):
        rows.append((f"Lorenz-63 (Euler, dt=0.01) T={T}", "deer", show(solve_iterations(problems.lorenz(T), "deer",
                                                                                          max_iter=T)),
                     "chaotic: iterations grow ∝ T [predictability, Fig./Tab. 1]"))
        rows.append((f"its observer (gain 20) T={T}", "deer", show(solve_iterations(problems.lorenz_observer(T), "deer")),
                     "contracting: a handful, flat in T [predictability, Tab. 1]"))
    for g in (0.6, 0.9, 1.2, 1.8):
        p = problems.mean_field(g, T=1000)
        rows.append((f"mean-field RNN D=100 T=1000 g={g} (LLE {lle(p):+.3f})", "deer",
                     show(solve_iterations(p, "deer", max_iter=200)), "jump where the LLE crosses 0 [predictability]"))
    for T in (1000, 10_000, 100_000):
        p = problems.langevin(T)
        rows.append((f"two-well Langevin D=2 ε=0.01 T={T}", "auto",
                     show(solve_iterations(p, "auto", "diag")), "≈ 35 at T=10⁴ (issue 24's reading of the papers)"))
        rows.append((f"two-well Langevin D=2 ε=0.01 T={T}", "deer, init randn",
                     show(solve_iterations(p, "deer", "diag", max_iter=1000,
                                           init=torch.randn(1, T, 2, dtype=torch.float64,
                                                            generator=torch.Generator().manual_seed(0)))),
                     "the papers' start: N(0, 1) guess"))
    gauss = lambda x: -0.5 * (x * x).sum(1)  # noqa: E731
    for T in (1000, 10_000):
        x0 = torch.zeros(1, 6, dtype=torch.float64)
        mala = pnewton.mcmc.mala(gauss, x0, T, 0.1, generator=torch.Generator().manual_seed(0))
        hmc = pnewton.mcmc.hmc(gauss, x0, T, 0.2, 3, generator=torch.Generator().manual_seed(0))
        rows.append((f"MALA, 6-D Gaussian, T={T}", "deer", str(int(mala.stats.iterations[0])),
                     "tens of iterations for 10⁴–10⁵ samples [parallel MCMC, abstract]"))
        rows.append((f"HMC L=3, 6-D Gaussian, T={T}", "deer", str(int(hmc.stats.iterations[0])),
                     "tens of iterations [parallel MCMC, abstract]"))
    print("| problem | method | iterations here | published |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |", flush=True)


if __name__ == "__main__":
    main()
