r"""Likelihood helpers of the GLM solvers: site quantities of a Newton/IRLS step.

For a latent ``f`` of shape ``(N, C)`` (offset included) and the NLL
:math:`\ell(f) = -\log p(y|f)` of a :class:`~bayescurv.likelihoods.Likelihood`, a Newton step
needs :math:`g = \nabla_f \log p = -\nabla_f \ell`, the per-point Hessian square root
:math:`S_n` (:math:`S_n S_n^\top = W_n = \nabla^2_f \ell_n`) and a whitened gradient
:math:`u_n` with :math:`S_n u_n = g_n`. For one output, :math:`u = g/\sqrt{w}`; for softmax,
:math:`S = (I - p\mathbf 1^\top)\,diag(\sqrt p)` and :math:`\mathbf 1^\top g = 0` give the
minimum-norm solution :math:`u = g/\sqrt p` (orthogonal to :math:`null(S) = span(\sqrt p)`).

:class:`Binomial` (successes out of trials, targets ``(N, 2)`` = successes, failures as in
statsmodels/R) lives here because it only serves the GLM layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.errors import ShapeError
from bayescurv.likelihoods import (
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    get_likelihood,
)

_TINY = 1e-300


class Binomial(Likelihood):
    r"""Binomial counts with logit link: :math:`y \sim Bin(n, \sigma(f))`, targets
    ``(N, 2)`` holding (successes, failures), :math:`n` their sum. NLL gradient
    :math:`n\sigma(f) - y`, Hessian :math:`n\sigma(f)(1-\sigma(f))`."""

    name = "binomial"
    links = ("probit", "mc")

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        if f.shape[1] != 1:
            raise ShapeError(f"the binomial likelihood needs one output; got {f.shape[1]}")
        if y.dim() != 2 or y.shape != (f.shape[0], 2):
            raise ShapeError(
                f"binomial targets must be (batch, 2) = (successes, failures); got "
                f"{tuple(y.shape)}"
            )
        if (y < 0).any() or not torch.equal(y, y.round()):
            raise ShapeError("binomial targets must be non-negative integer counts")
        return f, y.to(f.dtype)

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        k, n = y[:, 0], y.sum(-1)
        f = f[:, 0]
        log_comb = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        return log_comb + k * f - n * torch.nn.functional.softplus(f)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        return y.sum(-1, keepdim=True) * torch.sigmoid(f) - y[:, :1]

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        raise NotImplementedError(
            "the binomial Hessian depends on the trials; use bayescurv.glm.likelihoods."
            "hessian_sqrt(lik, f, y)")

    def inverse_link(self, f: Tensor) -> Tensor:
        return torch.sigmoid(f)

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Success probability ``(B,)``."""
        return Bernoulli().predictive(mean, cov, link, num_samples, generator)


def resolve(likelihood: str | Likelihood, sigma_noise: float = 1.0) -> Likelihood:
    """A likelihood object: the library's names plus ``"binomial"``."""
    if likelihood == "binomial":
        return Binomial()
    return get_likelihood(likelihood, sigma_noise)


def num_latent(lik: Likelihood, y: Tensor, num_classes: int | None) -> int:
    """Latent outputs ``C`` per data point for targets ``y``."""
    if isinstance(lik, Categorical):
        return int(num_classes if num_classes is not None else int(y.max()) + 1)
    if isinstance(lik, Gaussian) and y.dim() == 2:
        return y.shape[1]
    return 1


def hessian_sqrt(lik: Likelihood, f: Tensor, y: Tensor) -> Tensor:
    r"""Differentiable square root :math:`S_n` (``(N, C, C)``, :math:`S_n S_n^\top = W_n`) of the
    NLL Hessian at ``f`` (the library's ``hessian_sqrt`` detaches; the evidence needs the
    dependence of :math:`W` on the mode)."""
    if isinstance(lik, Categorical):
        p = torch.softmax(f, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
    if isinstance(lik, Binomial):
        p = torch.sigmoid(f)
        return (p * (1 - p) * y.sum(-1, keepdim=True)).sqrt().unsqueeze(-1)
    if isinstance(lik, Bernoulli):
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt().unsqueeze(-1)
    if isinstance(lik, Poisson):
        return torch.diag_embed(torch.exp(0.5 * f))
    if isinstance(lik, Gaussian):
        return lik.hessian_sqrt(f)
    return lik.hessian_sqrt(f)


def sites(lik: Likelihood, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(S, u)`` at the latent ``f`` ``(N, C)``: Hessian square roots ``(N, C, C)`` and the
    whitened gradient of :math:`\log p` (``S u = g``), both detached."""
    f = f.detach()
    g = -lik.gradient(f, y)
    S = hessian_sqrt(lik, f, y)
    if isinstance(lik, Categorical):
        sp = torch.softmax(f, -1).sqrt()
        return S, g / sp.clamp_min(_TINY)
    if f.shape[1] == 1 or isinstance(lik, (Gaussian, Poisson)):
        d = torch.diagonal(S, dim1=-2, dim2=-1)
        return S, g / d.clamp_min(_TINY)
    return S, torch.linalg.lstsq(S, g.unsqueeze(-1)).solution.squeeze(-1)


def saturated_log_prob(lik: Likelihood, y: Tensor) -> Tensor:
    """:math:`\\sum_n \\log p(y_n | \\hat f_n)` of the saturated model (for the deviance)."""
    y = y.to(torch.float64)
    if isinstance(lik, Gaussian):
        return lik.log_prob(y.reshape(y.shape[0], -1), y).sum()
    if isinstance(lik, Poisson):
        y = y.reshape(-1)
        return (torch.special.xlogy(y, y) - y - torch.lgamma(y + 1)).sum()
    if isinstance(lik, Binomial):
        k, n = y[:, 0], y.sum(-1)
        p = k / n.clamp_min(1)
        log_comb = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        return (log_comb + torch.special.xlogy(k, p) + torch.special.xlogy(n - k, 1 - p)).sum()
    return torch.zeros((), dtype=torch.float64)  # Bernoulli, categorical: log 1
