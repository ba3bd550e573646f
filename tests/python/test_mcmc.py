"""pnewton.mcmc: MALA and HMC chains evaluated in parallel equal the sequential chains,
accept decisions included, against loops written here with torch.autograd (issue 24)."""
import math

import pytest
import torch

import pnewton


def gaussian(D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    prec = A @ A.T / D + torch.eye(D, dtype=torch.float64)
    return lambda x: -0.5 * ((x @ prec) * x).sum(1)


def logistic(N=100, D=3, seed=0):
    """A Bayesian logistic regression posterior on synthetic data (prior N(0, 4I))."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = (torch.rand(N, generator=gen, dtype=torch.float64) < torch.sigmoid(X @ torch.tensor([1.5, -1.0, 0.5],
                                                                                           dtype=torch.float64))).double()
    def log_prob(w):
        logits = w @ X.T  # [N_w, N]
        return (y * logits - torch.nn.functional.softplus(logits)).sum(1) - (w ** 2).sum(1) / 8
    return log_prob


def gradient(log_prob, x):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(log_prob(x).sum(), x)[0]


def mala_loop(log_prob, x, noise, eps):
    D, out, acc = x.shape[1], [], []
    for t in range(noise.shape[1]):
        z, log_u = noise[:, t, :D], noise[:, t, D]
        gx = gradient(log_prob, x)
        y = x + eps * gx + math.sqrt(2 * eps) * z
        gy = gradient(log_prob, y)
        log_alpha = (log_prob(y) - log_prob(x) - ((x - y - eps * gy) ** 2).sum(1) / (4 * eps)
                     + ((y - x - eps * gx) ** 2).sum(1) / (4 * eps))
        a = log_u < log_alpha
        x = torch.where(a[:, None], y, x)
        out.append(x), acc.append(a)
    return torch.stack(out, 1), torch.stack(acc, 1)


def hmc_loop(log_prob, x, noise, eps, L):
    D, out, acc = x.shape[1], [], []
    for t in range(noise.shape[1]):
        p0, log_u = noise[:, t, :D], noise[:, t, D]
        q, p = x, p0 + 0.5 * eps * gradient(log_prob, x)
        for i in range(L):
            q = q + eps * p
            p = p + (eps if i < L - 1 else 0.5 * eps) * gradient(log_prob, q)
        a = log_u < (-log_prob(x) + 0.5 * (p0 ** 2).sum(1)) - (-log_prob(q) + 0.5 * (p ** 2).sum(1))
        x = torch.where(a[:, None], q, x)
        out.append(x), acc.append(a)
    return torch.stack(out, 1), torch.stack(acc, 1)


def noise_of(x0, T, seed):
    """What the sampler draws from a generator seeded `seed`: T·(D normals, one uniform)."""
    gen = torch.Generator().manual_seed(seed)
    B, D = x0.shape
    z = torch.randn(B, T, D, generator=gen, dtype=x0.dtype)
    return torch.cat([z, torch.rand(B, T, 1, generator=gen, dtype=x0.dtype).log()], -1)


@pytest.mark.parametrize("target, eps, T", [("gaussian", 0.1, 2000), ("logistic", 0.05, 1500)])
@pytest.mark.parametrize("method", ["auto", "quasi_deer"])
def test_mala_is_the_sequential_chain(target, eps, T, method):
    log_prob = {"gaussian": gaussian, "logistic": logistic}[target]()
    D = 6 if target == "gaussian" else 3
    x0 = torch.zeros(2, D, dtype=torch.float64)
    chain = pnewton.mcmc.mala(log_prob, x0, T, eps, generator=torch.Generator().manual_seed(7), method=method)
    ref, accepted = mala_loop(log_prob, x0, noise_of(x0, T, 7), eps)
    assert bool(chain.stats.converged.all()) and not bool(chain.stats.fell_back.any())
    # Predictable chains: a handful of exact Newton iterations (auto, at this size); quasi_deer
    # on the estimated diagonal takes more, each far cheaper.
    assert chain.stats.method == ("deer" if method == "auto" else "quasi_deer")
    assert int(chain.stats.iterations.max()) <= (25 if method == "auto" else 120)
    torch.testing.assert_close(chain.samples, ref, rtol=0, atol=1e-10)
    assert torch.equal(chain.accepted, accepted) and 0.3 < float(chain.acceptance_rate.min()) < 1
    assert chain.seconds > 0


@pytest.mark.parametrize("method", ["auto", "quasi_deer"])
def test_hmc_is_the_sequential_chain(method):
    # Short trajectories (εL = 0.3): longer ones are less predictable (ε = 0.15, L = 4: the
    # perturbations of a nearly independent proposal are not forgotten, and every method
    # falls back to the loop here; benchmarks/bench_mcmc.py).
    log_prob = logistic()
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    chain = pnewton.mcmc.hmc(log_prob, x0, 400, 0.1, 3, generator=torch.Generator().manual_seed(3), method=method)
    ref, accepted = hmc_loop(log_prob, x0, noise_of(x0, 400, 3), 0.1, 3)
    assert bool(chain.stats.converged.all()) and not bool(chain.stats.fell_back.any())
    assert int(chain.stats.iterations.max()) <= (25 if method == "auto" else 60)
    torch.testing.assert_close(chain.samples, ref, rtol=0, atol=1e-10)
    assert torch.equal(chain.accepted, accepted) and bool((~chain.accepted).any())


@pytest.mark.parametrize("sampler", ["mala", "hmc"])
def test_the_estimated_diagonal_is_exact_where_coordinates_decouple(sampler):
    """With a separable target (a diagonal Hessian) Hutchinson's z ⊙ Hz is the Hessian's
    diagonal and the leapfrog's 2×2 blocks per coordinate are exact: the estimate equals
    torch.func's Jacobian diagonal, rejected rows included (1 there)."""
    torch.manual_seed(0)
    prec = torch.rand(5, dtype=torch.float64) + 0.5
    log_prob = lambda x: -0.5 * (prec * x ** 2).sum(1) - 0.1 * (x ** 4).sum(1)  # noqa: E731
    x = torch.randn(64, 5, dtype=torch.float64) * 1.5
    u = noise_of(x, 1, 0)[:, 0]
    step = pnewton.mcmc._MALA(log_prob, 0.3) if sampler == "mala" else pnewton.mcmc._HMC(log_prob, 0.4, 4)
    exact = step.jacobian(x, u, False)
    assert exact.shape == (64, 5, 5)
    torch.testing.assert_close(step.jacobian(x, u, True), exact.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
    accepted = step.decide(x, u)[1]
    assert bool(accepted.any()) and bool((~accepted).any())


@pytest.mark.parametrize("method", ["sequential", "quasi_deer", "elk_filter"])
def test_every_method_gives_the_same_chain(method):
    log_prob = gaussian(D=3)
    x0 = torch.randn(1, 3, dtype=torch.float64)
    want = pnewton.mcmc.mala(log_prob, x0, 300, 0.2, generator=torch.Generator().manual_seed(1))
    got = pnewton.mcmc.mala(log_prob, x0, 300, 0.2, generator=torch.Generator().manual_seed(1), method=method)
    torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=1e-10)
    assert torch.equal(got.accepted, want.accepted)


def test_one_chain_from_a_vector_and_an_empty_chain():
    chain = pnewton.mcmc.mala(gaussian(D=2), torch.zeros(2, dtype=torch.float64), 50, 0.1)
    assert chain.samples.shape == (1, 50, 2) and chain.accepted.shape == (1, 50)
    empty = pnewton.mcmc.hmc(gaussian(D=2), torch.zeros(3, 2, dtype=torch.float64), 0, 0.1, 3)
    assert empty.samples.shape == (3, 0, 2) and empty.accepted.shape == (3, 0)


def test_bad_arguments_are_named():
    lp = gaussian(D=2)
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="x0"):
        pnewton.mcmc.mala(lp, torch.zeros(1, 2, dtype=torch.long), 10, 0.1)
    with pytest.raises(ValueError, match="steps"):
        pnewton.mcmc.mala(lp, x0, -1, 0.1)
    with pytest.raises(ValueError, match="step_size"):
        pnewton.mcmc.mala(lp, x0, 10, 0.0)
    with pytest.raises(ValueError, match="leapfrog_steps"):
        pnewton.mcmc.hmc(lp, x0, 10, 0.1, 0)
    with pytest.raises(ValueError, match="log_prob"):
        pnewton.mcmc.mala(lambda x: x, x0, 10, 0.1)
    with pytest.raises(TypeError, match="generator"):
        pnewton.mcmc.mala(lp, x0, 10, 0.1, generator=0)


def test_example_runs(tmp_path, monkeypatch, capsys):
    """examples/mcmc_logistic.py, shortened: the parallel chain equals the loop's."""
    import importlib.util
    import os
    import sys
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mcmc_logistic.py")
    spec = importlib.util.spec_from_file_location("mcmc_logistic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plot = tmp_path / "chain.png"
    monkeypatch.setattr(sys, "argv", ["mcmc_logistic.py", "--steps", "320", "--plot", str(plot)])
    module.main()
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 5 and all(float(r[-1]) <= 1e-10 for r in rows)  # max |Δ| against the loop
    assert plot.exists() and plot.stat().st_size > 10_000
