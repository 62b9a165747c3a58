r"""Training-time instruments, each a function of (model, likelihood, a batch) or of the
per-example gradients of a batch, computed by the curvature engine.

Convention: the loss of a batch is the **mean** negative log-likelihood
:math:`\bar L = \frac1B \sum_b \ell_b` (what a training loop minimises), so curvatures,
traces and eigenvalues are those of :math:`\bar L` (``reduction="mean"``), and
``lr * top_eigenvalue > 2`` means plain gradient descent is unstable along the top
eigenvector (Cohen et al. 2021, "edge of stability").

- :func:`curvature_trace`: :math:`\operatorname{tr} G` by Hutchinson's estimator on
  matrix-free GGN / Hessian products (:func:`~bayescurv.curvature.eigen.hutchinson_trace`),
  or from a K-FAC (:math:`\sum_l \operatorname{tr} A_l \operatorname{tr} B_l`) or the exact
  diagonal of one engine pass.
- :func:`top_eigenvalue`: the largest eigenvalue by Lanczos
  (:func:`~bayescurv.curvature.eigen.lanczos_topk`) on Hessian or GGN products.
- :func:`tic`: the Takeuchi information criterion's penalty
  :math:`\operatorname{tr}((H + \delta I)^{-1} C)` with :math:`C = \sum_b g_b g_b^\top`
  (gradient covariance, sum) and ``H`` the summed curvature in a cheap structure (diag:
  Cockpit's ``TICDiag``; kfac; full); :math:`\mathrm{TIC} = 2 \sum_b \ell_b + 2\cdot` penalty.
  It equals the sum of the batch's self-influences and is the effective number of
  parameters the data determine.
- :func:`gradient_noise`: gradient signal-to-noise
  :math:`\mathrm{SNR} = \|\bar g\|^2 / (\operatorname{tr}\Sigma / B)` and the simple gradient
  noise scale :math:`B_\text{simple} = \operatorname{tr}\Sigma / \|\bar g\|^2` (McCandlish et
  al. 2018) from the per-example gradients, :math:`\Sigma` their sample covariance.
- :func:`effective_step`: Cockpit's local effective step size :math:`\alpha` (Schneider,
  Dangel & Hennig 2021): a quadratic fitted along the step to the batch loss and its
  directional derivative before and after the step (weighted by their per-example
  variances); :math:`\alpha = 2t/\bar t - 1` with ``t`` the step length and
  :math:`\bar t` the far point of the parabola at the starting height: ``-1`` no progress,
  ``0`` the step lands at the minimum of the parabola, ``> 0`` overshoot (``1``: as high on
  the other side). A concave fit gives ``-1`` (still descending), as in Cockpit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayescurv.curvature import compute, eigen
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Likelihood
from bayescurv.params import ParamSet

TRACE_METHODS = ("hutchinson", "kfac", "diag")
TIC_STRUCTURES = ("diag", "kfac", "ekfac", "full")


def curvature_trace(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable,
    *,
    method: str = "hutchinson",
    kind: str = "ggn",
    subset: ParamSet | str | Iterable[str] = "all",
    num_samples: int = 10,
    generator: torch.Generator | None = None,
    x_key: str = "x",
    y_key: str = "y",
) -> Tensor:
    r""":math:`\operatorname{tr} G` of the mean loss over ``data``: ``method="hutchinson"``
    (``num_samples`` Rademacher probes of matrix-free ``kind`` products: ``"ggn"``,
    ``"hessian"``, ``"ef"``; unbiased), ``"kfac"`` (K-FAC's trace, one engine pass) or
    ``"diag"`` (the exact GGN diagonal, one engine pass)."""
    if method not in TRACE_METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; use one of {TRACE_METHODS}")
    if method == "hutchinson":
        op = CurvatureLinearOperator(model, likelihood, data, subset=subset, kind=kind,
                                     reduction="mean", x_key=x_key, y_key=y_key)
        return eigen.hutchinson_trace(op, None, num_samples, generator)
    if kind != "ggn":
        raise InvalidArgumentError(f"method={method!r} computes the GGN; use kind='ggn' or "
                                   "method='hutchinson'")
    curv = compute(model, likelihood, data, structure=method, subset=subset, reduction="mean",
                   x_key=x_key, y_key=y_key)
    return curv.matrix.diagonal().sum().to(curv.params.dtype)


def top_eigenvalue(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable,
    *,
    kind: str = "hessian",
    subset: ParamSet | str | Iterable[str] = "all",
    num_iter: int = 20,
    generator: torch.Generator | None = None,
    x_key: str = "x",
    y_key: str = "y",
) -> Tensor:
    """The largest eigenvalue of the mean loss's ``kind`` (``"hessian"``, ``"ggn"``,
    ``"ef"``) over ``data``, by ``num_iter`` Lanczos steps on matrix-free products."""
    op = CurvatureLinearOperator(model, likelihood, data, subset=subset, kind=kind,
                                 reduction="mean", x_key=x_key, y_key=y_key)
    num_iter = min(num_iter, op.shape[0])
    return eigen.lanczos_topk(op, None, 1, num_iter=num_iter, generator=generator)[0][0]


def tic(grads: Tensor, model: nn.Module, likelihood: str | Likelihood, data: Iterable, *,
        structure: str = "diag", damping: float = 1e-3,
        subset: ParamSet | str | Iterable[str] = "all", x_key: str = "x",
        y_key: str = "y") -> Tensor:
    r"""Takeuchi penalty :math:`\operatorname{tr}((H + \delta I)^{-1} C)` of a batch:
    ``grads`` ``(B, P)`` its per-example gradients (:func:`~bayescurv.influence.
    loss_gradients`), ``H`` the summed GGN over ``data`` (the same batch) in ``structure``,
    ``damping`` :math:`\delta` relative to the mean eigenvalue :math:`\operatorname{tr} H / P`
    (so it is scale free)."""
    if structure not in TIC_STRUCTURES:
        raise InvalidArgumentError(f"structure must be one of {TIC_STRUCTURES}, got "
                                   f"{structure!r}")
    if not damping > 0:
        raise InvalidArgumentError(f"damping must be positive, got {damping}")
    h = compute(model, likelihood, data, structure=structure, subset=subset, x_key=x_key,
                y_key=y_key).matrix
    v = _check_grads(grads).to(h.dtype)
    if v.shape[1] != h.size:
        raise ShapeError(f"grads have {v.shape[1]} columns but the curvature {h.size}")
    op = h.add_diagonal(damping * h.diagonal().mean())
    return (v * op.solve(v.T).T).sum().to(grads.dtype)


def _check_grads(grads: Tensor) -> Tensor:
    if not torch.is_tensor(grads) or grads.dim() != 2 or grads.shape[0] < 2:
        raise ShapeError("grads must be per-example gradients (B, P) with B >= 2, got "
                         f"{getattr(grads, 'shape', type(grads).__name__)}")
    return grads


def gradient_noise(grads: Tensor) -> dict[str, Tensor]:
    r"""From per-example gradients ``(B, P)``: ``grad_norm`` :math:`\|\bar g\|`,
    ``grad_variance`` :math:`\operatorname{tr}\Sigma` (unbiased sample covariance),
    ``snr`` :math:`\|\bar g\|^2 / (\operatorname{tr}\Sigma / B)` and ``noise_scale``
    :math:`\operatorname{tr}\Sigma / \|\bar g\|^2`."""
    g = _check_grads(grads)
    b = g.shape[0]
    mean = g.mean(0)
    sq = mean.square().sum()
    var = (g - mean).square().sum() / (b - 1)
    return {"grad_norm": sq.sqrt(), "grad_variance": var, "snr": sq / (var / b),
            "noise_scale": var / sq}


def effective_step(
    step: Tensor,
    losses: tuple[Tensor, Tensor],
    grads: tuple[Tensor, Tensor],
) -> Tensor:
    r"""Cockpit's :math:`\alpha` of one step ``step`` = :math:`\theta_{t+1} - \theta_t`
    ``(P,)``: ``losses`` the per-example losses of the batch ``(B,)`` at the start and the
    end, ``grads`` its per-example gradients ``(B, P)`` there. The quadratic
    :math:`q(s) = \mu_0 + \mu_1 s + \mu_2 s^2` is the weighted least-squares fit to the mean
    losses at ``s = 0, t`` and the directional derivatives :math:`\bar g^\top d` (``d`` the
    unit step direction), weights the inverse per-example variances."""
    t = torch.linalg.vector_norm(step)
    dt = step.dtype
    if t == 0:
        return torch.tensor(-1.0, dtype=dt, device=step.device)
    d = step / t
    proj = [_check_grads(g).to(dt) @ d for g in grads]
    obs = torch.stack([losses[0].mean(), losses[1].mean(), proj[0].mean(), proj[1].mean()])
    var = torch.stack([losses[0].var(), losses[1].var(), proj[0].var(), proj[1].var()])
    w = 1.0 / var.clamp_min(1e-10)
    one, zero = torch.ones((), dtype=dt), torch.zeros((), dtype=dt)
    phi = torch.stack([torch.stack([one, zero, zero]), torch.stack([one, t, t * t]),
                       torch.stack([zero, one, zero]), torch.stack([zero, one, 2 * t])])
    phi = phi.to(step.device)
    mu = torch.linalg.solve(phi.T @ (w[:, None] * phi), phi.T @ (w * obs.to(dt)))
    if mu[2] <= 0:
        return torch.tensor(-1.0, dtype=dt, device=step.device)
    return 2 * t / (-mu[1] / mu[2]) - 1
