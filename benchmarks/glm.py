"""Benchmark of the probabilistic GLM solvers (issue 13): IterGLM against exact Cholesky
Laplace, plain CG (the same iterates without computational uncertainty) and GPyTorch's SVGP.

Two tasks, one run, numbers printed as tables:

- ``gmm``: Gaussian-mixture classification (C = 10 classes, d = 4, ``--n-train`` points,
  default 20,000), softmax likelihood, RBF kernel with fixed hyperparameters. Test NLL,
  accuracy, ECE, 95 % coverage (of the Bayes-optimal probability of the true class by the
  central interval of ``softmax(f)`` under the latent predictive, 200 MC samples), wall
  time and number of solver actions. Kernel hyperparameters of IterGLM and Cholesky are
  fixed by default; ``--n-hyper n`` sets them by the exact Laplace evidence on ``n`` points
  (SVGP always learns its own, inside its time budget). Cholesky runs on a random subset
  of ``--n-chol`` points (the ``N C x N C`` factorization does not fit at full N).
- ``poisson``: Poisson regression on 2-d inputs with an exposure offset (``--n-poisson``,
  default 5,000, where Cholesky still fits): test NLL of the counts, RMSE of the latent,
  95 % coverage of the true latent, time, actions.

"plain CG" is the same CG mean paired with a *converged* covariance, i.e. without the
computational part: the variance of the largest CG run (gmm) or the exact Cholesky variance
(poisson) — what a solver that ignores its own error would claim.

    python benchmarks/glm.py                 # the full run (minutes on 2 cores)
    python benchmarks/glm.py --n-train 2000 --n-poisson 1000 --n-chol 300   # quick
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import gpytorch
import torch

from bayescurv import metrics
from bayescurv.errors import ConvergenceWarning
from bayescurv.glm import IterGLM, KernelFunction
from bayescurv.links import probit_softmax

DT = torch.float64


def gmm(n: int, C: int = 10, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 2.2 * torch.randn(C, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    X = means[y] + torch.randn(n, d, generator=g, dtype=DT)
    logp = -0.5 * ((X[:, None, :] - means[None]) ** 2).sum(-1)
    return X, y, torch.softmax(logp, -1)


def kernel(lengthscale: float, outputscale: float):
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DT)
    k.base_kernel.lengthscale = lengthscale
    k.outputscale = outputscale
    k.requires_grad_(False)
    return k


def type2_ml(likelihood, X, y, n, k, steps=20, actions=None, **fit):
    """Kernel hyperparameters by maximizing IterGLM's differentiable Laplace evidence on a
    random subset of ``n`` points: ``IterGLM.fit_hyperparameters`` (Adam), with the iterative
    solver's computation-aware evidence when ``actions`` is given, else ``solver="cholesky"``.
    Its time is charged to every IterGLM row."""
    sub = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(7))[:n]
    k.requires_grad_(True)
    kw = dict(solver="cholesky") if actions is None else dict(policy="cg", max_actions=actions,
                                                                tol=1e-8, max_newton=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        IterGLM(likelihood, k, **kw).fit_hyperparameters(
            X[sub], y[sub], **{key: v[sub] for key, v in fit.items()}, n_steps=steps, lr=0.1)
    k.requires_grad_(False)
    return k


def latent_samples(mean, cov, S=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov + 1e-9 * torch.eye(cov.shape[-1], dtype=DT))
    z = torch.randn(S, *mean.shape, generator=g, dtype=DT)
    return mean + torch.einsum("bij,sbj->sbi", L, z)


def set_coverage(probs, y, level=0.95):
    """Fraction of test labels inside the smallest set of classes whose predictive
    probability sums to >= ``level``: the coverage of the 95 % predictive set, i.e. the
    calibration of the predictive probabilities (nominal: >= 0.95, with equality for a
    calibrated predictor up to the set's discreteness)."""
    p, order = probs.sort(-1, descending=True)
    before = p.cumsum(-1) - p  # mass of the classes ranked above
    inside = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < level)
    return inside.gather(-1, y.view(-1, 1)).double().mean().item()


def class_metrics(mean, cov, y, p_true):
    probs = probit_softmax(mean, cov)
    ps = torch.softmax(latent_samples(mean, cov), -1)  # (S, B, C)
    pt = ps.gather(-1, y.view(1, -1, 1).expand(ps.shape[0], -1, 1)).squeeze(-1)
    lo, hi = torch.quantile(pt, 0.025, 0), torch.quantile(pt, 0.975, 0)
    ptrue = p_true.gather(-1, y.view(-1, 1)).squeeze(-1)
    cover = ((ptrue >= lo) & (ptrue <= hi)).double().mean().item()
    return dict(nll=metrics.nll(probs, y), acc=metrics.accuracy(probs, y),
                ece=metrics.ece(probs, y), cover=cover, setcov=set_coverage(probs, y))


