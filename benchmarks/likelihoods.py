"""Heteroscedastic regression benchmark (issue 31): bayescurv's heteroscedastic Laplace beside
a MAP mean-variance network, a 5-member deep ensemble of them and the homoscedastic Laplace.

Data (offline): scikit-learn's ``diabetes`` (442 x 10), statsmodels' ``engel`` (235 x 1,
household income -> food expenditure, a textbook heteroscedastic set) and a synthetic set
with known input-dependent noise, ``y = sin(2x) + (0.1 + 0.4|x|)·ε``, ``x ~ U[-3, 3]``,
``n = 400``. Each split: 80 % train / 20 % test (random, per seed), inputs and targets
standardized on the training part; figures are on the standardized scale.

Network: MLP d-50-2 (tanh) for the mean-variance models, d-50-1 for the homoscedastic one;
full-batch Adam (lr 1e-2, 1000 steps) on the summed NLL plus the Gaussian prior's penalty
``½δ‖θ‖²`` with ``δ = 1`` (a MAP estimate).

- ``MAP``: the mean-variance network (natural parameters, :class:`NaturalHead`), predictive
  ``N(μ(x), σ²(x))``;
- ``ensemble``: 5 such networks from different initializations; the predictive is the
  moment-matched Gaussian of the mixture for coverage and CRPS, the mixture itself for the
  log-likelihood;
- ``homo Laplace``: MSE network, ``Laplace("regression", "kfac")``, prior and noise tuned by
  the marginal likelihood;
- ``hetero Laplace``: the MAP network of the first row, ``Laplace("heteroscedastic",
  structure)`` post hoc, the prior tuned by the marginal likelihood; predictive variance
  ``epistemic + aleatoric`` (delta method), post hoc;
- ``hetero Laplace, online``: Immer et al.'s setting, weights and prior precision trained
  together by the online marginal likelihood (:func:`~bayescurv.laplace.online.
  marglik_training`, K-FAC, same number of Adam steps, evidence steps every 5 % of them after
  a 10 % burn-in; the best-evidence model is kept).

Metrics on the test part: mean Gaussian log-likelihood per point, coverage of the central
95 % interval, CRPS (closed form for a Gaussian), and fit time (training + posterior, seconds
of wall clock on a shared 2-core machine, so read them as ratios within a row set).

    OMP_NUM_THREADS=1 python benchmarks/likelihoods.py [--seeds 3] [--steps 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.likelihoods import NaturalHead

DT = torch.float64


def datasets(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_diabetes
    from statsmodels.datasets import engel

    d = load_diabetes()
    e = engel.load_pandas().data
    rng = np.random.default_rng(1000 + seed)
    x = rng.uniform(-3, 3, size=(400, 1))
    y = np.sin(2 * x[:, 0]) + (0.1 + 0.4 * np.abs(x[:, 0])) * rng.standard_normal(400)
    return {"diabetes": (d.data, d.target), "engel": (e[["income"]].to_numpy(),
                                                     e["foodexp"].to_numpy()),
            "synthetic": (x, y)}


def split(x, y, seed):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n = int(0.8 * len(y))
    tr, te = idx[:n], idx[n:]
    mx, sx = x[tr].mean(0), x[tr].std(0) + 1e-12
    my, sy = y[tr].mean(), y[tr].std()

    def t(a, m, s):
        return torch.as_tensor((a - m) / s, dtype=DT)
    return (t(x[tr], mx, sx), t(y[tr], my, sy).unsqueeze(-1),
            t(x[te], mx, sx), t(y[te], my, sy).unsqueeze(-1))


def mlp(d: int, out: int, natural: bool) -> nn.Module:
    layers = [nn.Linear(d, 50), nn.Tanh(), nn.Linear(50, out)]
    return nn.Sequential(*layers, *([NaturalHead()] if natural else [])).to(DT)


def train(model, lik, x, y, steps, delta=1.0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = lik.nll(*lik.check(model(x), y)) + 0.5 * delta * sum(
            p.square().sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


def gauss_metrics(mu, var, y):
    sd = var.sqrt()
    z = (y - mu) / sd
    ll = (-0.5 * z**2 - sd.log() - 0.5 * math.log(2 * math.pi)).mean()
    normal = torch.distributions.Normal(0.0, 1.0)
    cover = (z.abs() <= 1.959964).to(DT).mean()
    pdf, cdf = normal.log_prob(z).exp(), normal.cdf(z)
    crps = (sd * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean()
    return float(ll), float(cover), float(crps)


def run(name, x, y, xt, yt, seed, steps, structure, online=True):
    from bayescurv.likelihoods import Gaussian, Heteroscedastic

    het, d = Heteroscedastic(), x.shape[1]
    rows = {}
    members, times = [], []
    for k in range(5):
        torch.manual_seed(100 * seed + k)
        t0 = time.perf_counter()
        members.append(train(mlp(d, 2, True), het, x, y, steps))
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        mv = [het.mean_var(m(xt)) for m in members]
    mu, var = mv[0]
    rows["MAP"] = (*gauss_metrics(mu, var, yt), times[0])
    mus, vars_ = torch.stack([m for m, _ in mv]), torch.stack([v for _, v in mv])
    emu = mus.mean(0)
    evar = (vars_ + mus.square()).mean(0) - emu.square()
    comp = torch.distributions.Normal(mus, vars_.sqrt()).log_prob(yt.unsqueeze(0))
    mix_ll = float((torch.logsumexp(comp, 0) - math.log(5)).mean())
    _, cov_e, crps_e = gauss_metrics(emu, evar, yt)
    rows["ensemble (5)"] = (mix_ll, cov_e, crps_e, sum(times))

    torch.manual_seed(100 * seed)
    t0 = time.perf_counter()
    homo = train(mlp(d, 1, False), Gaussian(1.0), x, y, steps)
    la = Laplace(homo, "regression", structure="kfac", prior_precision=1.0).fit([(x, y)])
    la.optimize_prior_precision(tune_sigma_noise=True)
    t_h = time.perf_counter() - t0
    mu_h, var_h = la.predict(xt)
    rows["homo Laplace"] = (*gauss_metrics(mu_h, var_h, yt), t_h)

    t0 = time.perf_counter()
    lh = Laplace(members[0], "heteroscedastic", structure=structure,
                 prior_precision=1.0).fit([(x, y)])
    lh.optimize_prior_precision()
    t_l = time.perf_counter() - t0
    mu_l, epi, ale = lh.predict(xt)
    rows[f"hetero Laplace ({structure})"] = (*gauss_metrics(mu_l, epi + ale, yt),
                                             times[0] + t_l)
    if online:  # Immer et al.'s setting: weights and prior trained by the evidence
        from bayescurv.laplace.online import marglik_training

        torch.manual_seed(100 * seed)
        t0 = time.perf_counter()
        res = marglik_training(mlp(d, 2, True), [(x, y)], "heteroscedastic",
                               structure="kfac", n_epochs=steps, lr=1e-2,
                               n_epochs_burnin=steps // 10, marglik_frequency=steps // 20,
                               n_hypersteps=20)
        t_o = time.perf_counter() - t0
        mu_o, epi_o, ale_o = res.laplace.predict(xt)
        rows["hetero Laplace, online (kfac)"] = (*gauss_metrics(mu_o, epi_o + ale_o, yt), t_o)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--structure", default="full")
    ap.add_argument("--no-online", action="store_true", help="skip the online-marglik row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, list]] = {}
    for seed in range(args.seeds):
        for name, (x, y) in datasets(seed).items():
            rows = run(name, *split(x, y, seed), seed, args.steps, args.structure,
                       not args.no_online)
            for method, vals in rows.items():
                results.setdefault(name, {}).setdefault(method, []).append(vals)
                print(f"seed {seed} {name} {method}: LL {vals[0]:.3f} coverage {vals[1]:.3f} "
                      f"CRPS {vals[2]:.3f} fit {vals[3]:.1f} s", flush=True)
    print(f"| data | method | test LL ↑ | 95% coverage | CRPS ↓ | fit s |  ({args.seeds} seeds,"
          " mean ± std)")
    print("|---|---|---|---|---|---|")
    for name, methods in results.items():
        for method, vals in methods.items():
            a = np.array(vals)
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(a.mean(0)[:3], a.std(0)[:3]))
            print(f"| {name} | {method} | {cells} | {a[:, 3].mean():.1f} |")


if __name__ == "__main__":
    main()
