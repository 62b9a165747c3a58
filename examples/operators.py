"""Neural-operator uncertainty: an FNO trained on 25 trajectories, turned into a
function-valued GP by linearized Laplace on its last Fourier block (LUNO-style).

For 1D Burgers and Kuramoto–Sivashinsky: a test solution with the predictive mean and its
95 % band (on the training grid and on a grid 4x finer, evaluated from the same posterior),
and beside it the absolute error next to the predicted standard deviation. For 2D
advection–diffusion–reaction: error and predicted std maps in distribution and on the
reversed-velocity and source-term variants (out of distribution).

    OMP_NUM_THREADS=2 python examples/operators.py [--out outputs] [--epochs 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bayescurv
from bayescurv.data import pde
from bayescurv.operators import FNO, FlattenOutput, OperatorGP, tune_prior_precision


def fit(data: pde.OperatorData, val: pde.OperatorData, dim: int, modes, width: int,
        epochs: int, rank: int = 30) -> tuple[FNO, OperatorGP]:
    """MAP-train an FNO, then the linearized-Laplace GP on its last block (low-rank GGN,
    noise = the training misfit, prior precision by validation NLL)."""
    torch.manual_seed(0)
    model = FNO(data.a.shape[1], 1, modes, width=width, depth=4, dim=dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        opt.zero_grad()
        (model(data.a) - data.u).square().mean().backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        sigma = (model(data.a) - data.u).square().mean().sqrt().item()  # training misfit
    loader = [(data.a[i:i + 5], data.u[i:i + 5].flatten(1)) for i in range(0, len(data), 5)]
    la = bayescurv.Laplace(FlattenOutput(model), "regression",
                           subset=[f"operator.{model.last_block}"], structure="lowrank",
                           rank=rank, lowrank_method="lanczos", sigma_noise=sigma)
    la.fit(loader, progress=False)
    tune_prior_precision(la, "val_nll", val=(val.a, val.u), grid=torch.logspace(-3, 5, 17))
    return model, OperatorGP.from_laplace(la)


def plot_1d(name: str, gp: OperatorGP, test: pde.OperatorData, out: Path) -> Path:
    import matplotlib.pyplot as plt

    a, u = test.a[:1], test.u[0, 0]
    n = u.shape[-1]
    mean, var = gp.predict(a)
    fine = 4 * n
    mean_f, var_f = gp.predict(a, out_size=fine)
    x, xf = torch.arange(n) / n, torch.arange(fine) / fine
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.plot(x, u, "k", lw=1.5, label="true u(T)")
    ax1.plot(xf, mean_f[0, 0], "C0", lw=1, label=f"mean ({fine} points)")
    sd = var_f[0, 0].sqrt()
    ax1.fill_between(xf, mean_f[0, 0] - 1.96 * sd, mean_f[0, 0] + 1.96 * sd, color="C0",
                     alpha=0.25, label="95% band")
    ax1.plot(x, a[0, 0], "k:", lw=0.8, label="input a")
    ax1.set_title(f"{name}: prediction on a 4x finer grid")
    ax1.legend(fontsize=7)
    ax2.plot(x, (mean[0, 0] - u).abs(), "C3", label="|error|")
    ax2.plot(x, var[0, 0].sqrt(), "C0", label="predicted std")
    ax2.set_title(f"{name}: error and predicted std ({n} points)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"operators_{name.lower()}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_adr(gp: OperatorGP, tests: dict[str, pde.OperatorData], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tests), 3, figsize=(9, 3 * len(tests)))
    for row, (name, d) in zip(axes, tests.items()):
        mean, var = gp.predict(d.a[:1])
        panels = [("solution", d.u[0, 0]), ("|error|", (mean - d.u[:1])[0, 0].abs()),
                  ("predicted std", var[0, 0].sqrt())]
        for ax, (title, img) in zip(row, panels):
            im = ax.imshow(img.detach(), origin="lower")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = out / "operators_adr.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out_dir: str | Path = "outputs", epochs: int = 400, n_train: int = 25) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, make, size, modes in (("Burgers", pde.burgers, 128, 12),
                                    ("KS", pde.kuramoto_sivashinsky, 128, 16)):
        data = make(n_train + 15, size)
        train, rest = data.split(n_train)
        val, test = rest.split(10)
        _, gp = fit(train, val, 1, modes, 16, epochs)
        results[name] = plot_1d(name, gp, test, out)
    data = pde.advection_diffusion_reaction(n_train + 15, 32)
    train, rest = data.split(n_train)
    val, test = rest.split(10)
    _, gp = fit(train, val, 2, (5, 5), 8, epochs)
    tests = {"in distribution": test}
    for variant in ("reversed", "source"):
        tests[f"{variant} (OOD)"] = pde.advection_diffusion_reaction(5, 32, variant=variant,
                                                                     seed=1)
    results["ADR"] = plot_adr(gp, tests, out)
    for k, v in results.items():
        print(f"{k}: {v}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs")
    ap.add_argument("--epochs", type=int, default=400)
    args = ap.parse_args()
    main(args.out, args.epochs)
