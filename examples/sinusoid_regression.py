"""Post-hoc Laplace on the sinusoid of the laplace-torch docs, with a known answer.

    OMP_NUM_THREADS=2 .venv/bin/python examples/sinusoid_regression.py

Data: ``x ~ U(0, 8)``, ``n = 150``, ``y = sin x + N(0, 0.3²)`` (:func:`bayescurv.data.sinusoid`).
A 1-50-1 tanh network is trained to the MAP with full-batch Adam on the mean squared error
(plus a weak weight decay); then Laplace posteriors over all weights (``"kfac"`` and
``"full"``) have their prior precision *and* observation noise tuned by maximizing the log
marginal likelihood. The tuned noise should come out near the true 0.3. The predictive
(mean ± 2 standard deviations of ``y``, observation noise included) is written to
``outputs/sinusoid_regression.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.data import sinusoid

MAP_STEPS, LR, WEIGHT_DECAY, HYPER_STEPS = 1500, 1e-2, 1e-4, 500


def train_map(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    """1-50-1 tanh net, full-batch Adam on the mean squared error."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(MAP_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log density of ``y`` under ``N(mean, var)``."""
    return float(0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var).mean())


def main(out_dir: str | Path = "outputs") -> dict[str, tuple[float, float]]:
    t0 = time.perf_counter()
    data = sinusoid(n=150, noise=0.3, seed=0)
    model = train_map(data.x_train, data.y_train)
    with torch.no_grad():
        rmse = float((model(data.x_train) - data.y_train).pow(2).mean().sqrt())
    print(f"MAP: 1-50-1 tanh, {MAP_STEPS} Adam steps, train RMSE {rmse:.3f} "
          f"(true noise 0.3), {time.perf_counter() - t0:.1f} s")

    loader = [(data.x_train, data.y_train)]
    inside = (data.x_test[:, 0] >= 0) & (data.x_test[:, 0] <= 8)
    results, preds = {}, {}
    print(f"{'structure':9s} {'sigma':>7s} {'prior prec':>11s} {'log evidence':>13s} "
          f"{'test NLL [0,8]':>15s} {'seconds':>8s}")
    for structure in ("kfac", "full"):
        t1 = time.perf_counter()
        la = Laplace(model, "regression", subset="all", structure=structure,
                     prior_precision=1.0, sigma_noise=1.0).fit(loader, progress=False)
        la.optimize_prior_precision(method="marglik", n_steps=HYPER_STEPS,
                                    tune_sigma_noise=True)
        mean, var = la.predict(data.x_test)  # variance of y: latent + sigma²
        sigma, prior = float(la.sigma_noise), float(la.prior_precision)
        nll = gaussian_nll(mean[inside], var[inside], data.y_test[inside])
        print(f"{structure:9s} {sigma:7.3f} {prior:11.3f} "
              f"{float(la.log_marginal_likelihood()):13.2f} {nll:15.3f} "
              f"{time.perf_counter() - t1:8.2f}")
        results[structure] = (sigma, prior)
        preds[structure] = (mean.detach(), var.detach())

    path = plot(data, preds, results, Path(out_dir) / "sinusoid_regression.png")
    print(f"predictive plot: {path}  (total {time.perf_counter() - t0:.1f} s)")
    return results


def plot(data, preds: dict, results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = data.x_test[:, 0]
    fig, axes = plt.subplots(1, len(preds), figsize=(5 * len(preds), 3.6), sharey=True)
    for ax, (structure, (mean, var)) in zip(axes, preds.items()):
        m, s = mean[:, 0], var[:, 0].sqrt()
        ax.fill_between(x, m - 2 * s, m + 2 * s, color="C0", alpha=0.25, label="mean ± 2 std")
        ax.plot(x, m, color="C0", label="predictive mean")
        ax.plot(x, data.f_test[:, 0], "k--", lw=1, label="sin x")
        ax.scatter(data.x_train[:, 0], data.y_train[:, 0], s=6, color="k", alpha=0.6,
                   label="training data")
        sigma, prior = results[structure]
        ax.set_title(f"{structure}: σ = {sigma:.3f}, prior precision = {prior:.2f}")
        ax.set_xlabel("x")
        ax.set_ylim(-3, 3)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
