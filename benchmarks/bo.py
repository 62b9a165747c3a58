"""BoTorch benchmark of the linearized-Laplace surrogates (issue 12).

Sections (each behind ``--sections``; all numbers come from one run and are printed as
tables; outputs go to ``--out``):

- ``regret``: BO loops maximizing the negated BoTorch test functions on their boxes —
  Branin (2-d), Hartmann6, Ackley-10, Levy-10 and ``Embedded40`` (Hartmann6 on 6 of 40 inputs,
  34 inert: low-dimensional structure that ARD must find). Methods: ``mlp`` (our MLP
  surrogate, ``LaplaceModel(hidden=(50, 50))`` with its defaults: the MLP on a Fourier-feature
  embedding), ``fourier`` (our default,
  Fourier features: a sparse-spectrum GP), ``gp`` (``SingleTaskGP``), ``lbo``
  (laplace-bayesopt's ``LaplaceBoTorch`` with its defaults, 1,000 epochs) and ``random``.
  LogEI with ``optimize_acqf``; simple regret per evaluation; median and IQR at the
  checkpoints; seconds per iteration; a regret-curve PNG.
- ``scaling``: fit time of the MLP surrogate against n (Hartmann6 data) and one BO iteration
  (fit + ``optimize_acqf`` of LogEI).
- ``condition``: ``condition_on_observations`` of the MLP surrogate against refitting it.
- ``ablation``: what each ingredient of the MLP surrogate buys (short BO runs; docs/bo.md
  reports ``--sections ablation --seeds 4 --evals 40 --jobs 2``).

The issue's protocol is the default (10 seeds x 5 functions x 100 evaluations x 5 methods,
laplace-bayesopt at 1,000 epochs): hours of CPU. docs/bo.md reports

    python benchmarks/bo.py --sections condition scaling regret --seeds 10 --lbo-seeds 3 \
        --evals 100 --jobs 2 --deadline-min 75

(two worker processes of one thread each on a 2-core machine; laplace-bayesopt, whose
1,000-epoch retraining per evaluation dominates the run, with at most 3 seeds, the runs that
could not start within 75 minutes skipped and listed).
"""

from __future__ import annotations

import argparse
import json
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
from botorch.test_functions import Ackley, Branin, Hartmann, Levy
from botorch.test_functions.synthetic import SyntheticTestFunction
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import nn

from bayescurv.bo import LaplaceModel

DT = torch.float64

# benchmarks/laplace.py would shadow laplace-torch's ``laplace`` package (imported by
# laplace-bayesopt): drop this script's folder from the import path first
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
try:  # laplace-bayesopt is optional (installed with --no-deps)
    from laplace_bayesopt.botorch import LaplaceBoTorch
except Exception as exc:  # pragma: no cover - depends on the environment
    print(f"laplace-bayesopt not importable ({exc!r})")
    LaplaceBoTorch = None


class Embedded(SyntheticTestFunction):
    """``base`` on the first ``base.dim`` of ``dim`` inputs; the others are inert."""

    def __init__(self, base: SyntheticTestFunction, dim: int) -> None:
        self.dim = dim
        self.continuous_inds = list(range(dim))
        self._optimal_value = base._optimal_value
        super().__init__(negate=base.negate, bounds=[(0.0, 1.0)] * dim)
        self.base = base

    def _evaluate_true(self, X: torch.Tensor) -> torch.Tensor:
        return self.base._evaluate_true(X[..., : self.base.dim])


def problems() -> dict[str, SyntheticTestFunction]:
    return {
        "Branin": Branin(negate=True).to(DT),
        "Hartmann6": Hartmann(dim=6, negate=True).to(DT),
        "Ackley10": Ackley(dim=10, negate=True).to(DT),
        "Levy10": Levy(dim=10, negate=True).to(DT),
        "Embedded40": Embedded(Hartmann(dim=6, negate=True), 40).to(DT),
    }


