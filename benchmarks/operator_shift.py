"""Does the operator posterior see a distribution shift? (issue 29)

The 1D heat equation with a source, solved in closed form (:func:`bayescurv.data.pde.heat`),
64-point grid, ``n_train`` training functions; our FNO and ``neuralop``'s FNO (split complex
weights) trained by Adam on the MSE. Test splits: in distribution, ``frequency`` (initial states
of much higher frequency than in training) and ``source`` (a non-zero source term, zero in
training). For each posterior: RMSE, mean predicted std, 95 % coverage per split, and the
OOD / in-distribution ratios of the std and of the RMSE (a posterior that sees the shift has
std ratio ~ error ratio and OOD coverage near 0.95). ``cost``: seconds for fitting and tuning
the posterior, as a multiple of one training epoch in the same run.

Posteriors:

- ``last block (val σ hand-set)``: the documented LUNO recipe before issue 29: low-rank GGN
  (Lanczos) on the last Fourier block, σ = training RMSE, prior precision by validation NLL;
- ``last block (marglik+σ)``: the same, prior and σ by the Laplace evidence
  (``optimize_prior_precision(tune_sigma_noise=True)``);
- ``all weights (val prior+σ)``: every weight (lifting, all spectral and pointwise weights,
  projection), exact diagonal GGN, prior precision and σ by validation NLL
  (:func:`bayescurv.operators.tune_prior_precision` with ``tune_sigma_noise=True``).

    OMP_NUM_THREADS=1 python benchmarks/operator_shift.py [--tiny] [--only before|after]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

import bayescurv
from bayescurv.data import pde
from bayescurv.operators import FNO, FlattenOutput, OperatorGP, evaluate, tune_prior_precision


@dataclass
class Config:
    n_train: int = 300
    n_val: int = 50
    n_test: int = 100
    size: int = 64
    modes: int = 12
    width: int = 16
    depth: int = 4
    epochs: int = 150
    batch: int = 50
    lr: float = 1e-2
    rank: int = 50
    seed: int = 0


TINY = Config(n_train=20, n_val=10, n_test=10, size=32, modes=6, width=4, depth=2, epochs=5,
              batch=10, rank=5)


def make_data(cfg: Config) -> dict[str, pde.OperatorData]:
    data = pde.heat(cfg.n_train + cfg.n_val + cfg.n_test, cfg.size, seed=cfg.seed)
    train, rest = data.split(cfg.n_train)
    val, test = rest.split(cfg.n_val)
    out = {"train": train, "val": val, "test": test}
    for v in ("frequency", "source"):
        out[v] = pde.heat(cfg.n_test, cfg.size, variant=v, seed=cfg.seed + 1)
    return out


def make_model(kind: str, cfg: Config) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if kind == "ours":
        return FNO(2, 1, cfg.modes, width=cfg.width, depth=cfg.depth, dim=1)
    from neuralop.models import FNO as NFNO

    from bayescurv.operators import split_complex

    return split_complex(NFNO(n_modes=(cfg.modes,), hidden_channels=cfg.width, in_channels=2,
                              out_channels=1, n_layers=cfg.depth))


def last_block(kind: str, cfg: Config) -> list[str]:
    if kind == "ours":
        return [f"operator.blocks.{cfg.depth - 1}"]
    return [f"operator.fno_blocks.convs.{cfg.depth - 1}",
            f"operator.fno_blocks.fno_skips.{cfg.depth - 1}"]


def train(model, data: pde.OperatorData, cfg: Config) -> float:
    """Adam on the MSE; returns the seconds of one epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(data), generator=g).split(cfg.batch):
            opt.zero_grad()
            (model(data.a[idx]) - data.u[idx]).square().mean().backward()
            opt.step()
        sched.step()
    return (time.perf_counter() - t0) / cfg.epochs