def row(name, m, t, actions, extra=""):
    print(f"{name:<26} {m['nll']:>7.4f} {m['acc']:>7.4f} {m['ece']:>7.4f} {m['setcov']:>7.3f} "
          f"{m['cover']:>7.3f} {t:>8.1f} {actions:>8} {extra}")


def svgp(X, y, Xs, C, num_inducing, seconds, seed=0):
    """SVGP with C independent latents, softmax likelihood (no mixing), Adam on mini-batches
    for ``seconds`` of wall time; returns the latent mean and (diagonal) covariance."""
    torch.manual_seed(seed)

    class Model(gpytorch.models.ApproximateGP):
        def __init__(self, Z):
            dist = gpytorch.variational.CholeskyVariationalDistribution(
                Z.shape[1], batch_shape=torch.Size([C]))
            strat = gpytorch.variational.IndependentMultitaskVariationalStrategy(
                gpytorch.variational.VariationalStrategy(self, Z, dist,
                                                         learn_inducing_locations=True),
                num_tasks=C)
            super().__init__(strat)
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([C]))
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.RBFKernel(batch_shape=torch.Size([C])),
                batch_shape=torch.Size([C]))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                             self.covar_module(x))

    Z = X[torch.randperm(X.shape[0])[:num_inducing]].clone().unsqueeze(0).repeat(C, 1, 1)
    model = Model(Z).to(DT)
    lik = gpytorch.likelihoods.SoftmaxLikelihood(num_classes=C, mixing_weights=False).to(DT)
    mll = gpytorch.mlls.VariationalELBO(lik, model, num_data=X.shape[0])
    opt = torch.optim.Adam([*model.parameters(), *lik.parameters()], lr=0.03)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for idx in torch.randperm(X.shape[0]).split(1024):
            opt.zero_grad()
            loss = -mll(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 >= seconds:
                break
    model.eval()
    with torch.no_grad():
        out = model(Xs)
        return out.mean, torch.diag_embed(out.variance), steps


def run_gmm(args):
    C = 10
    X, y, _ = gmm(args.n_train, C, seed=0)
    Xs, ys, ps = gmm(args.n_test, C, seed=1)
    # the generator's means are shared: regenerate the test set from the same means
    g = torch.Generator().manual_seed(0)
    means = 2.2 * torch.randn(C, 4, generator=g, dtype=DT)
    g1 = torch.Generator().manual_seed(1)
    ys = torch.randint(0, C, (args.n_test,), generator=g1)
    Xs = means[ys] + torch.randn(args.n_test, 4, generator=g1, dtype=DT)
    ps = torch.softmax(-0.5 * ((Xs[:, None] - means[None]) ** 2).sum(-1), -1)
    t0 = time.perf_counter()
    k = kernel(2.0, 4.0)
    if args.n_hyper:
        k = type2_ml("classification", X, y, args.n_hyper, k,
                     actions=args.hyper_actions or None)
    t_hyp = time.perf_counter() - t0
    print(f"\n## GMM classification: N = {args.n_train}, C = {C}, d = 4, test {args.n_test}; "
          f"RBF lengthscale {float(k.base_kernel.lengthscale):.3f}, outputscale "
          f"{float(k.outputscale):.3f}" + (f" by the Laplace evidence on {args.n_hyper} points "
          + (f"(IterGLM-CG, {args.hyper_actions} actions: computation-aware) "
             if args.hyper_actions else "(Cholesky) ")
          +
          f"({t_hyp:.1f} s, included in the IterGLM and Cholesky times)" if args.n_hyper
                                           else " (fixed)"))
    print(f"{'method':<26} {'NLL':>7} {'acc':>7} {'ECE':>7} {'set95':>7} {'cov p*':>7} "
          f"{'time s':>8} {'actions':>8}")
    bayes = dict(nll=metrics.nll(ps, ys), acc=metrics.accuracy(ps, ys), ece=metrics.ece(ps, ys),
                 cover=1.0, setcov=set_coverage(ps, ys))
    row("Bayes-optimal", bayes, 0.0, "-")
    curve, runs = [], []
    kf = KernelFunction(k, max_cached=args.n_train ** 2)
    for j in args.actions:
        t0 = time.perf_counter()
        model = IterGLM("classification", kf, policy="cg", max_actions=j, tol=1e-8,
                        max_newton=args.newton).fit(X, y)
        pred = model.predict(Xs, computational=False)
        t = time.perf_counter() - t0 + t_hyp
        # the solver's bound on its computational variance, on the first test points
        nc = min(args.n_comp, Xs.shape[0])
        comp = float(model.predict(Xs[:nc]).computational.mean()) if nc else float("nan")
        m = class_metrics(pred.mean, pred.covariance, ys, ps)
        row(f"IterGLM-CG j={j}", m, t, model.num_actions)
        runs.append((j, t, model.num_actions, pred, m, comp))
    ref_cov = runs[-1][3].covariance  # the most converged covariance
    for j, t, a, pred, m, comp in runs:
        mp = class_metrics(pred.mean, ref_cov, ys, ps)
        row(f"plain CG j={j}", mp, t, a)
        curve.append(dict(j=j, t=t, nll=m["nll"], nll_plain=mp["nll"],
                          var=float(pred.variance.mean()),
                          excess=float((pred.variance - ref_cov.diagonal(dim1=-2, dim2=-1))
                                       .mean()), comp_bound=comp))
    for j in args.unit_actions:
        t0 = time.perf_counter()
        model = IterGLM("classification", kf, policy="unit", block=j // C, max_actions=j,
                        tol=1e-8, max_newton=args.newton).fit(X, y)
        pred = model.predict(Xs, computational=False)
        t = time.perf_counter() - t0
        row(f"IterGLM-unit j={j}", class_metrics(pred.mean, pred.covariance, ys, ps), t,
            model.num_actions)
    del kf
    sub = torch.randperm(args.n_train, generator=torch.Generator().manual_seed(2))[:args.n_chol]
    t0 = time.perf_counter()
    chol = IterGLM("classification", k, solver="cholesky", max_newton=args.newton * 4).fit(
        X[sub], y[sub])
    pred = chol.predict(Xs)
    t = time.perf_counter() - t0 + t_hyp
    row(f"Cholesky N={args.n_chol}", class_metrics(pred.mean, pred.covariance, ys, ps), t,
        args.n_chol * C)
    svgp_pts = []
    # equal wall time: by default SVGP gets each IterGLM-CG run's time (kernel learning included)
    for seconds in args.svgp_seconds or [r[1] for r in runs]:
        t0 = time.perf_counter()
        mean, cov, steps = svgp(X, y, Xs, C, args.inducing, seconds)
        t = time.perf_counter() - t0
        m = class_metrics(mean, cov, ys, ps)
        row(f"SVGP M={args.inducing} {seconds}s", m, t, f"{steps} st")
        svgp_pts.append((t, m["nll"]))
    print("\ncompute curve (IterGLM-CG): actions, seconds, NLL, NLL plain CG, mean total var, "
          "mean excess var over the largest run, mean computational-variance bound")
    for c in curve:
        print("  " + "  ".join(f"{v:.4g}" for v in c.values()))
    if args.plot:
        plot(curve, svgp_pts, bayes["nll"], args.plot)
    return curve


def plot(curve, svgp_pts, bayes_nll, path):
    """NLL against wall time (IterGLM-CG, plain CG, SVGP) and latent variance against actions
    (total, and the computational part: the excess over the largest run and the solver's
    bound), as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    t = [c["t"] for c in curve]
    a1.plot(t, [c["nll"] for c in curve], "o-", label="IterGLM-CG")
    a1.plot(t, [c["nll_plain"] for c in curve], "s--", label="plain CG")
    if svgp_pts:
        a1.plot(*zip(*svgp_pts), "^-", label="SVGP")
    a1.axhline(bayes_nll, color="k", lw=0.8, ls=":", label="Bayes-optimal")
    a1.set(xlabel="wall time [s]", ylabel="test NLL", yscale="log")
    a1.legend(fontsize=7)
    j = [c["j"] for c in curve]
    a2.plot(j, [c["var"] for c in curve], "o-", label="total")
    a2.plot(j, [c["excess"] for c in curve], "s--", label=f"excess over j={j[-1]}")
    a2.plot(j, [c["comp_bound"] for c in curve], "^:", label="computational (bound)")
    a2.set(xlabel="solver actions j", ylabel="mean latent variance", yscale="log")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def run_poisson(args):
    n, ns = args.n_poisson, 2000
    g = torch.Generator().manual_seed(3)

    def truth(x):
        return 1.0 + torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1])

    X = 2 * torch.rand(n, 2, generator=g, dtype=DT) - 1
    Xs = 2 * torch.rand(ns, 2, generator=g, dtype=DT) - 1
    ex = 0.5 + torch.rand(n, generator=g, dtype=DT)
    exs = 0.5 + torch.rand(ns, generator=g, dtype=DT)
    y = torch.poisson(ex * torch.exp(truth(X)), generator=g)
    ys = torch.poisson(exs * torch.exp(truth(Xs)), generator=g)
    t0 = time.perf_counter()
    k = kernel(0.5, 1.0)
    if args.n_hyper_poisson:
        k = type2_ml("poisson", X, y, args.n_hyper_poisson, k, exposure=ex)
    t_hyp = time.perf_counter() - t0
    print(f"\n## Poisson regression: N = {n}, exposure in [0.5, 1.5], test {ns}; RBF "
          f"lengthscale {float(k.base_kernel.lengthscale):.3f}, outputscale "
          f"{float(k.outputscale):.3f}" + (f" by the evidence on {args.n_hyper_poisson} points "
                                           f"({t_hyp:.1f} s, included below)"
                                           if args.n_hyper_poisson else " (fixed)"))
    print(f"{'method':<26} {'NLL':>7} {'RMSE f':>7} {'cov95':>7} {'time s':>8} {'actions':>8}")

    def pmetrics(pred):
        f, v = pred.mean.squeeze(-1), pred.variance.squeeze(-1).clamp_min(1e-12)
        # log E[Poisson(y | e^f)], f ~ N(mean, var): Gauss-Hermite, 40 nodes
        x, w = torch.special.roots_hermite(40) if hasattr(torch.special, "roots_hermite") \
            else _hermite(40)
        fs = f[:, None] + math.sqrt(2) * v.sqrt()[:, None] * x[None]
        lp = ys[:, None] * fs - torch.exp(fs) - torch.lgamma(ys + 1)[:, None]
        nll = -(torch.logsumexp(lp + torch.log(w)[None], -1) - 0.5 * math.log(math.pi)).mean()
        ft = truth(Xs) + torch.log(exs)
        rmse = (f - ft).pow(2).mean().sqrt()
        cover = ((ft - f).abs() <= 1.96 * v.sqrt()).double().mean()
        return float(nll), float(rmse), float(cover)

    def prow(name, pred, t, a):
        nll, rmse, cover = pmetrics(pred)
        print(f"{name:<26} {nll:>7.4f} {rmse:>7.4f} {cover:>7.3f} {t:>8.1f} {a:>8}")

    kf = KernelFunction(k, max_cached=n ** 2)
    t0 = time.perf_counter()
    chol = IterGLM("poisson", kf, solver="cholesky", max_newton=50).fit(X, y, exposure=ex)
    exact = chol.predict(Xs, exposure=exs)
    prow(f"Cholesky N={n}", exact, time.perf_counter() - t0 + t_hyp, n)
    for j in args.poisson_actions:
        t0 = time.perf_counter()
        model = IterGLM("poisson", kf, policy="cg", max_actions=j, tol=1e-8,
                        max_newton=args.newton).fit(X, y, exposure=ex)
        pred = model.predict(Xs, exposure=exs, computational=False)
        t = time.perf_counter() - t0 + t_hyp
        prow(f"IterGLM-CG j={j}", pred, t, model.num_actions)
        plain = type(pred)(pred.mean, exact.covariance, pred.computational)
        prow(f"plain CG j={j}", plain, t, model.num_actions)


def _hermite(n):
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(n)
    return torch.tensor(x, dtype=DT), torch.tensor(w, dtype=DT)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--n-chol", type=int, default=800)
    p.add_argument("--n-poisson", type=int, default=5000)
    p.add_argument("--actions", type=int, nargs="+", default=[5, 15, 40])
    p.add_argument("--unit-actions", type=int, nargs="*", default=[])
    p.add_argument("--poisson-actions", type=int, nargs="+", default=[5, 20, 60])
    p.add_argument("--newton", type=int, default=6)
    p.add_argument("--n-hyper-poisson", type=int, default=200)
    p.add_argument("--n-hyper", type=int, default=2000,
                   help="tune the kernel by the Laplace evidence on this many points (0: fixed "
                        "hyperparameters); the time is charged to IterGLM")
    p.add_argument("--n-comp", type=int, default=50,
                   help="test points for the computational-variance bound (gmm)")
    p.add_argument("--plot", default="", help="write the compute plot (PNG) here")
    p.add_argument("--inducing", type=int, default=128)
    p.add_argument("--svgp-seconds", type=float, nargs="*", default=[],
                   help="SVGP budgets (default: the time of each IterGLM-CG run)")
    p.add_argument("--hyper-actions", type=int, default=40,
                   help="CG actions of the computation-aware evidence for --n-hyper (0: Cholesky)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["gmm", "poisson"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float64")
    if "gmm" in args.tasks:
        run_gmm(args)
    if "poisson" in args.tasks:
        run_poisson(args)


if __name__ == "__main__":
    main()
