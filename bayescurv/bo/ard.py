r"""ARD lengthscales of the Fourier-feature surrogate by its exact evidence (type-II MAP).

The default surrogate is Bayesian linear regression on random Fourier features with a bias,
:math:`y = \Phi_\ell(X) w + \varepsilon`, :math:`w \sim N(0, \delta^{-1} I)`,
:math:`\varepsilon \sim N(0, \sigma^2 I)` (one such model per output, hyperparameters shared).
Its evidence is a Gaussian density in closed form,

.. math::
    \log p(Y \mid \ell, \delta, \sigma) = \sum_{k=1}^m \log N\big(y_k;\, 0,\,
    K\big),\quad K = \Phi_\ell\Phi_\ell^\top/\delta + \sigma^2 I,

evaluated in the cheaper of two equal forms: the ``n x n`` Cholesky of :math:`K` when
:math:`n \le P` (``P`` features + bias), else the ``P x P`` Cholesky of
:math:`A = \Phi^\top\Phi/\sigma^2 + \delta I` with Woodbury and the determinant lemma,
:math:`y^\top K^{-1}y = \|y\|^2/\sigma^2 - b^\top A^{-1}b` (:math:`b = \Phi^\top y/\sigma^2`) and
:math:`\log\det K = \log\det A + n\log\sigma^2 - P\log\delta`.

The frequencies and phases are frozen, so the evidence is a smooth function of ``d + 2``
numbers (:math:`\log\ell`, :math:`\log\delta`, the noise) that L-BFGS maximizes, with the
hyperpriors of BoTorch's ``SingleTaskGP``: LogNormal(:math:`\sqrt2 + \tfrac12\log d`,
:math:`\sqrt3`) on each lengthscale (Hvarfner et al., 2024) and a noise prior on
:math:`\sigma^2` — the surrogate's analogue of fitting a GP's ARD kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from bayescurv.bo.features import FourierFeatures
from bayescurv.bo.hyperparameters import (
    CLOSED_FORM_TOL,
    floored_noise_variance,
    gaussian_log_evidence,
)
from bayescurv.errors import InvalidArgumentError, NonFiniteError, NumericalError, ShapeError
from bayescurv.laplace.marglik import maximize_lbfgs

#: isotropic starting lengthscales (unit-cube units) of the multi-start L-BFGS
ARD_STARTS = (0.15, 0.4, 1.0)


def linear_model_log_evidence(phi: Tensor, y: Tensor, prior_precision: Tensor,
                              noise_var: Tensor) -> Tensor:
    r"""Log evidence of Bayesian linear regression (module docstring): ``phi`` is ``n x P``,
    ``y`` is ``n x m``; differentiable in all arguments. Returns :math:`-\infty` when the
    Cholesky factorization fails (a numerically singular matrix: no evidence, not a wrong
    one; why there is no jitter: :func:`~bayescurv.bo.hyperparameters.gaussian_log_evidence`)."""
    n, p = phi.shape
    m = y.shape[-1]
    delta, s2 = prior_precision.reshape(()), noise_var.reshape(())
    const = n * m * math.log(2 * math.pi)
    if n <= p:
        K = phi @ phi.T / delta + s2 * torch.eye(n, dtype=phi.dtype, device=phi.device)
        return gaussian_log_evidence(y, K)
    A = phi.T @ phi / s2 + delta * torch.eye(p, dtype=phi.dtype, device=phi.device)
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        return phi.new_tensor(-math.inf)
    c = torch.linalg.solve_triangular(L, phi.T @ y / s2, upper=False)
    quad = y.square().sum() / s2 - c.square().sum()
    logdet = 2 * L.diagonal().log().sum() + n * s2.log() - p * delta.log()
    return -0.5 * (quad + m * logdet + const)


def default_lengthscale_prior(input_dim: int, dtype=torch.float64, device=None):
    r"""LogNormal(:math:`\sqrt2 + \tfrac12\log d`, :math:`\sqrt3`) on each lengthscale:
    BoTorch's ``SingleTaskGP`` default (dimension-scaled, Hvarfner et al., 2024)."""
    loc = torch.tensor(math.sqrt(2) + 0.5 * math.log(input_dim), dtype=dtype, device=device)
    return torch.distributions.LogNormal(loc, torch.tensor(math.sqrt(3), dtype=dtype,
                                                           device=device))


