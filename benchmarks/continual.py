"""Continual learning over 10-task streams of scikit-learn digits: fine-tuning, online EWC
(diagonal online Laplace), K-FAC online Laplace, the diagonal-plus-low-rank Laplace filter
(one-pass K-FAC eigenbasis update) without drift, with the process noise chosen by the
evidence (per tensor) or fixed, and with RTS smoothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/continual.py [--seeds 3] [--quick] [--timing]

Streams (no download: the digits ship with scikit-learn):
  permuted  task 0 the images as they are, task t > 0 a fixed random pixel permutation
            (no drift between tasks: the tasks are unrelated)
  rotated   task t the images rotated by t * 12 degrees (gradual drift)
Network: a 64-300-300-10 ReLU MLP (P = 112,810), Adam (lr 1e-3, batch 128), the same epochs
per task for every method; all methods use the Bayesian scale ``loss = mean NLL +
penalty / N`` with prior precision ``δ`` and no tuned regularisation strength.

Metrics (R[i, j] = test accuracy on task j after training on task i, T tasks):
  avg acc    = mean_j R[T-1, j]                 (the final model on every task)
  forgetting = mean_{j<T-1} max_{i<T-1} R[i, j] − R[T-1, j]
"+smooth" evaluates task j with its own smoothed weights m^s_j (uses the task identity at
test time). Costs are ratios to one plain forward+backward pass of a training batch,
measured in the same process (the machine is shared), and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv.continual import (
    DiagonalFilter,
    EvidenceNoise,
    KFACFilter,
    LaplaceFilter,
    Transition,
)
from bayescurv.data.digits import load_digits_split, permuted_digits, rotated_digits

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs"
METHODS = ("finetune", "ewc", "kfac", "lowrank", "lowrank+Q", "lowrank+q1e-3")
SMOOTHED = ("lowrank+Q", "lowrank+q1e-3")
ROWS = (*METHODS, *(f"{m}+smooth" for m in SMOOTHED))
LABELS = {"finetune": "fine-tuning", "ewc": "online EWC (diagonal filter)",
          "kfac": "K-FAC online Laplace (KFACFilter)", "lowrank": "low-rank filter, Q = 0",
          "lowrank+Q": "low-rank filter, Q by evidence (all layers)",
          "lowrank+q1e-3": "low-rank filter, fixed q = 1e-3",
          "lowrank+Q+smooth": "low-rank filter, Q by evidence + RTS smoothing",
          "lowrank+q1e-3+smooth": "low-rank filter, q = 1e-3 + RTS smoothing"}


def make_tasks(stream: str, num_tasks: int, seed: int = 0) -> list[tuple]:
    split = load_digits_split(seed=seed)

    def view(x: torch.Tensor, t: int) -> torch.Tensor:
        if stream == "rotated":
            return rotated_digits(x, angle=12.0 * t)
        return x if t == 0 else permuted_digits(x, seed=100 + t)

    return [(view(split.x_train, t), split.y_train, view(split.x_test, t), split.y_test)
            for t in range(num_tasks)]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                         nn.Linear(300, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def plain_step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 30) -> float:
    """Seconds of one forward+backward of a training batch (the unit of the cost ratios)."""
    for _ in range(3):
        nn.functional.cross_entropy(model(x[:BATCH]), y[:BATCH]).backward()
    t0 = time.perf_counter()
    for _ in range(reps):
        nn.functional.cross_entropy(model(x[:BATCH]), y[:BATCH]).backward()
    model.zero_grad()
    return (time.perf_counter() - t0) / reps


BATCH = 128


def train(model, xtr, ytr, reg, epochs: int, seed: int, lr: float = 1e-3) -> int:
    n = xtr.shape[0]
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + reg.penalty(model) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


def make_filter(method: str, model: nn.Module, rank: int, delta: float):
    if method == "finetune":
        return None
    if method == "ewc":
        return DiagonalFilter(model, "classification", prior_precision=delta)
    if method == "kfac":
        return KFACFilter(model, "classification", prior_precision=delta)
    noise = {"lowrank": 0.0, "lowrank+Q": EvidenceNoise(), "lowrank+q1e-3": 1e-3}[method]
    return LaplaceFilter(model, "classification", rank=rank, prior_precision=delta,
                         eigensolver="kfac", transition=Transition(noise=noise))


def run(method: str, tasks, *, seed: int, epochs: int, rank: int, delta: float) -> dict:
    """Train over the tasks with one method: the accuracy matrix and the costs."""
    model = mlp(seed)
    unit = plain_step_time(mlp(seed), tasks[0][0], tasks[0][1])
    filt = make_filter(method, model, rank, delta)
    T = len(tasks)
    R = torch.zeros(T, T)
    train_s, update_s, steps = [], [], 0
    for i, (xtr, ytr, _, _) in enumerate(tasks):
        if filt is not None:
            filt.predict()
        t0 = time.perf_counter()
        steps = train(model, xtr, ytr, filt, epochs, seed=seed * 100 + i)
        train_s.append(time.perf_counter() - t0)
        if filt is not None:
            t0 = time.perf_counter()
            filt.update(DataLoader(TensorDataset(xtr, ytr), batch_size=512))
            update_s.append(time.perf_counter() - t0)
        for j, (_, _, xte, yte) in enumerate(tasks):
            R[i, j] = accuracy(model, xte, yte)
    out = {"R": R.tolist(), "train_s": train_s, "update_s": update_s, "unit_s": unit,
           "steps": steps, "memory": filt.memory_bytes() if filt is not None else 0}
    if method in SMOOTHED:
        sm = filt.smooth()
        keep = filt.params.vector().clone()
        acc = []
        for j, (_, _, xte, yte) in enumerate(tasks):
            filt.assign(model, sm.means[j])
            acc.append(accuracy(model, xte, yte))
        filt.assign(model, keep)
        out["smoothed"] = acc
        out["noise"] = [float(q) for q in filt.noise.unique()]  # the last evidence estimate
    return out


def summarize(R: torch.Tensor, final: torch.Tensor | None = None) -> tuple[float, float]:
    final = R[-1] if final is None else final
    best = R[:-1, :-1].max(0).values
    return float(final.mean()), float((best - final[:-1]).mean())


def pm(x: list[float], fmt: str = ".3f") -> str:
    t = torch.tensor(x, dtype=torch.float64)
    sd = float(t.std()) if len(x) > 1 else 0.0
    return f"{float(t.mean()):{fmt}} ± {sd:{fmt}}"


def report(stream: str, runs: dict[str, list[dict]], args) -> list[str]:
    lines = [f"\n### {stream} digits, {args.tasks} tasks, {args.seeds} seeds (mean ± std)\n",
             "| method | avg acc | forgetting | update (x fwd+bwd) | update s | train+update "
             "s / task | state MB |", "|---|---|---|---|---|---|---|"]
    for m in ROWS:
        base = m.removesuffix("+smooth")
        rs = runs[base]
        acc, fg = zip(*[summarize(torch.tensor(r["R"]),
                                  torch.tensor(r["smoothed"]) if m != base else None)
                        for r in rs])
        if rs[0]["update_s"]:
            upd = [sum(r["update_s"]) / len(r["update_s"]) for r in rs]
            ratio = pm([u / r["unit_s"] for u, r in zip(upd, rs)], ".0f")
            upd_s = pm(upd, ".2f")
        else:
            ratio = upd_s = "–"
        total = pm([(sum(r["train_s"]) + sum(r["update_s"])) / len(r["train_s"]) for r in rs],
                   ".2f")
        mem = rs[0]["memory"] / 2**20
        lines.append(f"| {LABELS[m]} | {pm(list(acc))} | {pm(list(fg))} | {ratio} | {upd_s} | "
                     f"{total} | {mem:.2f} |")
    lines.append("\nfinal accuracy per task (seed mean), tasks 0..T-1:\n")
    for m in ROWS:
        base = m.removesuffix("+smooth")
        key = "smoothed" if m != base else None
        rows = torch.tensor([r[key] if key else r["R"][-1] for r in runs[base]]).mean(0)
        lines.append(f"    {m:<18}" + " ".join(f"{float(a):.2f}" for a in rows))
    return lines


def plot(all_runs: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(6.5 * len(all_runs), 4), squeeze=False)
    for ax, (stream, runs) in zip(axes[0], all_runs.items()):
        for m in ROWS:
            base = m.removesuffix("+smooth")
            key = "smoothed" if m != base else None
            rows = torch.tensor([r[key] if key else r["R"][-1] for r in runs[base]])
            mean, sd = rows.mean(0), rows.std(0) if rows.shape[0] > 1 else rows[0] * 0
            x = torch.arange(rows.shape[1])
            ax.plot(x, mean, marker="o", ms=3, label=LABELS[m])
            ax.fill_between(x, mean - sd, mean + sd, alpha=0.15)
        ax.set_xlabel("task")
        ax.set_ylabel("test accuracy after the last task")
        ax.set_title(f"{stream} digits, {args.tasks} tasks, {args.seeds} seeds")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def timing(reps: int = 3) -> None:
    """Update cost on the benchmark MLP after one task (warm: each update runs once before it
    is timed): KFACFilter against the low-rank filter's K-FAC route at several k and the
    matrix-free randomized route; and the one-time warm-up of the matrix-free GGN product
    that made the issue's rank sweep non-monotone."""
    from bayescurv.curvature.matfree import CurvatureLinearOperator
    from bayescurv.params import select

    tasks = make_tasks("permuted", 1)
    xtr, ytr = tasks[0][0], tasks[0][1]
    model = mlp(0)
    train(model, xtr, ytr, None, 2, seed=0)
    data = DataLoader(TensorDataset(xtr, ytr), batch_size=512)
    small = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    op = CurvatureLinearOperator(small, "classification", data, select(small, "all"))
    print("\nmatrix-free GGN product, 64-100-10 MLP (the issue's), 20 columns: first call, "
          "then warm calls")
    for _ in range(3):
        t0 = time.perf_counter()
        op.matmat(torch.randn(7510, 20))
        print(f"  {time.perf_counter() - t0:.2f} s", flush=True)
    unit = plain_step_time(model, xtr, ytr)
    rows = [("K-FAC online Laplace", lambda: KFACFilter(model, "classification"))]
    for k in (10, 40, 80, 160):
        rows.append((f"low-rank, kfac route, k = {k}",
                     lambda k=k: LaplaceFilter(model, "classification", rank=k,
                                               eigensolver="kfac")))
    rows.append(("low-rank, randomized (2 power iters), k = 40",
                 lambda: LaplaceFilter(model, "classification", rank=40,
                                       eigensolver_options={"power_iters": 2})))
    print(f"\nupdate cost, 64-300-300-10 MLP, N = {xtr.shape[0]}, median of {reps} warm calls")
    print("| update | s | x fwd+bwd | x K-FAC |\n|---|---|---|---|")
    base = None
    for name, make in rows:
        filt = make()
        times = []
        for _ in range(reps + 1):
            filt.predict()
            t0 = time.perf_counter()
            filt.update(data)
            times.append(time.perf_counter() - t0)
            if "randomized" in name:
                break  # minutes per call: one (warm after the first K-FAC pass) is enough
        t = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        base = t if base is None else base
        print(f"| {name} | {t:.2f} | {t / unit:.0f} | {t / base:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=40,
                    help="k; 40 makes the state (P (k + 2) floats) equal to K-FAC's after 10 "
                         "tasks")
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--streams", default="permuted,rotated")
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 tasks, 1 epoch")
    ap.add_argument("--figure", default=str(ROOT / "docs" / "continual_tasks.png"))
    ap.add_argument("--timing", action="store_true", help="only the update-cost table")
    args = ap.parse_args()
    if args.timing:
        torch.set_num_threads(1)
        timing()
        return
    if args.quick:
        args.seeds, args.tasks, args.epochs = 1, 4, 1
        args.figure = str(OUT / "continual_tasks.png")
    torch.set_num_threads(1)
    start = time.perf_counter()
    all_runs: dict[str, dict[str, list[dict]]] = {}
    lines = [f"64-300-300-10 MLP (P = 112,810), {args.epochs} epochs/task, rank k = {args.rank}, "
             f"δ = {args.delta}"]
    for stream in args.streams.split(","):
        tasks = make_tasks(stream, args.tasks)
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for seed in range(args.seeds):
            for m in METHODS:
                runs[m].append(run(m, tasks, seed=seed, epochs=args.epochs, rank=args.rank,
                                   delta=args.delta))
                print(f"  {stream} seed {seed} {m}: "
                      f"{summarize(torch.tensor(runs[m][-1]['R']))} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        all_runs[stream] = runs
        lines += report(stream, runs, args)
    lines.append(f"\ntotal wall time {time.perf_counter() - start:.0f} s (one core)")
    print("\n".join(lines))
    OUT.mkdir(exist_ok=True)
    (OUT / "continual_runs.json").write_text(json.dumps(all_runs))
    plot(all_runs, args, Path(args.figure))


if __name__ == "__main__":
    main()
