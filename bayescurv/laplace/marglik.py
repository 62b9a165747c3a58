r"""Marginal-likelihood (evidence) tuning of a Laplace posterior's prior precision and
observation noise: :func:`optimize` (L-BFGS on the log evidence, from the best point of a
coarse grid), :func:`gridsearch` (a validation metric over a grid) and the shared L-BFGS loop
:func:`maximize_lbfgs`.

The prior algebra (group indices, validation, expansion, :math:`H + diag(\delta)`) lives in
:mod:`bayescurv.laplace.prior`; its names are re-exported here for compatibility.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayescurv.errors import ConvergenceWarning, InvalidArgumentError, NonFiniteError
from bayescurv.laplace.prior import (  # noqa: F401  (re-exported for compatibility)
    GRANULARITIES,
    add_prior,
    check_prior,
    expand_prior,
    group_index,
    layer_index,
    log_prior,
    tensor_index,
)

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import Laplace

def _initial(la: Laplace, granularity: str) -> Tensor:
    cur = la.internal_prior_precision  # float64 for float32 models: the evidence is tuned there
    size = {"scalar": 0, "layer": la.num_layers, "tensor": la.num_tensors,
            "parameter": la.num_params}[granularity]
    if size == 0:
        return cur.mean().reshape(())
    if cur.dim() == 1 and cur.numel() == size:
        return cur.clone()
    return la.prior_diagonal().mean().expand(size).clone() if cur.dim() else cur.expand(
        size).clone()


@dataclass
class TuningReport:
    """How :func:`optimize` ended (stored as ``Laplace.tuning``).

    Attributes:
        converged: the largest gradient entry (w.r.t. the log-hyperparameters) fell below
            ``tol``.
        n_steps: L-BFGS iterations taken.
        grad_norm: max-norm of the gradient of the log evidence w.r.t. the log
            hyperparameters at the result.
        log_evidence: the log marginal likelihood at the result.
        start: the scalar prior precision the iterations started from (best grid point).
    """

    converged: bool
    n_steps: int
    grad_norm: float
    log_evidence: float
    start: float


GRID = torch.logspace(-6, 6, 25)
"""Coarse log-grid of scalar prior precisions scanned for the starting point."""


def _start(la: Laplace, granularity: str, log_sigma: Tensor) -> Tensor:
    """Initial log prior: for a scalar prior the best of :data:`GRID` and the current value
    (the evidence is unimodal in practice but very flat far from its optimum, where a local
    method crawls); otherwise the current prior, expanded to the granularity."""
    init = _initial(la, granularity)
    if granularity != "scalar":
        return init.log()
    cands = torch.cat([GRID.to(init), init.reshape(1)])
    with torch.no_grad():
        values = torch.stack([
            la.log_marginal_likelihood(c, log_sigma.exp(), in_internal_dtype=True).to(cands)
            for c in cands])
    values = torch.where(torch.isfinite(values), values, -math.inf)
    return cands[values.argmax()].log()


def maximize_lbfgs(
    objective: Callable[[], Tensor], variables: list[Tensor], max_iter: int, *,
    tol: float = 1e-4, keep_best: bool = False, info: dict | None = None,
) -> tuple[float, int, float]:
    r"""Maximize ``objective()`` over ``variables`` (leaf tensors that require grad, updated in
    place; ``objective`` reads them): the inner loop of :func:`optimize`, shared with the
    MAP-II tuners of :mod:`bayescurv.bo`.

    L-BFGS with a strong-Wolfe line search (history 20), at most ``max_iter`` iterations
    (none for ``max_iter < 1``: the objective is only evaluated), stopping when the largest
    gradient entry is below ``tol``. A non-finite value is a failed trial step: the line
    search sees :math:`+\infty` as the loss and backs off (``objective`` may raise instead);
    so is a trial point with non-finite variables, where ``objective`` is not called.
    With ``keep_best`` the variables end at the best finite iterate evaluated, else where
    L-BFGS stopped. Returns the objective at the result, the iterations taken and the
    max-norm of the gradient there (``-inf`` and ``inf`` when the result is not finite).
    ``info``, when given, receives ``evaluations`` (objective evaluations L-BFGS made) and
    ``max_evaluations`` (its budget, ``5/4 max_iter``), to tell why it stopped.
    """
    best: tuple[float, list[Tensor]] = (-math.inf, [v.detach().clone() for v in variables])
    opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=max(max_iter, 1), history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        nonlocal best
        opt.zero_grad()
        if not all(bool(torch.isfinite(v).all()) for v in variables):
            # the line search stepped to NaN/inf (after a non-finite trial): a failed step,
            # never handed to ``objective`` (whose priors would reject it)
            return variables[0].new_tensor(math.inf)
        value = objective()
        if not torch.isfinite(value):
            return torch.tensor(math.inf, dtype=value.dtype, device=value.device)
        if keep_best and value.item() > best[0]:
            best = (value.item(), [v.detach().clone() for v in variables])
        (-value).backward()
        return -value

    if max_iter >= 1:
        opt.step(closure)
    if keep_best:
        with torch.no_grad():
            for v, b in zip(variables, best[1]):
                v.copy_(b)
    loss = closure()  # gradient at the result
    if not torch.isfinite(loss):
        return -math.inf, 0, math.inf
    grad = max((v.grad.abs().max().item() for v in variables if v.grad is not None),
               default=0.0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    steps = int(state.get("n_iter", 0))
    if info is not None:
        info.update(evaluations=int(state.get("func_evals", 0)),
                    max_evaluations=int(opt.param_groups[0]["max_eval"]))
    return -loss.item(), steps, grad


def optimize(
    la: Laplace, granularity: str, n_steps: int, tune_sigma: bool, verbose: bool,
    tol: float = 1e-4,
) -> tuple[Tensor, TuningReport]:
    """Maximize the log evidence over log prior precision (and log noise).

    Method (chosen for a smooth problem with few variables and an ``O(P)`` exact gradient):
    a coarse log-grid start for a scalar prior, then L-BFGS with a strong-Wolfe line search
    in log space (:func:`maximize_lbfgs`), at most ``n_steps`` iterations, stopping when the
    largest gradient entry is below ``tol``. Adam with a fixed learning rate (the earlier
    method) stopped far from the optimum from a distant start. Warns
    (:class:`ConvergenceWarning`) when not converged.
    """
    if granularity not in GRANULARITIES:
        raise InvalidArgumentError(
            f"unknown granularity {granularity!r}; use one of {GRANULARITIES}"
        )
    if tune_sigma and la.likelihood.name != "regression":
        raise InvalidArgumentError("tune_sigma_noise applies to likelihood='regression' only")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise InvalidArgumentError(f"n_steps must be a positive integer, got {n_steps}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise InvalidArgumentError(f"tol must be a positive number, got {tol}")
    log_sigma = la.internal_sigma_noise.log().clone()
    log_prior = _start(la, granularity, log_sigma).clone()
    start = float(log_prior.exp().mean())
    variables = [log_prior.requires_grad_(True)]
    if tune_sigma:
        variables.append(log_sigma.requires_grad_(True))

    def objective() -> Tensor:
        lml = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp(),
                                         in_internal_dtype=True)
        if not torch.isfinite(lml):
            raise NonFiniteError(
                "the log marginal likelihood became non-finite at prior precision "
                f"{log_prior.detach().exp().tolist()}; check the curvature and the data"
            )
        if verbose:
            print(f"log evidence {lml.item():.6f}")
        return lml

    info: dict = {}
    value, steps, grad = maximize_lbfgs(objective, variables, n_steps, tol=tol, info=info)
    report = TuningReport(grad <= tol, steps, grad, value, start)
    if not report.converged:
        warnings.warn(_not_converged(steps, n_steps, grad, tol, info), ConvergenceWarning,
                      stacklevel=3)
    la.prior_precision = log_prior.detach().exp()
    if tune_sigma:
        la.sigma_noise = log_sigma.detach().exp()
    return la.prior_precision, report


def _not_converged(steps: int, n_steps: int, grad: float, tol: float, info: dict) -> str:
    """The :class:`ConvergenceWarning` of :func:`optimize`: the steps taken out of
    ``n_steps``, why L-BFGS stopped and the knob that helps."""
    head = (f"prior-precision optimization did not reach tol={tol:g} (gradient max-norm "
            f"{grad:.3g} w.r.t. the log hyperparameters) in {steps} L-BFGS steps of at most "
            f"n_steps={n_steps}")
    if steps >= n_steps:
        return f"{head}: it used every step; raise n_steps, or check la.tuning"
    evals, budget = info.get("evaluations", 0), info.get("max_evaluations", 0)
    if budget and evals >= budget:
        return (f"{head}: the line searches used L-BFGS's whole budget of {budget} evidence "
                f"evaluations (5/4 of n_steps); raise n_steps (it raises that budget), or "
                "check la.tuning")
    if not math.isfinite(grad):
        return (f"{head}: the log evidence is not finite at the result; check the curvature "
                "and the data (la.tuning has the report)")
    return (f"{head}: it stopped early because its steps no longer changed the log "
            "evidence or the hyperparameters (by more than 1e-12), so more steps would not "
            "help: the gradient is most likely at the rounding level of the evidence. Raise "
            f"tol (e.g. tol={2 * grad:.1g}) to accept this point, or check la.tuning")


def _metric_fn(la: Laplace, metric):
    from bayescurv import metrics

    if callable(metric):
        return metric
    if la.likelihood.name == "regression":
        if metric != "nll":
            raise InvalidArgumentError(
                f"regression grid search supports metric='nll' (Gaussian predictive NLL) or a "
                f"callable; got {metric!r}"
            )
        return lambda pred, y: metrics.gaussian_nll(pred[0], pred[1], y)
    table = {
        "nll": metrics.nll,
        "ece": metrics.ece,
        "brier": lambda p, y: float(_brier(p, y)),
    }
    if metric not in table:
        raise InvalidArgumentError(f"unknown metric {metric!r}; use one of {sorted(table)}")
    return table[metric]


def _brier(p: Tensor, y: Tensor) -> Tensor:
    if p.dim() == 1:
        return ((p - y.to(p.dtype)) ** 2).mean()
    onehot = torch.nn.functional.one_hot(y.long(), p.shape[-1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(-1).mean()


def gridsearch(la: Laplace, val_loader, metric, grid, link: str, verbose: bool,
               x_key: str = "x", y_key: str = "y") -> Tensor:
    """Scalar prior precision minimizing ``metric`` of the GLM predictive on
    ``val_loader``; the prior is set afresh at every grid point (nothing carries over)."""
    from bayescurv import batches

    fn = _metric_fn(la, metric)
    if grid is None:
        grid = torch.logspace(-4, 4, 21, dtype=la.params.dtype)
    try:
        grid = torch.as_tensor(grid, dtype=la.params.dtype).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"grid must be a sequence or tensor of positive prior precisions, got "
            f"{type(grid).__name__} ({err})"
        ) from None
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool((grid <= 0).any()):
        raise InvalidArgumentError("grid must hold positive prior precisions (finite, > 0)")
    data = list(batches.iterate(val_loader, device=la.params.device, dtype=la.params.dtype,
                                batch_dim=la.batch_dim, x_key=x_key, y_key=y_key))
    ys = torch.cat([y for _, y in data])
    best_value, best_prior = float("inf"), None
    for prior in grid:
        la.prior_precision = prior
        preds = [la.predict(x, link=link) for x, _ in data]
        if la.likelihood.name == "regression":
            pred = (torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]))
        else:
            pred = torch.cat(preds)
        value = float(fn(pred, ys))
        if verbose:
            print(f"prior {float(prior):.3g}  {metric if isinstance(metric, str) else 'metric'}"
                  f" {value:.4f}")
        if value < best_value:
            best_value, best_prior = value, prior.clone()
    if best_prior is None:
        raise NonFiniteError("every grid point gave a non-finite metric")
    la.prior_precision = best_prior
    return la.prior_precision


__all__ = ["optimize", "gridsearch", "maximize_lbfgs", "TuningReport", "GRID",
           # re-exported from bayescurv.laplace.prior
           "GRANULARITIES", "layer_index", "tensor_index", "group_index", "check_prior",
           "expand_prior", "log_prior", "add_prior"]