def lbo_net(d: int) -> nn.Module:
    """laplace-bayesopt's usual MLP (50-50 ReLU)."""
    return nn.Sequential(nn.Linear(d, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                         nn.Linear(50, 1)).to(DT)


# surrogates -------------------------------------------------------------------------------
class Ours:
    """Our surrogate: fit from scratch every ``refit_every`` evaluations, otherwise
    ``condition_on_observations`` (warm-started)."""

    def __init__(self, bounds, refit_every: int = 5, **kw):
        self.bounds, self.refit_every, self.kw = bounds, refit_every, kw
        self.model, self.count = None, 0

    def update(self, X, Y, x_new=None, y_new=None, seed=0):
        if self.model is None or x_new is None or self.count % self.refit_every == 0:
            self.model = LaplaceModel(X, Y, input_transform=Normalize(X.shape[-1],
                                                                      bounds=self.bounds),
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


def make_surrogate(method: str, bounds, args, extra: dict | None = None):
    if method == "mlp":
        return Ours(bounds, args.refit_every, hidden=(50, 50), **(extra or {}))
    if method == "fourier":
        return Ours(bounds, args.refit_every, **(extra or {}))
    if method == "gp":
        return GP(bounds)
    if method == "lbo":
        return LBO(bounds, args.lbo_epochs)
    if method == "random":
        return None
    raise ValueError(f"unknown method {method!r}")


# BO loop --------------------------------------------------------------------------------
def bo_run(f, method: str, seed: int, args, extra: dict | None = None) -> dict:
    torch.manual_seed(seed)
    bounds = f.bounds
    d = bounds.shape[1]
    g = torch.Generator().manual_seed(seed)
    X = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(args.n_init, d, generator=g, dtype=DT)
    Y = f(X).unsqueeze(-1)
    surrogate = make_surrogate(method, bounds, args, extra)
    acq_opts = dict(num_restarts=args.restarts, raw_samples=args.raw, options={"maxiter": 50})
    times = []
    x_new = y_new = None
    for it in range(args.evals):
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
    best = torch.cummax(Y.squeeze(-1), 0).values[args.n_init - 1:]  # after init, then each eval
    regret = (f.optimal_value - best).clamp_min(0)
    return {"regret": regret.tolist(), "time_per_iter": sum(times) / len(times)}


def checkpoints(evals: int) -> list[int]:
    marks = [c for c in (10, 25, 50, 100) if c < evals]
    return marks + [evals]


def table(results: dict, evals: int) -> str:
    marks = checkpoints(evals)
    head = " | ".join(f"@{c} median [IQR]" for c in marks)
    lines = [f"| function | method | {head} | s / iteration |",
             "|---|---|" + "---|" * len(marks) + "---|"]
    for (name, method), runs in results.items():
        reg = torch.tensor([r["regret"] for r in runs])
        cells = []
        for c in marks:
            col = reg[:, c]
            q25, q50, q75 = (col.quantile(q).item() for q in (0.25, 0.5, 0.75))
            cells.append(f"{q50:.3g} [{q25:.3g}, {q75:.3g}]")
        tpi = sum(r["time_per_iter"] for r in runs) / len(runs)
        label = f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})"
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {tpi:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    names = list(dict.fromkeys(k[0] for k in results))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.9), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (fname, method), runs in results.items():
            if fname != name:
                continue
            reg = torch.tensor([r["regret"] for r in runs]).clamp_min(1e-6)
            med = reg.quantile(0.5, 0)
            (line,) = ax.semilogy(range(len(med)), med, label=method)
            ax.fill_between(range(len(med)), reg.quantile(0.25, 0), reg.quantile(0.75, 0),
                            alpha=0.15, color=line.get_color())
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("evaluations after init", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("simple regret (median, IQR)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")


def _regret_task(task: tuple) -> dict | None:
    """One BO run (a process-pool task: torch threads set in the worker); ``None`` when it
    would start after ``args.deadline`` (a wall-clock time), so the run ends on time."""
    name, method, seed, args = task
    if args.deadline is not None and time.time() > args.deadline:
        return None
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bo_run(problems()[name], method, seed, args)
        except Exception as exc:  # reported with the table, the other runs go on
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def regret_section(args) -> dict:
    methods = list(args.methods)
    if LaplaceBoTorch is None and "lbo" in methods:
        methods.remove("lbo")
        print("laplace-bayesopt not importable: skipped")
    names = [k for k in problems() if k in args.functions]
    seeds = {m: min(args.seeds, args.lbo_seeds) if m == "lbo" else args.seeds for m in methods}
    # laplace-bayesopt last, seed by seed, so a deadline drops its last seeds, nothing else
    tasks = [(name, method, seed, args) for name in names for method in methods
             for seed in range(seeds[method]) if method != "lbo"]
    tasks += [(name, "lbo", seed, args) for seed in range(seeds.get("lbo", 0))
              for name in names]
    skipped: list[str] = []
    failed: list[str] = []
    results: dict = {}
    done: dict = {}
    t0 = time.perf_counter()

    def record(task: tuple, run: dict | None) -> None:
        key = task[:2]
        if run is None:
            skipped.append(f"{key[0]}/{key[1]}/seed {task[2]}")
        elif "error" in run:
            failed.append(f"{key[0]}/{key[1]}/seed {task[2]} ({run['error']})")
            print(f"  FAILED {failed[-1]}", flush=True)
            run = None
        done.setdefault(key, {})[task[2]] = run
        if len(done[key]) == seeds[key[1]]:  # all seeds of (function, method): report them
            results[key] = [done[key][s] for s in range(seeds[key[1]]) if done[key][s]]
            if not results[key]:
                del results[key]
                return
            (args.out / "partial-regret.json").write_text(json.dumps(  # survives a stop
                {f"{k[0]}/{k[1]}": v for k, v in results.items()}))
            reg = torch.tensor([r["regret"] for r in results[key]])
            print(f"  {key[0]:10s} {key[1]:8s} final median regret {reg[:, -1].quantile(0.5):.4f} "
                  f"({time.perf_counter() - t0:.0f} s into the section)", flush=True)

    for task, run in zip(tasks, pool_map(_regret_task, tasks, args.jobs)):
        record(task, run)
    results = {key: results[key] for key in ((n, m) for n in names for m in methods)
               if key in results}
    out = table(results, args.evals)
    if skipped:
        out += f"\n\nnot started before the deadline: {', '.join(skipped)}"
    if failed:
        out += f"\n\nfailed (not in the table): {'; '.join(failed)}"
    print(out)
    (args.out / "regret.md").write_text(out + "\n")
    plot(results, args.png or args.out / "regret.png",
         f"{args.seeds} seeds, {args.n_init} initial points, {args.evals} evaluations")
    return {f"{k[0]}/{k[1]}": v for k, v in results.items()}


# scaling and conditioning ----------------------------------------------------------------
def _hartmann_data(n: int, seed: int = 0):
    f = Hartmann(dim=6, negate=True).to(DT)
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 6, generator=g, dtype=DT)
    return f, X, f(X).unsqueeze(-1) + 0.01 * torch.randn(n, 1, generator=g, dtype=DT)


