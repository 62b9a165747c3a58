r"""Exact inference in the linearized Gaussian model of a regression Laplace posterior.

With a Gaussian likelihood the network linearized at :math:`\theta^*`,
:math:`f_{lin}(x;\theta) = f(x;\theta^*) + J(x)(\theta - \theta^*)`, is a *linear-Gaussian*
model: with prior :math:`\theta \sim N(0, D^{-1})`, :math:`D = diag(\delta)`, and noise
:math:`\sigma^2`, its posterior and evidence are closed-form for **any** hyperparameters. Write
:math:`\tilde r = y - f(X;\theta^*) + J\theta^*` (targets of the linear model),
:math:`G = J^\top J` (the unit-noise GGN), :math:`b = J^\top\tilde r` and
:math:`\Lambda = G/\sigma^2 + D` (the full-GGN posterior precision). Then

.. math::
    \bar\theta = \Lambda^{-1} b/\sigma^2, \qquad
    \log p(y) = \log N(\tilde r;\, 0,\, J D^{-1} J^\top + \sigma^2 I)
    = -\tfrac12\Big[\frac{\|\tilde r\|^2 - b^\top\bar\theta}{\sigma^2}
      + N\log 2\pi\sigma^2 + \log\det\Lambda - \log\det D\Big]

(Woodbury and the matrix-determinant lemma; :math:`N` = targets x outputs). All data enter
through the sufficient statistics :math:`G`, :math:`J^\top(y - f)`, :math:`\|y - f\|^2` and
:math:`\theta^*`, collected once.

Why: the Laplace evidence at a fixed :math:`\theta^*` equals this only when
:math:`\theta^*` is the MAP *for the hyperparameters being evaluated*. When the noise is tuned
far below the MAP fit's residual (noiseless objectives in Bayesian optimization) the fixed-
:math:`\theta^*` evidence is pinned by the training residual; the linear model re-solves the
mean, :math:`\bar\theta`, for every :math:`(\delta, \sigma)` — the type-II maximum likelihood
of the GP :math:`f_{lin}` (for a linear last layer on fixed features: Bayesian linear
regression, exactly). The predictive mean is then :math:`f(x;\theta^*) + J(x)(\bar\theta -
\theta^*)` (:meth:`GaussianGLM.mean_offset`); the covariance is unchanged.

Requires ``likelihood="regression"``, ``kind="ggn"`` and ``structure="full"`` (``G`` must be
exact).

Precision: the statistics and the evidence are formed in the posterior's
:attr:`~bayescurv.Laplace.internal_dtype` (float64 for float32/bf16/fp16 models): at small
:math:`\sigma` the quadratic term :math:`(\|\tilde r\|^2 - b^\top\bar\theta)/\sigma^2` is a
difference of two large numbers, which float32 loses entirely. Results come back in the
model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from bayescurv import batches
from bayescurv.errors import InvalidArgumentError
from bayescurv.laplace.posterior import Laplace
from bayescurv.likelihoods import Gaussian


class GaussianGLM:
    """Sufficient statistics of the linearized Gaussian model of a fitted ``la``.

    Args:
        la: a fitted regression :class:`~bayescurv.Laplace` with ``structure="full"`` and
            ``kind="ggn"`` (any subset; a scalar or vector noise is not needed here).
        data: the training data ``la`` was fitted on (iterable of ``(x, y)`` batches).
    """

    def __init__(self, la: Laplace, data: Iterable, *, x_key: str = "x", y_key: str = "y"):
        la.check_fitted()
        if la.likelihood.name != "regression" or la.kind != "ggn" or la.structure != "full":
            raise InvalidArgumentError(
                "the exact linearized Gaussian model needs likelihood='regression', kind='ggn' "
                f"and structure='full' (got {la.likelihood.name!r}, {la.kind!r}, "
                f"{la.structure!r})"
            )
        if la.per_output_noise:
            raise InvalidArgumentError("GaussianGLM supports a scalar noise only")
        self.la = la
        params = la.params
        lik = Gaussian(1.0)
        dt = la.internal_dtype
        grad = torch.zeros(params.numel, dtype=dt, device=params.device)
        sse = grad.new_zeros(())
        for x, y in batches.iterate(data, device=params.device, dtype=params.dtype,
                                    x_key=x_key, y_key=y_key):
            with torch.enable_grad():
                f, y = lik.check(params.forward(x), y)  # read with params.output_key
                resid = (y - f).reshape(f.shape[0], -1)
                # J^T (y - f) = the gradient of -1/2 ||y - f||^2
                gs = torch.autograd.grad(-0.5 * resid.square().sum(), list(params.params),
                                         allow_unused=True)
            grad += params.flatten([torch.zeros_like(p) if g is None else g
                                    for p, g in zip(params.params, gs)]).detach().to(dt)
            sse += resid.detach().to(dt).square().sum()
        batches.all_reduce_([grad, sse])
        theta = la.mean.detach()
        G = la.curvature.to_dense().detach().to(dt)
        jr = la.posterior_entries(grad)  # J^T (y - f)
        self.theta = theta
        self.b = jr + G @ theta  # J^T r~
        self.rr = sse + 2 * theta @ jr + theta @ G @ theta  # ||r~||^2
        self.num_targets = la.num_data * la.num_outputs

    def _precision_and_sigma(self, prior_precision, sigma_noise):
        la = self.la
        prior = la.prior_precision if prior_precision is None else prior_precision
        sigma = la.sigma_noise if sigma_noise is None else sigma_noise
        sigma = la.as_internal(sigma).reshape(())
        prior = la.as_internal(prior)
        return la.posterior_precision_at(prior, sigma), prior, sigma

    def posterior_mean(self, prior_precision: Tensor | None = None,
                       sigma_noise: Tensor | None = None) -> Tensor:
        r""":math:`\bar\theta = \Lambda^{-1} J^\top\tilde r/\sigma^2` (posterior's flat order,
        model dtype)."""
        lam, _, sigma = self._precision_and_sigma(prior_precision, sigma_noise)
        return (lam.solve(self.b) / sigma**2).to(self.la.params.dtype)

    def log_marginal_likelihood(self, prior_precision: Tensor | None = None,
                                sigma_noise: Tensor | None = None) -> Tensor:
        """Exact log evidence of the linearized model (module docstring); differentiable in
        ``prior_precision`` and ``sigma_noise``."""
        lam, prior, sigma = self._precision_and_sigma(prior_precision, sigma_noise)
        s2 = sigma**2
        theta_bar = lam.solve(self.b) / s2
        log_det_prior = self.la.prior_diagonal(prior).log().sum()
        n = self.num_targets
        quad = (self.rr - self.b @ theta_bar) / s2
        lml = -0.5 * (quad + n * torch.log(2 * math.pi * s2) + lam.logdet() - log_det_prior)
        return lml.to(self.la.params.dtype)

    def mean_offset(self, x: Tensor, theta_bar: Tensor) -> Tensor:
        r""":math:`J(x)(\bar\theta - \theta^*)` by one forward-mode pass at :math:`\theta^*`;
        differentiable in ``x``. Output shaped like the network's output at ``x``."""
        params = self.la.params
        full = params.vector()
        direction = self.la.with_posterior_entries((theta_bar - self.theta).to(full.dtype),
                                   torch.zeros_like(full))
        _, out = torch.func.jvp(lambda v: params.functional_call(v, x), (full,), (direction,))
        return out
