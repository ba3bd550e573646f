"""Sampling a Bayesian logistic regression posterior with MALA, in parallel over the chain.

    python examples/mcmc_logistic.py [--steps 10000] [--plot mcmc_logistic.png]

Synthetic data (N points, D features, known weights); the posterior of the weights under a
N(0, 4I) prior is sampled by pnewton.mcmc.mala — the chain evaluated by parallel Newton
iterations, equal to the sequential chain — and then, for chains of growing length T, the
Newton iterations and the wall time against the plain step-by-step loop are printed. The
PNG shows the chain's trace per weight (true weights dashed) and iterations vs T.
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import pnewton  # noqa: E402


def posterior(N=200, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w_true = torch.linspace(-1.5, 1.5, D, dtype=torch.float64)
    y = (torch.rand(N, generator=gen, dtype=torch.float64) < torch.sigmoid(X @ w_true)).double()

    def log_prob(w):  # w [n, D] -> [n]
        logits = w @ X.T
        return (y * logits - torch.nn.functional.softplus(logits)).sum(1) - (w ** 2).sum(1) / 8

    return log_prob, w_true


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000, help="the longest chain")
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--plot", default="mcmc_logistic.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    log_prob, w_true = posterior()
    D = w_true.numel()
    x0 = torch.zeros(1, D, dtype=torch.float64)

    chain = pnewton.mcmc.mala(log_prob, x0, args.steps, args.step_size, generator=torch.Generator().manual_seed(1))
    burn = args.steps // 5
    mean = chain.samples[0, burn:].mean(0)
    print(f"MALA, T={args.steps}, ε={args.step_size}: {int(chain.stats.iterations[0])} Newton iterations "
          f"({chain.stats.method}), {chain.seconds:.2f} s, acceptance {float(chain.acceptance_rate[0]):.2f}")
    print("posterior mean " + " ".join(f"{v:+.2f}" for v in mean.tolist()) +
          "   true weights " + " ".join(f"{v:+.2f}" for v in w_true.tolist()))

    print(f"\n{'T':>7s} {'iterations':>10s} {'parallel':>9s} {'loop':>8s} {'speed-up':>8s} {'max |Δ|':>8s}")
    lengths = sorted({t for t in (args.steps // 16, args.steps // 8, args.steps // 4, args.steps // 2, args.steps)
                      if t > 0})
    iterations = []
    for T in lengths:
        gen = torch.Generator().manual_seed(2)
        par = pnewton.mcmc.mala(log_prob, x0, T, args.step_size, generator=gen)
        # The same chain by the loop: the same draws, one step at a time.
        loop = pnewton.mcmc.mala(log_prob, x0, T, args.step_size, generator=torch.Generator().manual_seed(2),
                                 method="sequential")
        iterations.append(int(par.stats.iterations[0]))
        print(f"{T:7d} {iterations[-1]:10d} {par.seconds:8.2f}s {loop.seconds:7.2f}s "
              f"{loop.seconds / par.seconds:7.1f}x {float((par.samples - loop.samples).abs().max()):8.1e}", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for d in range(D):
        line, = axes[0].plot(chain.samples[0, :, d].numpy(), lw=0.5, label=f"w{d}")
        axes[0].axhline(float(w_true[d]), color=line.get_color(), ls="--", lw=1)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("weight"), axes[0].legend(fontsize=7)
    axes[0].set_title(f"MALA chain (parallel, {int(chain.stats.iterations[0])} Newton iterations)")
    axes[1].plot(lengths, iterations, "o-")
    axes[1].set_xscale("log"), axes[1].set_xlabel("chain length T"), axes[1].set_ylabel("Newton iterations")
    axes[1].set_ylim(0, max(iterations) * 1.3 + 1)
    axes[1].set_title("iterations vs T")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
