"""Continual learning on permuted scikit-learn digits: fine-tuning, online EWC (diagonal
online Laplace), K-FAC online Laplace, the diagonal-plus-low-rank Laplace filter (with and
without process noise) and the filter plus RTS smoothing; then time, memory and accuracy
against the rank k.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/continual.py [--seeds 1] [--quick]

Tasks: task 0 is the digits as they are, task t > 0 the same images under a fixed random
pixel permutation (seed t); 10 classes each, a 64-100-10 ReLU MLP (P = 7,510), Adam. All
methods use the same Bayesian scale: ``loss = mean NLL + penalty / N`` with the prior
precision ``δ`` and no tuned regularisation strength.

Metrics (R[i, j] = test accuracy on task j after training on task i, T tasks):
  avg acc    = mean_j R[T-1, j]                (the final model on every task)
  forgetting = mean_{j<T-1} max_{i<T-1} R[i, j] − R[T-1, j]
For "filter + smoothing" task j is evaluated with its own smoothed weights m^s_j (task
identity is used at test time), and forgetting uses the same max over the filter's history.
Figures go to outputs/ (git-ignored). Not a test: numbers are measured in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv.continual import DiagonalFilter, KFACFilter, LaplaceFilter, Transition
from bayescurv.data.digits import load_digits_split, permuted_digits

OUT = Path(__file__).resolve().parents[1] / "outputs"
EIG_OPTS = {"oversample": 10, "power_iters": 2}  # randomized top-k: 4 passes over the data


def make_tasks(num_tasks: int, seed: int = 0):
    split = load_digits_split(seed=seed)
    tasks = []
    for t in range(num_tasks):
        if t == 0:
            xtr, xte = split.x_train, split.x_test
        else:
            xtr = permuted_digits(split.x_train, seed=100 + t)
            xte = permuted_digits(split.x_test, seed=100 + t)
        tasks.append((xtr, split.y_train, xte, split.y_test))
    return tasks


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def train(model, xtr, ytr, reg, epochs: int, seed: int, lr: float = 1e-3) -> None:
    n = xtr.shape[0]
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + reg.penalty(model) / n
            opt.zero_grad()
            loss.backward()
            opt.step()


def run(method: str, tasks, *, seed: int, epochs: int, rank: int = 50, delta: float = 1.0,
        noise: float = 1e-3) -> dict:
    """Train over the tasks with one method; returns the accuracy matrix and costs."""
    model = mlp(seed)
    T = len(tasks)
    gen = torch.Generator().manual_seed(seed)
    if method == "finetune":
        filt = None
    elif method == "ewc":
        filt = DiagonalFilter(model, "classification", prior_precision=delta)
    elif method == "kfac":
        filt = KFACFilter(model, "classification", prior_precision=delta)
    elif method == "lowrank":
        filt = LaplaceFilter(model, "classification", rank=rank, prior_precision=delta,
                             generator=gen, eigensolver_options=EIG_OPTS)
    elif method == "lowrank+Q":
        filt = LaplaceFilter(model, "classification", rank=rank, prior_precision=delta,
                             transition=Transition(noise=noise), generator=gen,
                             eigensolver_options=EIG_OPTS)
    else:
        raise ValueError(method)
    R = torch.zeros(T, T)
    t_train = t_update = 0.0
    for i, (xtr, ytr, _, _) in enumerate(tasks):
        if filt is not None:
            filt.predict()
        t0 = time.perf_counter()
        train(model, xtr, ytr, filt, epochs, seed=seed * 100 + i)
        t_train += time.perf_counter() - t0
        if filt is not None:
            t0 = time.perf_counter()
            filt.update(DataLoader(TensorDataset(xtr, ytr), batch_size=512))
            t_update += time.perf_counter() - t0
        for j, (_, _, xte, yte) in enumerate(tasks):
            R[i, j] = accuracy(model, xte, yte)
    out = {"R": R, "train_s": t_train, "update_s": t_update,
           "memory": filt.memory_bytes() if filt is not None else 0}
    if method == "lowrank+Q":
        t0 = time.perf_counter()
        sm = filt.smooth()
        out["smooth_s"] = time.perf_counter() - t0
        out["smoothed"] = torch.tensor([
            _acc_with(model, filt, sm.means[j], xte, yte)
            for j, (_, _, xte, yte) in enumerate(tasks)
        ])
        out["filtered_own"] = torch.tensor([
            _acc_with(model, filt, filt.steps[j].mean, xte, yte)
            for j, (_, _, xte, yte) in enumerate(tasks)
        ])
    return out


def _acc_with(model, filt, weights, x, y) -> float:
    keep = filt.params.vector().clone()
    filt.assign(model, weights)
    acc = accuracy(model, x, y)
    filt.assign(model, keep)
    return acc


def summarize(R: torch.Tensor, final: torch.Tensor | None = None) -> tuple[float, float]:
    final = R[-1] if final is None else final
    best = R[:-1, :-1].max(0).values
    return float(final.mean()), float((best - final[:-1]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--noise", type=float, default=1e-2)
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--ranks", type=str, default="10,50,100,200")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, ranks 10,50")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.ranks = 1, 3, "10,50"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    tasks = make_tasks(args.tasks)
    methods = ["finetune", "ewc", "kfac", "lowrank", "lowrank+Q"]
    res: dict[str, list] = {m: [] for m in [*methods, "lowrank+Q+smooth"]}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        for m in methods:
            r = run(m, tasks, seed=seed, epochs=args.epochs, rank=args.rank, delta=args.delta,
                    noise=args.noise)
            runs[m].append(r)
            res[m].append(summarize(r["R"]))
            if m == "lowrank+Q":
                res["lowrank+Q+smooth"].append(summarize(r["R"], r["smoothed"]))
    print(f"permuted digits, {args.tasks} tasks, MLP 64-100-10 (P=7510), {args.epochs} epochs/"
          f"task, {args.seeds} seed(s), rank k={args.rank}, q={args.noise}, δ={args.delta}")
    print(f"{'method':<22}{'avg acc':>10}{'forgetting':>12}{'task-0 acc':>12}{'update s':>10}"
          f"{'state MB':>10}")
    for m, vals in res.items():
        acc = torch.tensor([v[0] for v in vals])
        fg = torch.tensor([v[1] for v in vals])
        base = m if m in runs else "lowrank+Q"
        if m == "lowrank+Q+smooth":
            t0 = torch.tensor([float(r["smoothed"][0]) for r in runs[base]]).mean()
        else:
            t0 = torch.tensor([float(r["R"][-1, 0]) for r in runs[base]]).mean()
        upd = sum(r["update_s"] + r.get("smooth_s", 0.0) * (m != base) for r in runs[base])
        mem = runs[base][0]["memory"] / 2**20
        print(f"{m:<22}{acc.mean():>10.4f}{fg.mean():>12.4f}{t0:>12.4f}"
              f"{upd / len(runs[base]):>10.2f}{mem:>10.2f}")
    r0 = runs["lowrank+Q"][0]
    print("\nfilter (lowrank+Q), seed 0, per task j: acc right after training (own filtered "
          "weights), smoothed weights, final weights")
    for j in range(args.tasks):
        print(f"  task {j}: filtered {float(r0['filtered_own'][j]):.4f}  smoothed "
              f"{float(r0['smoothed'][j]):.4f}  final {float(r0['R'][-1, j]):.4f}")

    own = torch.stack([r["filtered_own"] for r in runs["lowrank+Q"]]).mean()
    print(f"  (reference: every task with its own filtered weights, i.e. storing T models: "
          f"avg acc {float(own):.4f})")

    # rank sweep (seed 0; k = 0 and k = --rank reuse the runs above) ---------------------
    ranks = [int(k) for k in args.ranks.split(",")]
    sweep = []
    for k in [0, *ranks]:
        if k == 0:
            r = runs["ewc"][0]
        elif k == args.rank:
            r = runs["lowrank"][0]
        else:
            r = run("lowrank", tasks, seed=0, epochs=args.epochs, rank=k, delta=args.delta)
        acc, fg = summarize(r["R"])
        sweep.append((k, acc, fg, r["train_s"] + r["update_s"], r["update_s"], r["memory"]))
    print("\nrank sweep (A = I, Q = 0, seed 0; k = 0 is the diagonal filter = online EWC)")
    print(f"{'k':>5}{'avg acc':>10}{'forgetting':>12}{'train+upd s':>13}{'update s':>10}"
          f"{'state MB':>10}")
    for k, acc, fg, total, upd, mem in sweep:
        print(f"{k:>5}{acc:>10.4f}{fg:>12.4f}{total:>13.2f}{upd:>10.2f}{mem / 2**20:>10.2f}")
    plot(res, runs, sweep, args)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


def plot(res, runs, sweep, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no figures")
        return
    OUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    names = list(res)
    acc = [torch.tensor([v[0] for v in res[m]]).mean() for m in names]
    fg = [torch.tensor([v[1] for v in res[m]]).mean() for m in names]
    x = torch.arange(len(names)).float()
    ax[0].bar(x - 0.2, acc, 0.4, label="avg acc")
    ax[0].bar(x + 0.2, fg, 0.4, label="forgetting")
    ax[0].set_xticks(x, names, rotation=25, ha="right")
    ax[0].legend()
    ax[0].set_title("permuted digits, 5 tasks")
    for m in ("finetune", "ewc", "kfac", "lowrank", "lowrank+Q"):
        ax[1].plot(runs[m][0]["R"][:, 0], marker="o", label=m)
    ax[1].set_xlabel("after training task")
    ax[1].set_ylabel("accuracy on task 0")
    ax[1].legend()
    ks = [s[0] for s in sweep]
    ax[2].plot(ks, [s[1] for s in sweep], marker="o", color="C0")
    ax[2].set_xlabel("rank k")
    ax[2].set_ylabel("avg acc", color="C0")
    tw = ax[2].twinx()
    tw.plot(ks, [s[4] for s in sweep], marker="s", color="C1", label="update s")
    tw.plot(ks, [s[5] / 2**20 for s in sweep], marker="^", color="C2", label="state MB")
    tw.set_ylabel("update time (s) / state (MB)")
    tw.legend(loc="lower right")
    ax[2].set_title("rank sweep")
    fig.tight_layout()
    fig.savefig(OUT / "continual_digits.png", dpi=120)
    print(f"\nfigure: {OUT / 'continual_digits.png'}")


if __name__ == "__main__":
    main()
