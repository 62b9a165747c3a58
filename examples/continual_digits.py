"""Continual learning on permuted digits with the low-rank Laplace filter and RTS smoothing.

    OMP_NUM_THREADS=2 .venv/bin/python examples/continual_digits.py

Each task is the scikit-learn digits under its own pixel permutation. The filter's penalty
is a drop-in regulariser (``loss = mean NLL + filter.penalty(model) / N``); after each
task ``filter.update`` adds the task's GGN (top-k eigendirections + exact residual
diagonal). After the last task the smoother gives one weight vector per task, without
touching any data. See benchmarks/continual.py for the comparison with EWC and K-FAC.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv.continual import LaplaceFilter, Transition
from bayescurv.data.digits import load_digits_split, permuted_digits

NUM_TASKS, EPOCHS, RANK = 4, 10, 30


def main() -> None:
    torch.manual_seed(0)
    split = load_digits_split()
    tasks = []
    for t in range(NUM_TASKS):
        perm = (lambda x: x) if t == 0 else (lambda x, t=t: permuted_digits(x, seed=100 + t))
        tasks.append((perm(split.x_train), split.y_train, perm(split.x_test), split.y_test))

    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    # the hidden layer may drift a little between tasks, the head a bit more
    transition = Transition(noise={"0": 1e-3, "2": 1e-2})
    filt = LaplaceFilter(model, "classification", rank=RANK, prior_precision=1.0,
                         transition=transition, generator=torch.Generator().manual_seed(0))

    def acc(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    for t, (xtr, ytr, _, _) in enumerate(tasks):
        filt.predict()  # the prior for task t
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(EPOCHS):
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y) + filt.penalty(model) / len(xtr)
                opt.zero_grad()
                loss.backward()
                opt.step()
        filt.update(DataLoader(TensorDataset(xtr, ytr), batch_size=512))
        print(f"after task {t}: " + "  ".join(f"{acc(x, y):.3f}" for _, _, x, y in tasks))

    final = [acc(x, y) for _, _, x, y in tasks]
    smoothed = filt.smooth()
    print("\ntask  filtered(own)  smoothed  final model")
    for t, (_, _, x, y) in enumerate(tasks):
        filt.assign(model, filt.steps[t].mean)
        own = acc(x, y)
        filt.assign(model, smoothed.means[t])
        print(f"{t:>4}  {own:>13.3f}  {acc(x, y):>8.3f}  {final[t]:>11.3f}")


if __name__ == "__main__":
    main()
