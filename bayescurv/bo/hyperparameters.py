r"""MAP-II tuning of the surrogate's prior precision and noise, and its noise hyperprior.

The objective is the evidence plus the log density of a hyperprior on the noise variance,
:math:`\log p(D \mid \delta, \sigma) + \log p(\sigma^2)`, as BoTorch's GPs fit theirs. The
``structure="ntk"`` path tunes the same objective on the data-space kernel
(:func:`bayescurv.bo.ntk.tune`); the Fourier default fits it together with its lengthscales
(:func:`bayescurv.bo.ard.fit_lengthscales`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bayescurv.errors import NumericalError
from bayescurv.laplace import Laplace
from bayescurv.laplace.marglik import maximize_lbfgs

#: gradient tolerance of the closed-form evidence tuners (:func:`bayescurv.bo.ntk.tune`,
#: :func:`bayescurv.bo.ard.fit_lengthscales`): their objectives are exact Gaussian densities
#: of a few variables, cheap to evaluate, so they run to torch's default ``tolerance_grad``
CLOSED_FORM_TOL = 1e-7


def floored_noise_variance(s: Tensor, floor: float, lo: float = -30.0,
                           hi: float = 4.6) -> Tensor:
    r"""The noise variance of the tuners' parametrization, :math:`\sigma^2 = \sigma_{min}^2
    + e^{s}` with ``floor`` :math:`= \sigma_{min}^2`: the floor holds during tuning, not as a
    clamp afterwards; ``s`` is boxed to ``[lo, hi]`` so a line search cannot overflow."""
    return floor + s.clamp(lo, hi).exp()


def noise_start(sigma: float, floor: float) -> float:
    r"""The :math:`s` of :func:`floored_noise_variance` for a starting noise std ``sigma``
    (just above the floor when ``sigma`` is at or below it)."""
    return math.log(max(sigma**2 - floor, 1e-8))

def gaussian_log_evidence(r: Tensor, K: Tensor) -> Tensor:
    r""":math:`\log N(r; 0, K)` summed over the columns of ``r`` (``(N,)`` or ``(N, m)``, one
    ``N x N`` kernel matrix ``K`` shared by the columns); differentiable in both.

    :math:`-\infty` when ``K`` is numerically not positive definite, deliberately without the
    jitter of ``psd_safe_cholesky``: the value is an evidence that a tuner compares across
    hyperparameters, and a jittered ``K`` would be another model's evidence; :math:`-\infty`
    makes the L-BFGS line search back off (:func:`~bayescurv.laplace.marglik.maximize_lbfgs`)
    and the noise floor keeps ``K`` positive definite at sane values. Posteriors, which must
    exist for any hyperparameters, factorize with ``psd_safe_cholesky``
    (:class:`~bayescurv.bo.ntk.LinearizedGP`, the fantasy model)."""
    L, info = torch.linalg.cholesky_ex(K)
    if info.item() != 0:
        return r.new_tensor(-math.inf)
    R = r.reshape(K.shape[0], -1)
    a = torch.linalg.solve_triangular(L, R, upper=False)
    return -0.5 * (a.square().sum() + R.shape[1] * 2 * L.diagonal().log().sum()
                   + R.numel() * math.log(2 * math.pi))


def noise_log_prior(noise_prior, sigma: Tensor) -> Tensor:
    r"""Log density of the noise hyperprior at the noise variance :math:`\sigma^2` (as GPyTorch
    places priors on the noise variance; no Jacobian of the log parametrization, the MAP-II
    convention of BoTorch's GPs). ``noise_prior`` is a ``torch.distributions.Distribution`` over
    :math:`\sigma^2` or ``None`` (returns 0)."""
    if noise_prior is None:
        return sigma.new_zeros(())
    return noise_prior.log_prob(sigma.reshape(()) ** 2).sum()


def default_noise_prior(dtype=torch.float64, device=None):
    r"""LogNormal(-4, 1) on :math:`\sigma^2` in standardized outcome units: BoTorch's default
    noise prior for ``SingleTaskGP`` (median :math:`\sigma^2 = e^{-4}`, i.e.
    :math:`\sigma \approx 0.14`)."""
    return torch.distributions.LogNormal(torch.tensor(-4.0, dtype=dtype, device=device),
                                         torch.tensor(1.0, dtype=dtype, device=device))


def resolve_noise_prior(spec: Any, dtype=torch.float64, device=None):
    """The ``noise_prior`` argument of :class:`~bayescurv.bo.LaplaceModel` as a distribution:
    ``"default"`` is :func:`default_noise_prior`; a distribution or ``None`` is returned
    as is."""
    if isinstance(spec, str):  # "default"
        return default_noise_prior(dtype, device)
    return spec


def tune_hyperparameters(
    la: Laplace, granularity: str, n_steps: int, lr: float | None = None,
    tune_sigma: bool = True, noise_prior=None,
    evidence: Callable[[Tensor, Tensor], Tensor] | None = None, tol: float = 1e-4,
    min_noise: float = 0.0,
) -> float:
    r"""MAP-II: maximize :math:`\log p(D \mid \delta, \sigma) + \log p(\sigma^2)` (the
    evidence plus the noise hyperprior) over :math:`\log\delta` (one per layer for
    ``granularity="layer"``, else one) and :math:`\log\sigma`, by at most ``n_steps`` L-BFGS
    iterations from the current values. ``evidence(prior, sigma)`` defaults to the Laplace
    evidence ``la.log_marginal_likelihood`` (e.g.
    :meth:`GaussianGLM.log_marginal_likelihood` instead). Keeps the best iterate and stores it
    in ``la``; returns the best objective. ``lr`` is ignored (the line search sets the steps;
    it was Adam's learning rate). The noise is parametrized as
    :math:`\sigma^2 = \sigma_{min}^2 + e^s` (``min_noise`` :math:`=\sigma_{min}`,
    :func:`floored_noise_variance`), so the floor holds during tuning; the log prior precision
    is boxed to :math:`[-23, 23]`.

    Shared with :meth:`Laplace.optimize_prior_precision`
    (:func:`bayescurv.laplace.marglik.optimize`): the log-space parametrization and the inner
    L-BFGS loop, :func:`~bayescurv.laplace.marglik.maximize_lbfgs`. Different, because the
    surrogate needs it:

    - the objective: any ``evidence`` (the linearized model's, whose posterior mean is
      re-solved for every :math:`(\delta, \sigma)`) plus a noise hyperprior; ``optimize``
      maximizes the Laplace evidence of ``la`` alone (type-II maximum likelihood);
    - a non-finite evidence (or a :class:`~bayescurv.errors.NumericalError` from it, e.g. a
      posterior precision that is numerically indefinite at an extreme trial point) is a
      failed trial step and the best finite iterate is kept, where ``optimize`` raises: a BO
      loop refits the surrogate at every iteration and must not stop on one extreme trial
      point;
    - the start is the current :math:`(\delta, \sigma)` (warm start across refits), not
      ``optimize``'s grid scan for a scalar prior; and ``n_steps`` is a budget (refits use a
      fraction of it), so stopping before ``tol`` warns nothing.
    """
    if lr is not None:
        warnings.warn("tune_hyperparameters: lr is ignored (L-BFGS with a line search)",
                      DeprecationWarning, stacklevel=2)
    evidence = la.log_marginal_likelihood if evidence is None else evidence
    cur = la.prior_precision
    size = la.num_layers if granularity == "layer" else 0
    if size == 0:
        init = cur.mean().reshape(())
    elif cur.dim() == 1 and cur.numel() == size:
        init = cur.clone()
    else:
        init = cur.mean().expand(size).clone()
    floor = min_noise**2
    sigma0 = la.sigma_noise.reshape(())
    log_prior = init.log().clone().requires_grad_(True)
    s = sigma0.new_tensor(noise_start(float(sigma0), floor)).requires_grad_(tune_sigma)
    variables = [log_prior] + ([s] if tune_sigma else [])

    def sigma_of(s: Tensor) -> Tensor:
        return floored_noise_variance(s, floor).sqrt() if tune_sigma else sigma0

    def objective() -> Tensor:
        sigma = sigma_of(s)
        try:
            lml = evidence(log_prior.clamp(-23.0, 23.0).exp(), sigma)
        except NumericalError:  # an extreme trial point: a failed step, not a failed fit
            return log_prior.new_tensor(-math.inf)
        return lml + noise_log_prior(noise_prior if tune_sigma else None, sigma)

    best, _, _ = maximize_lbfgs(objective, variables, n_steps, tol=tol, keep_best=True)
    la.prior_precision = log_prior.detach().clamp(-23.0, 23.0).exp()
    if tune_sigma:
        la.sigma_noise = sigma_of(s.detach())
    return best
