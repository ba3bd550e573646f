"""Parallel MCMC (pnewton.mcmc) against the step-by-step loop: wall time and iterations.

    python benchmarks/bench_mcmc.py [--lengths 1000,10000] [--methods auto,deer,quasi_deer] [--threads 1]

The same chain (same draws) by pnewton.mcmc (each method, float64: deer forms the step's
whole Jacobian by torch.func, quasi_deer carries Hutchinson's estimate of the Hessian's
diagonal, auto runs deer first at these sizes — the column shows the path it took) and by
the plain loop (pnewton.solve.sequential over the same step); the chains agree to the
printed max |Δ|.
Targets: a 6-D Gaussian and a Bayesian logistic regression
posterior (N = 200, D = 4), each by MALA and by HMC with L = 3, B = 1.
"""
import argparse
import os
import sys
import time

import torch

import pnewton
from pnewton.mcmc import _HMC, _MALA, _draw
from pnewton.solve import sequential

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from mcmc_logistic import posterior  # noqa: E402


def gaussian(D=6):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    prec = A @ A.T / D + torch.eye(D, dtype=torch.float64)
    return lambda x: -0.5 * ((x @ prec) * x).sum(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1000,10000")
    parser.add_argument("--methods", default="auto,deer,quasi_deer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logistic, _ = posterior()
    cases = [("gaussian D=6", "mala", gaussian(), 6, 0.1, None), ("gaussian D=6", "hmc", gaussian(), 6, 0.2, 3),
             ("logistic N=200 D=4", "mala", logistic, 4, 0.01, None),
             ("logistic N=200 D=4", "hmc", logistic, 4, 0.01, 3)]
    print("| target | sampler | T | method | iterations | parallel (s) | loop (s) | loop / parallel | acceptance | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, sampler, log_prob, D, eps, L in cases:
        for T in (int(t) for t in args.lengths.split(",")):
            x0 = torch.zeros(1, D, dtype=torch.float64)
            step = _MALA(log_prob, eps) if sampler == "mala" else _HMC(log_prob, eps, L)
            inputs = _draw(x0, T, torch.Generator().manual_seed(1))
            start = time.perf_counter()
            loop = sequential(step.next, x0, inputs)
            loop_s = time.perf_counter() - start
            for method in args.methods.split(","):
                run = (lambda g: pnewton.mcmc.mala(log_prob, x0, T, eps, generator=g, method=method)) \
                    if sampler == "mala" else \
                    (lambda g: pnewton.mcmc.hmc(log_prob, x0, T, eps, L, generator=g, method=method))
                run(torch.Generator().manual_seed(0))  # warm-up (torch.func's first traces)
                chain = run(torch.Generator().manual_seed(1))
                label = method if method == chain.stats.method else f"{method}: {chain.stats.method}"
                print(f"| {name} | {sampler}{'' if L is None else f' L={L}'} | {T} | {label} | "
                      f"{int(chain.stats.iterations[0])} | {chain.seconds:.2f} | {loop_s:.2f} | "
                      f"{loop_s / chain.seconds:.2f} | {float(chain.acceptance_rate[0]):.2f} | "
                      f"{float((chain.samples - loop).abs().max()):.1e} |", flush=True)
    print(f"\n(float64, {args.threads} thread(s), {torch.__version__})")


if __name__ == "__main__":
    main()