class UserNet(nn.Module):
    """A user's own network (residual tanh MLP) for the scaling section."""

    def __init__(self, d: int, m: int, width: int = 64) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d, width), nn.Linear(width, width), \
            nn.Linear(width, m)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.mid(h)))


def scaling_section(args) -> dict:
    rows, out = [], {}
    bounds = torch.tensor([[0.0] * 6, [1.0] * 6], dtype=DT)
    for n in args.sizes:
        f, X, Y = _hartmann_data(n)
        res = {}
        for label, kw in (("mlp", dict(hidden=(50, 50))),
                          ("plain", dict(hidden=(50, 50), embedding=None)),
                          ("user", dict(network=UserNet))):
            t0 = time.perf_counter()
            model = LaplaceModel(X, Y, input_transform=Normalize(6, bounds=bounds), seed=0, **kw)
            res[f"{label}_fit"] = time.perf_counter() - t0
            res[f"{label}_space"] = model.gp.space
            if label == "mlp" and n <= args.bo_iter_max_n:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optimize_acqf(LogExpectedImprovement(model, best_f=Y.max()), bounds=bounds,
                                  q=1, num_restarts=args.restarts, raw_samples=args.raw,
                                  options={"maxiter": 50})
                res["acqf"] = time.perf_counter() - t0
        out[n] = res
        it = res["mlp_fit"] + res["acqf"] if "acqf" in res else float("nan")
        rows.append(f"| {n} | {res['mlp_fit']:.2f} ({res['mlp_space']}) | "
                    f"{res['plain_fit']:.2f} ({res['plain_space']}) | "
                    f"{res['user_fit']:.2f} ({res['user_space']}) | {it:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join(["| n | MLP 50-50 fit s (space) | MLP 50-50 embedding=None fit s (space) | "
                      "user's residual net fit s (space) | "
                      "BO iteration s (MLP fit + optimize_acqf) |", "|---|---|---|---|---|", *rows])
    print(text)
    (args.out / "scaling.md").write_text(text + "\n")
    return out


def condition_section(args) -> dict:
    f, X, Y = _hartmann_data(args.cond_n + 1, seed=1)
    model = LaplaceModel(X[:-1], Y[:-1], hidden=(50, 50), seed=0)
    t0 = time.perf_counter()
    model.condition_on_observations(X[-1:], Y[-1:])
    t_cond = time.perf_counter() - t0
    t0 = time.perf_counter()
    LaplaceModel(X, Y, hidden=(50, 50), seed=0)
    t_fit = time.perf_counter() - t0
    line = (f"MLP surrogate at n={args.cond_n}: condition_on_observations {t_cond:.2f} s, "
            f"refit from scratch {t_fit:.2f} s, speed-up {t_fit / t_cond:.1f}x")
    print(line)
    (args.out / "condition.md").write_text(line + "\n")
    return {"condition": t_cond, "refit": t_fit}