@dataclass
class ARDFit:
    """Result of :func:`fit_lengthscales` (hyperparameters at the best objective found)."""

    lengthscale: Tensor
    prior_precision: Tensor
    sigma_noise: Tensor
    objective: float


def fit_lengthscales(
    features: FourierFeatures,
    X: Tensor,
    Y: Tensor,
    *,
    noise_prior: Any = None,
    lengthscale_prior: Any = "default",
    min_noise: float = 1e-3,
    fixed_noise: float | None = None,
    starts: tuple[float, ...] = ARD_STARTS,
    max_iter: int = 100,
) -> ARDFit:
    r"""Maximize :math:`\log p(Y \mid \ell, \delta, \sigma) + \log p(\sigma^2) +
    \sum_i \log p(\ell_i)` over ARD lengthscales :math:`\ell \in R^d_+`, the prior precision
    :math:`\delta` and the noise :math:`\sigma \ge` ``min_noise`` (held at ``fixed_noise`` when
    given), by L-BFGS (:func:`~bayescurv.laplace.marglik.maximize_lbfgs`) from each isotropic
    lengthscale in ``starts``; the best iterate over all
    starts is returned. ``noise_prior`` / ``lengthscale_prior``: ``torch.distributions`` over
    :math:`\sigma^2` / each :math:`\ell_i`, ``None``, or (lengthscales) ``"default"``
    (:func:`default_lengthscale_prior`). ``features`` is not modified.
    """
    d_in = features.omega.shape[1]
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0] or X.shape[1] != d_in:
        raise ShapeError(f"expected X n x {d_in} and Y n x m, got {tuple(X.shape)} and "
                         f"{tuple(Y.shape)}")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise NonFiniteError("X and Y must be finite")
    if min_noise <= 0 and fixed_noise is None:
        raise InvalidArgumentError("min_noise must be positive (or give fixed_noise)")
    n, d = X.shape
    if lengthscale_prior == "default":
        lengthscale_prior = default_lengthscale_prior(d, X.dtype, X.device)
    ones = torch.ones(n, 1, dtype=X.dtype, device=X.device)
    floor = min_noise**2

    def unpack(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # a box keeps the line search away from overflow: lengthscales in [1e-3, 1e3], prior
        # precision in [1e-8, 1e8], noise variance in floor + [1e-12, 10]
        ls = z[:d].clamp(-6.9, 6.9).exp()
        delta = z[d].clamp(-18.4, 18.4).exp()
        s2 = (torch.as_tensor(fixed_noise, dtype=z.dtype, device=z.device) ** 2
              if fixed_noise is not None
              else floored_noise_variance(z[d + 1], floor, -27.6, 2.3))
        return ls, delta, s2

    def objective(z: Tensor) -> Tensor:
        ls, delta, s2 = unpack(z)
        phi = torch.cat([features.features(X, ls), ones], 1)
        value = linear_model_log_evidence(phi, Y, delta, s2)
        if noise_prior is not None and fixed_noise is None:
            value = value + noise_prior.log_prob(s2).sum()
        if lengthscale_prior is not None:
            value = value + lengthscale_prior.log_prob(ls).sum()
        return value

    best: tuple[float, Tensor] | None = None
    for ell in starts:
        z = torch.tensor([math.log(ell)] * d + [0.0, math.log(1e-2)], dtype=X.dtype,
                         device=X.device, requires_grad=True)
        value, _, _ = maximize_lbfgs(partial(objective, z), [z], max_iter, tol=CLOSED_FORM_TOL,
                                     keep_best=True)
        if math.isfinite(value) and (best is None or value > best[0]):
            best = (value, z.detach().clone())
    if best is None:
        raise NumericalError("the ARD evidence was not finite at any start (singular "
                             "feature Gram matrix; raise min_noise)")
    ls, delta, s2 = unpack(best[1])
    return ARDFit(ls, delta, s2.sqrt(), best[0])