def widen(model, size: int) -> None:
    """Exploration (``--widen``, our FNO only): every block's spectral weights widened to all
    ``size // 2`` modes, zero beyond the trained ones (the same function at θ*), so that the
    posterior holds weights for the modes the network truncates."""
    from bayescurv.operators.spectral import SpectralConv

    for blk in model.blocks:
        old = blk.spectral
        new = SpectralConv(old.in_channels, old.out_channels, size // 2, 1)
        with torch.no_grad():
            new.weight_real.zero_()
            new.weight_imag.zero_()
            new.weight_real[..., :old.modes[0]] = old.weight_real
            new.weight_imag[..., :old.modes[0]] = old.weight_imag
        blk.spectral = new


def loader(data: pde.OperatorData, cfg: Config):
    return [(data.a[i:i + cfg.batch], data.u[i:i + cfg.batch].flatten(1))
            for i in range(0, len(data), cfg.batch)]


def posteriors(kind, model, data, cfg, which):
    """``name -> (OperatorGP, cost seconds)``."""
    flat = FlattenOutput(model)
    with torch.no_grad():
        sigma = (model(data["train"].a) - data["train"].u).square().mean().sqrt().item()
    val = (data["val"].a, data["val"].u)
    out = {}
    if which in ("before", "all"):
        t0 = time.perf_counter()
        la = bayescurv.Laplace(flat, "regression", subset=last_block(kind, cfg),
                               structure="lowrank", rank=cfg.rank, lowrank_method="lanczos",
                               sigma_noise=sigma)
        la.fit(loader(data["train"], cfg), progress=False)
        t_fit = time.perf_counter() - t0
        tune_prior_precision(la, "val_nll", val=val, grid=torch.logspace(-3, 5, 17))
        out["last block (val, σ hand-set)"] = (OperatorGP.from_laplace(la),
                                              time.perf_counter() - t0)
        t0 = time.perf_counter()
        la.prior_precision = 1.0
        la.optimize_prior_precision(tune_sigma_noise=True)
        out["last block (marglik+σ)"] = (OperatorGP.from_laplace(la),
                                         t_fit + time.perf_counter() - t0)
    if which in ("after", "all"):
        t0 = time.perf_counter()
        la = bayescurv.Laplace(flat, "regression", subset="all", structure="diag",
                               sigma_noise=sigma)
        la.fit(loader(data["train"], cfg), progress=False)
        tune_prior_precision(la, "val_nll", val=val, tune_sigma_noise=True)
        out["all weights (val prior+σ)"] = (OperatorGP.from_laplace(la),
                                            time.perf_counter() - t0)
    return out


@torch.no_grad()
def resolution(kind: str, model, cfg: Config) -> None:
    """Relative L2 error of the mean on the training grid and on a 2x finer one (the exact
    solution there), for neuralop with its linear skip resampling and with the spectral one."""
    d = pde.heat(cfg.n_test, cfg.size, seed=cfg.seed + 2, out_size=2 * cfg.size)
    coarse = pde.heat(cfg.n_test, cfg.size, seed=cfg.seed + 2)

    def rel(p, u):
        return float((p - u).norm() / u.norm())

    line = f"{kind}: rel. L2 on {cfg.size} points {rel(model(coarse.a), coarse.u):.4f}"
    flat = FlattenOutput(model)
    convs = [m for m in model.modules() if hasattr(m, "spectral_transform")]
    for name, spectral in (("spectral", True), ("neuralop linear", False)):
        if not convs and not spectral:
            continue
        for m in convs:
            m.spectral_transform = spectral
        fine = flat(d.a, 2 * cfg.size).reshape(d.u.shape)
        line += (f"; on {2 * cfg.size} points ({name} skip resampling) {rel(fine, d.u):.4f}, "
                 f"max |fine[::2] - coarse| {float((fine[..., ::2] - model(d.a)).abs().max()):.1e}")
    for m in convs:
        del m.spectral_transform
    print(line, flush=True)


def run(cfg: Config, which: str = "all", kinds=("ours", "neuralop"),
        widened: bool = False) -> list[dict]:
    data = make_data(cfg)
    rows = []
    for kind in kinds:
        model = make_model(kind, cfg)
        epoch = train(model, data["train"], cfg)
        model.eval()
        resolution(kind, model, cfg)
        if widened and kind == "ours":
            widen(model, cfg.size)
        print(f"{kind}: trained, one epoch {epoch:.2f} s", flush=True)
        for name, (gp, cost) in posteriors(kind, model, data, cfg, which).items():
            print(f"{kind}: {name} fitted and tuned in {cost:.0f} s", flush=True)
            res = {}
            for split in ("test", "frequency", "source"):
                d = data[split]
                mean, var = gp.predict(d.a)
                res[split] = evaluate(mean, var, d.u)
            for split in ("frequency", "source"):
                rows.append({
                    "model": kind, "posterior": name, "shift": split,
                    "rmse_id": res["test"]["rmse"], "rmse_ood": res[split]["rmse"],
                    "err_ratio": res[split]["rmse"] / res["test"]["rmse"],
                    "std_ratio": res[split]["mean_std"] / res["test"]["mean_std"],
                    "std_over_rmse_id": res["test"]["mean_std"] / res["test"]["rmse"],
                    "cov_id": res["test"]["coverage95"], "cov_ood": res[split]["coverage95"],
                    "cost_epochs": cost / epoch, "sigma": float(gp.sigma_noise)})
            print(table(rows[-2:]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["err_ratio", "std_ratio", "cov_ood", "cov_id", "std_over_rmse_id", "rmse_id",
            "sigma", "cost_epochs"]
    out = ["| model | posterior | shift | " + " | ".join(cols) + " |",
           "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['posterior']} | {r['shift']} | "
                   + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="all", choices=["before", "after", "all"])
    ap.add_argument("--kinds", default="ours,neuralop")
    ap.add_argument("--widen", action="store_true", help="our FNO with all modes (exploration)")
    args = ap.parse_args()
    cfg = TINY if args.tiny else Config()
    t0 = time.perf_counter()
    rows = run(cfg, args.only, tuple(args.kinds.split(",")), args.widen)
    print(f"threads {torch.get_num_threads()}; total {time.perf_counter() - t0:.0f} s "
          f"(a shared 2-core machine)")
    print(table(rows))


__all__ = ["Config", "TINY", "run", "table"]

if __name__ == "__main__":
    main()