ABLATION = {
    "defaults (Fourier embedding, 512 features, one prior)": {},
    "no embedding (MLP on the inputs, ARD prior)":
        dict(embedding=None),
    "embedding with 256 features": dict(embedding_features=256),
    "one prior per tensor (not one for all)": dict(prior_granularity="layer"),
    "one round (MAP at the initial prior only)": dict(rounds=1),
    "no MAP training (NTK GP at init)": dict(steps=0),
    "prior mean 0 (not the init)": dict(prior_mean="zero"),
    "no noise floor (min_noise 1e-6)": dict(min_noise=1e-6),
    "tanh instead of SiLU": dict(activation="tanh"),
    "ReLU instead of SiLU": dict(activation="relu"),
}


def _ablation_task(task: tuple) -> dict:
    label, name, seed, args = task
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bo_run(problems()[name], "mlp", seed, args, extra=ABLATION[label])
        except Exception as exc:  # reported in the table
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def pool_map(fn, tasks: list, jobs: int):
    """``map(fn, tasks)`` in ``jobs`` spawned worker processes (in order), or here."""
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
    try:
        yield from pool.map(fn, tasks)
    finally:
        pool.shutdown()


def ablation_section(args) -> dict:
    names = [k for k in problems() if k in args.ablation_functions]
    tasks = [(label, name, s, args) for label in ABLATION for name in names
             for s in range(args.seeds)]
    runs: dict = {}
    for (label, name, _seed, _), run in zip(tasks, pool_map(_ablation_task, tasks, args.jobs)):
        runs.setdefault((label, name), []).append(run)
    res, lines = {}, []
    for label in ABLATION:
        cells = []
        for name in names:
            ok = [r for r in runs[label, name] if "error" not in r]
            res[f"{label}/{name}"] = runs[label, name]
            if not ok:
                cells.append("failed")
                continue
            reg = torch.tensor([r["regret"] for r in ok])[:, -1]
            tpi = sum(r["time_per_iter"] for r in ok) / len(ok)
            failed = len(runs[label, name]) - len(ok)
            cells.append(f"{reg.quantile(0.5):.3g} [{reg.quantile(0.25):.3g}, "
                         f"{reg.quantile(0.75):.3g}] ({tpi:.2f} s/it"
                         + (f", {failed} failed" if failed else "") + ")")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(["| MLP surrogate (hidden=(50, 50)) | " + " | ".join(
        f"{n} regret @{args.evals} median [IQR]" for n in names) + " |",
        "|---|" + "---|" * len(names), *lines])
    print(text)
    (args.out / "ablation.md").write_text(text + "\n")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=["regret", "scaling", "condition"],
                   choices=["regret", "scaling", "condition", "ablation"])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--evals", type=int, default=100)
    p.add_argument("--n-init", type=int, default=5)
    p.add_argument("--functions", nargs="+", default=list(problems()))
    p.add_argument("--methods", nargs="+", default=["mlp", "fourier", "gp", "lbo", "random"])
    p.add_argument("--lbo-epochs", type=int, default=1000, help="laplace-bayesopt's default")
    p.add_argument("--lbo-seeds", type=int, default=10,
                   help="seeds for laplace-bayesopt (its 1,000-epoch refits dominate the run)")
    p.add_argument("--refit-every", type=int, default=5,
                   help="our surrogates: refit from scratch every k evaluations, "
                        "condition_on_observations in between")
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--raw", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 1000, 10000])
    p.add_argument("--bo-iter-max-n", type=int, default=1000)
    p.add_argument("--cond-n", type=int, default=100)
    p.add_argument("--ablation-functions", nargs="+",
                   default=["Hartmann6", "Ackley10", "Levy10"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: small models are faster on one thread)")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="regret section: BO runs not started within this many minutes of the "
                        "start are skipped (laplace-bayesopt's last seeds first) and listed")
    p.add_argument("--jobs", type=int, default=1,
                   help="regret and ablation sections: BO runs in this many worker processes "
                        "(timings per iteration are then taken with that many runs sharing the "
                        "machine)")
    p.add_argument("--out", type=Path, default=Path("outputs/bo"))
    p.add_argument("--png", type=Path, default=None, help="regret PNG path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.deadline = None if args.deadline_min is None else time.time() + 60 * args.deadline_min
    print(f"threads={torch.get_num_threads()} config={vars(args)}", flush=True)
    res: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    for section in args.sections:
        res[section] = globals()[f"{section}_section"](args)
    res["total_s"] = time.perf_counter() - t0
    tag = "-".join(args.sections)
    (args.out / f"results-{tag}.json").write_text(json.dumps(res, default=str))
    print(f"total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
