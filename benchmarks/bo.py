"""BoTorch benchmark of the linearized-Laplace surrogate (issue 5).

1. BO loops on Branin (2-d) and Hartmann6 (6-d), maximizing the negated function: our
   ``LaplaceModel``, laplace-bayesopt's ``LaplaceBoTorch`` (when importable), ``SingleTaskGP``
   and random search; LogEI optimized with ``optimize_acqf``; simple regret per evaluation,
   median over seeds (table + PNG); wall time per BO iteration.
2. Scaling: fit + posterior time against the number of observations for our surrogate and
   ``SingleTaskGP``.
3. ``condition_on_observations`` at 2000 observations: our warm-started refinement vs
   laplace-bayesopt's retraining from scratch.

All ratios are measured in one run. Outputs go to ``outputs/bo/``.

    OMP_NUM_THREADS=1 python benchmarks/bo.py               # full configuration (~15 min)
    OMP_NUM_THREADS=1 python benchmarks/bo.py --quick       # smoke run (seconds)

Scaled to run in about 15 minutes on one or two CPU threads: 2 restarts x 32 raw samples for
optimize_acqf, 500 MAP steps (100 for a refinement), laplace-bayesopt with 20 epochs of
batch 10 (its default is 1000 epochs), SingleTaskGP hyperparameters fit with at most 15 L-BFGS
iterations and at most 120 s in the scaling section (so GP fit times there are lower
bounds). The sections can run as separate processes
(``--skip scaling condition`` and ``--skip regret``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin, Hartmann
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import nn

from bayescurv.bo import LaplaceModel

DT = torch.float64
OUT = Path("outputs/bo")

# benchmarks/laplace.py would shadow laplace-torch's ``laplace`` package (imported by
# laplace-bayesopt): drop this script's folder from the import path first
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
try:  # laplace-bayesopt is optional (installed with --no-deps)
    from laplace_bayesopt.botorch import LaplaceBoTorch
except Exception as exc:  # pragma: no cover - depends on the environment
    print(f"laplace-bayesopt not importable ({exc!r})")
    LaplaceBoTorch = None


def problems():
    return {"Branin": Branin(negate=True).to(DT), "Hartmann6": Hartmann(dim=6, negate=True).to(DT)}


class Center(nn.Module):
    """``x -> 2x - 1``: maps the ``Normalize``d unit box to ``[-1, 1]^d`` so the network (and
    its NTK) is centred on the search box instead of on one corner."""

    def forward(self, x):
        return 2 * x - 1


def ours_net(hidden=(16, 16), activation="relu"):
    """Network factory for the BO loop: centring + a small MLP (few parameters, so the full
    GGN is cheap and its rank is bounded by the data, not inflated as with K-FAC)."""
    from bayescurv.bo import default_network

    return lambda d, m: nn.Sequential(Center(), *default_network(d, m, hidden, activation))


def lbo_net(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                         nn.Linear(50, 1)).to(DT)


# surrogates -------------------------------------------------------------------------------
class Ours:
    """Refit from scratch every ``refit_every`` evaluations, otherwise
    ``condition_on_observations`` (warm-started refinement + curvature refit)."""

    def __init__(self, bounds, refit_every: int = 10, **kw):
        self.bounds, self.refit_every, self.kw, self.model, self.count = bounds, refit_every, kw, \
            None, 0

    def update(self, X, Y, x_new=None, y_new=None, seed=0):
        if self.model is None or x_new is None or self.count % self.refit_every == 0:
            tf = Normalize(X.shape[-1], bounds=self.bounds)
            self.model = LaplaceModel(X, Y, input_transform=tf,
                                      outcome_transform=Standardize(1), seed=seed, **self.kw)
        else:
            self.model = self.model.condition_on_observations(x_new, y_new)
        self.count += 1
        return self.model


class GP:
    def __init__(self, bounds):
        self.bounds = bounds

    def update(self, X, Y, x_new=None, y_new=None, seed=0):
        model = SingleTaskGP(X, Y, input_transform=Normalize(X.shape[-1], bounds=self.bounds),
                             outcome_transform=Standardize(1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        return model


class LBO:
    def __init__(self, bounds, n_epochs: int = 1000):
        self.bounds, self.n_epochs = bounds, n_epochs

    def update(self, X, Y, x_new=None, y_new=None, seed=0):
        d = X.shape[-1]
        torch.manual_seed(seed)
        return LaplaceBoTorch(lambda: lbo_net(d), X, Y,
                              input_transform=Normalize(d, bounds=self.bounds),
                              outcome_transform=Standardize(1), n_epochs=self.n_epochs)


# BO loop --------------------------------------------------------------------------------
def bo_run(f, method: str, seed: int, n_init: int, n_evals: int, acq_opts: dict, cfg) -> dict:
    torch.manual_seed(seed)
    bounds = f.bounds
    d = bounds.shape[1]
    g = torch.Generator().manual_seed(seed)
    X = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n_init, d, generator=g, dtype=DT)
    Y = f(X).unsqueeze(-1)
    surrogate = {"ours": lambda: Ours(bounds, **cfg["ours"]), "gp": lambda: GP(bounds),
                 "laplace-bayesopt": lambda: LBO(bounds, **cfg["lbo"]),
                 "random": lambda: None}[method]()
    times = []
    x_new = y_new = None
    for it in range(n_evals):
        t0 = time.perf_counter()
        if surrogate is None:
            x_new = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(1, d, generator=g, dtype=DT)
        else:
            model = surrogate.update(X, Y, x_new, y_new, seed=seed * 1000 + it)
            acq = LogExpectedImprovement(model, best_f=Y.max())
            x_new, _ = optimize_acqf(acq, bounds=bounds, q=1, **acq_opts)
            x_new = x_new.detach()
        times.append(time.perf_counter() - t0)
        y_new = f(x_new).unsqueeze(-1)
        X, Y = torch.cat([X, x_new]), torch.cat([Y, y_new])
    best = torch.cummax(Y.squeeze(-1), 0).values[n_init - 1:]  # best after init, then each eval
    regret = (f.optimal_value - best).clamp_min(0)
    return {"regret": regret.tolist(), "time_per_iter": sum(times) / len(times)}


def regret_section(args, cfg) -> dict:
    methods = [m for m in ["ours", "laplace-bayesopt", "gp", "random"] if m in args.methods]
    if LaplaceBoTorch is None and "laplace-bayesopt" in methods:
        methods.remove("laplace-bayesopt")
        print("laplace-bayesopt not importable: skipped")
    acq_opts = dict(num_restarts=args.restarts, raw_samples=args.raw, options={"maxiter": 50})
    results = {}
    for name, f in problems().items():
        for method in methods:
            runs = []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.append(bo_run(f, method, seed, args.n_init, args.evals, acq_opts, cfg))
            results[(name, method)] = runs
            reg = torch.tensor([r["regret"] for r in runs])
            print(f"  {name:9s} {method:17s} final median regret {reg[:, -1].median():.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    report(results, args.seeds, args.evals)
    return {f"{k[0]}/{k[1]}": v for k, v in results.items()}


def report(results: dict, seeds: int, evals: int) -> None:
    """Regret table (markdown) and median/IQR curves (PNG) into ``OUT``."""
    lines = [f"| function | method | median regret @10 | @25 | @{evals} (final) | "
             "IQR final | s / iteration |", "|---|---|---|---|---|---|---|"]
    for (name, method), runs in results.items():
        reg = torch.tensor([r["regret"] for r in runs])
        med = reg.median(0).values
        q25, q75 = reg[:, -1].quantile(0.25).item(), reg[:, -1].quantile(0.75).item()
        tpi = sum(r["time_per_iter"] for r in runs) / len(runs)
        i10, i25 = min(10, evals), min(25, evals)
        lines.append(f"| {name} | {method} | {med[i10]:.4f} | {med[i25]:.4f} | {med[-1]:.4f} | "
                     f"[{q25:.4f}, {q75:.4f}] | {tpi:.3f} |")
    table = "\n".join(lines)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, name in zip(axes, problems()):
            for (fname, method), runs in results.items():
                if fname != name:
                    continue
                reg = torch.tensor([r["regret"] for r in runs])
                med = reg.median(0).values
                ax.semilogy(range(len(med)), med.clamp_min(1e-6), label=method)
                ax.fill_between(range(len(med)), reg.quantile(0.25, 0).clamp_min(1e-6),
                                reg.quantile(0.75, 0).clamp_min(1e-6), alpha=0.15)
            ax.set(title=f"{name} ({seeds} seeds)", xlabel="evaluations after init",
                   ylabel="simple regret (median, IQR)")
            ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "regret.png", dpi=120)
        print(f"wrote {OUT / 'regret.png'}")
    except ImportError:
        print("matplotlib not installed: no PNG")
    (OUT / "regret.md").write_text(table + "\n")


def merge(paths: list[str]) -> None:
    """One regret table and PNG from the ``results-regret.json`` of several runs (e.g. the
    methods run as parallel processes with the same seeds and evaluations)."""
    results, seeds, evals = {}, None, None
    for path in paths:
        res = json.loads((Path(path) / "results-regret.json").read_text())
        seeds, evals = res["args"]["seeds"], res["args"]["evals"]
        for key, runs in res["regret"].items():
            results[tuple(key.split("/"))] = runs
    order = ["ours", "laplace-bayesopt", "gp", "random"]
    results = dict(sorted(results.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))))
    report(results, seeds, evals)


# scaling --------------------------------------------------------------------------------
def scaling_section(args, cfg) -> dict:
    f = Hartmann(dim=6, negate=True).to(DT)
    g = torch.Generator().manual_seed(0)
    Xtest = torch.rand(args.n_test, 1, 6, generator=g, dtype=DT)
    rows, out = [], {}
    for n in args.sizes:
        X = torch.rand(n, 6, generator=g, dtype=DT)
        Y = f(X).unsqueeze(-1) + 0.01 * torch.randn(n, 1, generator=g, dtype=DT)
        t0 = time.perf_counter()
        model = LaplaceModel(X, Y, outcome_transform=Standardize(1), seed=0, **cfg["ours_scale"])
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            _ = model.posterior(Xtest).mean
        t_post = time.perf_counter() - t0
        rmse = (model.posterior(Xtest).mean.squeeze() - f(Xtest.squeeze(1))).square().mean().sqrt()
        res = {"ours_fit": t_fit, "ours_post": t_post, "ours_rmse": rmse.item()}
        if n <= args.gp_max_n:
            t0 = time.perf_counter()
            gp = SingleTaskGP(X, Y, outcome_transform=Standardize(1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp),
                                 optimizer_kwargs={"options": {"maxiter": args.gp_maxiter},
                                                   "timeout_sec": args.gp_timeout})
            t_gfit = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                _ = gp.posterior(Xtest).mean
            t_gpost = time.perf_counter() - t0
            grmse = (gp.posterior(Xtest).mean.detach().squeeze() - f(Xtest.squeeze(1))
                     ).square().mean().sqrt()
            res.update(gp_fit=t_gfit, gp_post=t_gpost, gp_rmse=grmse.item())
        out[n] = res
        ours = res["ours_fit"] + res["ours_post"]
        gpt = res.get("gp_fit", math.nan) + res.get("gp_post", math.nan)
        rows.append(f"| {n} | {res['ours_fit']:.2f} | {res['ours_post']:.3f} | {ours:.2f} | "
                    f"{res.get('gp_fit', math.nan):.2f} | {res.get('gp_post', math.nan):.3f} | "
                    f"{gpt:.2f} | {gpt / ours:.1f}x | {res['ours_rmse']:.3f} / "
                    f"{res.get('gp_rmse', math.nan):.3f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"| n | ours fit s | ours posterior s ({args.n_test} pts) | ours total | GP fit s | "
        "GP posterior s | GP total | GP / ours | test RMSE ours / GP |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    (OUT / "scaling.md").write_text(table + "\n")
    return out


def condition_section(args, cfg) -> dict:
    f = Hartmann(dim=6, negate=True).to(DT)
    g = torch.Generator().manual_seed(1)
    n = args.cond_n
    X = torch.rand(n, 6, generator=g, dtype=DT)
    Y = f(X).unsqueeze(-1)
    Xn = torch.rand(1, 6, generator=g, dtype=DT)
    Yn = f(Xn).unsqueeze(-1)
    model = LaplaceModel(X, Y, outcome_transform=Standardize(1), seed=0, **cfg["ours_scale"])
    t0 = time.perf_counter()
    model.condition_on_observations(Xn, Yn)
    t_ours = time.perf_counter() - t0
    out = {"ours": t_ours}
    line = f"condition_on_observations at n={n}: ours {t_ours:.2f} s"
    if LaplaceBoTorch is not None:
        torch.manual_seed(0)
        lbo = LaplaceBoTorch(lambda: lbo_net(6), X, Y, outcome_transform=Standardize(1),
                             n_epochs=args.cond_lbo_epochs)
        t0 = time.perf_counter()
        lbo.condition_on_observations(Xn, Yn)
        t_lbo = time.perf_counter() - t0
        out["laplace-bayesopt"] = t_lbo
        line += (f", laplace-bayesopt (retrain, n_epochs={args.cond_lbo_epochs}) {t_lbo:.2f} s, "
                 f"ratio {t_lbo / t_ours:.1f}x")
    print(line)
    (OUT / "condition.md").write_text(line + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--evals", type=int, default=50)
    p.add_argument("--n-init", type=int, default=5)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--raw", type=int, default=32)
    p.add_argument("--lbo-epochs", type=int, default=20)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--gp-max-n", type=int, default=8000)
    p.add_argument("--gp-maxiter", type=int, default=15)
    p.add_argument("--gp-timeout", type=float, default=120.0,
                   help="cap on SingleTaskGP hyperparameter fitting (s): GP times are lower bounds")
    p.add_argument("--cond-n", type=int, default=2000)
    p.add_argument("--cond-lbo-epochs", type=int, default=20)
    p.add_argument("--out", default="outputs/bo", help="output folder")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="only merge the regret results of earlier runs (their --out folders)")
    p.add_argument("--mlp", action="store_true",
                   help="our surrogate on a centred 16-16 ReLU MLP instead of the defaults")
    p.add_argument("--methods", nargs="+", default=["ours", "laplace-bayesopt", "gp", "random"])
    p.add_argument("--skip", nargs="*", default=[], choices=["regret", "scaling", "condition"])
    args = p.parse_args()
    if args.quick:
        args.seeds, args.evals, args.restarts, args.raw = 1, 3, 2, 16
        args.sizes, args.n_test, args.cond_n, args.lbo_epochs = [200, 400], 100, 300, 5
        args.cond_lbo_epochs = 5
    cfg = {
        # library defaults: a Fourier-feature network whose ARD lengthscales, prior precision
        # and noise maximize the exact evidence (MAP-II with SingleTaskGP's hyperpriors)
        "ours": dict(),
        "lbo": dict(n_epochs=args.lbo_epochs),
        "ours_scale": dict(),
    }
    if args.mlp:  # the previous benchmark configuration, for comparison
        cfg["ours"] = dict(network=ours_net((16, 16), "relu"), structure="full", steps=500,
                           refine_steps=100, marglik_steps=30)
    global OUT
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.merge)
        return
    print(f"threads={torch.get_num_threads()} config={vars(args)}")
    res = {"args": vars(args)}
    t0 = time.perf_counter()
    if "regret" not in args.skip:
        res["regret"] = regret_section(args, cfg)
    if "scaling" not in args.skip:
        res["scaling"] = scaling_section(args, cfg)
    if "condition" not in args.skip:
        res["condition"] = condition_section(args, cfg)
    tag = "-".join(sorted(set(["regret", "scaling", "condition"]) - set(args.skip)))
    (OUT / f"results-{tag}.json").write_text(json.dumps(res, default=str))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
