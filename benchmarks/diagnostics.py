"""Training diagnostics (issue 32): overhead of each instrument per logged step against a
plain training step, and the docs figure (docs/diagnostics.png), measured in one run.

Case: scikit-learn digits (1,347 training images 8x8), a CNN Conv2d(1, 8, 3) - ReLU -
MaxPool - Conv2d(8, 16, 3) - ReLU - MaxPool - Linear(64, 10) (1,898 parameters), SGD on
mini-batches of 64 with the mean cross-entropy, float32.

- ``overhead``: seconds of :meth:`TrainingMonitor.before_step` + :meth:`after_step` on a
  logged step with one instrument (``loss`` alone is the per-example gradient pass every
  instrument shares) or all of them, divided by the seconds of one plain training step
  (forward, backward, ``opt.step()``) in the same process, median over repeats;
- the figure: two runs of 300 steps logged every 10, learning rate 0.3 (right) and 1.0
  (too high), all instruments; the top-eigenvalue panel shows the stability threshold
  ``2 / lr`` of each run.

Measured on a shared 2-core machine (ratios are robust to its load, seconds are not).

    OMP_NUM_THREADS=1 python benchmarks/diagnostics.py [--plot docs/diagnostics.png]
"""

from __future__ import annotations

import argparse
import builtins
import functools
import statistics
import time

import torch
from torch import nn

from bayescurv.data.digits import load_digits_split
from bayescurv.diagnostics import INSTRUMENTS, TrainingMonitor, plot_histories

BATCH = 64
LRS = {"lr 0.3 (right)": 0.3, "lr 1.0 (too high)": 1.0}


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def digits():
    d = load_digits_split()
    return d.x_train.reshape(-1, 1, 8, 8), d.y_train


def batches(x, y, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        yield x[idx], y[idx]


def train(model, x, y, lr: float, steps: int, monitor: TrainingMonitor | None = None,
          timer: dict | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, (xb, yb) in enumerate(batches(x, y, steps)):
        t0 = time.perf_counter()
        if monitor is not None:
            monitor.before_step(step, (xb, yb))
        t1 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        t2 = time.perf_counter()
        if monitor is not None:
            monitor.after_step(step, (xb, yb))
        t3 = time.perf_counter()
        if timer is not None:
            timer.setdefault("plain", []).append(t2 - t1)
            if monitor is not None and monitor.logs(step):
                timer.setdefault("monitor", []).append(t1 - t0 + t3 - t2)


def overhead(x, y) -> dict[str, float]:
    out = {}
    for name in ("loss", *[i for i in INSTRUMENTS if i != "loss"], "all"):
        instruments = INSTRUMENTS if name == "all" else ("loss",) if name == "loss" else (
            "loss", name)
        model = build()
        monitor = TrainingMonitor(model, "classification", every=5, instruments=instruments,
                                  generator=torch.Generator().manual_seed(0))
        timer: dict = {}
        train(model, x, y, 0.05, 30, monitor, timer)
        out[name] = statistics.median(timer["monitor"]) / statistics.median(timer["plain"])
    return out


def figure(x, y, path: str) -> None:
    monitors = {}
    for label, lr in LRS.items():
        model = build()
        monitors[label] = TrainingMonitor(model, "classification", every=10,
                                          generator=torch.Generator().manual_seed(0))
        train(model, x, y, lr, 300, monitors[label])
        h = monitors[label].history
        print(f"{label}: final loss {h['loss'][-1]:.3f}, top eigenvalue "
              f"{h['top_eigenvalue'][-1]:.2f} (2/lr = {2 / lr:.1f}), median alpha "
              f"{statistics.median(h['alpha']):.2f}, median SNR "
              f"{statistics.median(h['snr']):.2f}")
    plot_histories(monitors, path, lrs=LRS,
                   title="digits CNN, SGD: learning rate 0.3 vs 1.0 (bayescurv.diagnostics)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", help="write the two-run figure to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print = functools.partial(builtins.print, flush=True)  # noqa: A001
    x, y = digits()
    print(f"digits CNN, {sum(p.numel() for p in build().parameters())} parameters, "
          f"batch {BATCH}")
    print("\noverhead per logged step / plain training step (median)")
    for name, ratio in overhead(x, y).items():
        label = "per-example gradients + loss (shared)" if name == "loss" else name
        print(f"  {label:40s} {ratio:7.1f}x")
    if args.plot:
        figure(x, y, args.plot)


if __name__ == "__main__":
    main()
