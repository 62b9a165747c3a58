"""Bayesian optimization of Branin and Hartmann6 with the linearized-Laplace surrogate.

A plain BoTorch loop: ``LaplaceModel`` replaces ``SingleTaskGP``; LogEI is optimized with
``optimize_acqf``; new observations enter through ``condition_on_observations`` (a warm-started
MAP refinement + curvature refit), with a full refit every 10 evaluations. For the comparison
with laplace-bayesopt, SingleTaskGP and random search, see ``benchmarks/bo.py``.

    python examples/bo_branin_hartmann.py [--evals 30] [--seed 0] [--mlp]

``--mlp`` uses the network surrogate, ``LaplaceModel(..., hidden=(50, 50))`` (the exact
linearized GP of a 50-50 SiLU MLP on a Fourier-feature embedding of the inputs,
``structure="ntk"``), instead of the Fourier-feature default.
"""

from __future__ import annotations

import argparse
import time

import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin, Hartmann

from bayescurv.bo import LaplaceModel

DT = torch.float64


def optimize(f, n_init: int, n_evals: int, seed: int, **kw) -> torch.Tensor:
    """Run BO on ``f`` (maximization); returns the simple regret after each evaluation."""
    torch.manual_seed(seed)
    lo, hi = f.bounds
    d = f.bounds.shape[1]
    X = lo + (hi - lo) * torch.rand(n_init, d, dtype=DT)
    Y = f(X).unsqueeze(-1)
    model = None
    for it in range(n_evals):
        if model is None or it % 10 == 0:
            model = LaplaceModel(  # defaults: Fourier features, ARD lengthscales by the evidence
                X, Y, input_transform=Normalize(d, bounds=f.bounds),
                outcome_transform=Standardize(1), seed=seed + it, **kw,
            )
        else:
            model = model.condition_on_observations(X[-1:], Y[-1:])
        acq = LogExpectedImprovement(model, best_f=Y.max())
        x, _ = optimize_acqf(acq, bounds=f.bounds, q=1, num_restarts=2, raw_samples=32)
        y = f(x).unsqueeze(-1)
        X, Y = torch.cat([X, x]), torch.cat([Y, y])
    best = torch.cummax(Y.squeeze(-1), 0).values[n_init:]
    return (f.optimal_value - best).clamp_min(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--evals", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlp", action="store_true", help="a 50-50 MLP surrogate")
    args = p.parse_args()
    kw = dict(hidden=(50, 50)) if args.mlp else {}
    for f in (Branin(negate=True).to(DT), Hartmann(dim=6, negate=True).to(DT)):
        t0 = time.perf_counter()
        regret = optimize(f, n_init=5, n_evals=args.evals, seed=args.seed, **kw)
        name = type(f).__name__
        print(f"{name:9s} simple regret after 1/10/{args.evals} evaluations: "
              f"{regret[0]:.4f} / {regret[min(9, len(regret) - 1)]:.4f} / {regret[-1]:.4f}  "
              f"({(time.perf_counter() - t0) / args.evals:.2f} s per iteration)")


if __name__ == "__main__":
    main()
