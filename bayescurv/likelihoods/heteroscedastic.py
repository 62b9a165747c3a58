r"""Heteroscedastic Gaussian regression: the network predicts its own noise per input.

**Natural parametrization** (``"heteroscedastic"``; Immer, Palumbo, Marx & Rätsch,
"Effective Bayesian heteroscedastic regression with deep neural networks", NeurIPS 2023).
The network outputs ``f = (η₁, η₂)`` of shape ``(B, 2D)`` (the first ``D`` columns ``η₁``,
the last ``D`` columns ``η₂ < 0``) with

.. math:: \eta_1 = \mu/\sigma^2, \quad \eta_2 = -1/(2\sigma^2), \qquad
          \mu = -\eta_1/(2\eta_2), \quad \sigma^2 = -1/(2\eta_2).

The Gaussian is an exponential family in ``η`` with sufficient statistics ``T(y) = (y, y²)``
and log partition :math:`A(\eta) = -\eta_1^2/(4\eta_2) - \tfrac12\log(-2\eta_2)`, so

.. math:: -\log p(y|\eta) = A(\eta) - \eta^\top T(y) + \tfrac12\log 2\pi, \qquad
          \nabla^2_\eta[-\log p] = \nabla^2 A(\eta) = \mathrm{Cov}[T(y)]

does not depend on ``y`` and is positive (semi-)definite: the GGN equals the Fisher and is PSD
by construction. Per output,
:math:`\mathrm{Cov}[T] = \begin{pmatrix}\sigma^2 & 2\mu\sigma^2\\ 2\mu\sigma^2 &
2\sigma^4 + 4\mu^2\sigma^2\end{pmatrix}` with the exact Cholesky square root
:math:`\begin{pmatrix}\sigma & 0\\ 2\mu\sigma & \sqrt2\sigma^2\end{pmatrix}`.
A network keeps ``η₂ < 0`` with :class:`NaturalHead` as its last module (a parameter-free
map ``(u, v) ↦ (u, -softplus(v)/2)``; being part of the network, the GGN linearizes through it).

**Mean and log-variance** (``"heteroscedastic-meanvar"``): outputs ``(μ, s = log σ²)``. Its
Hessian in ``(μ, s)`` is not PSD away from the optimum, so the curvature is the Fisher
:math:`\mathrm{diag}(e^{-s}, 1/2)` (the expected Hessian; ``kind="ggn"`` uses it).

Predictive (both): with ``f ~ N(m, Σ)`` from the linearized posterior, the mean
``μ(f)`` is linearized once more (the delta method, ``link="delta"``), giving

- epistemic variance :math:`\nabla\mu^\top\Sigma\nabla\mu` (the posterior's),
- aleatoric variance :math:`\sigma^2(m)` (the network's noise at the MAP),

returned as ``(mean, epistemic, aleatoric)``, each ``(B, D)``; the predictive variance is
their sum. ``link="mc"`` samples ``f`` instead: epistemic ``Var[μ(f)]``, aleatoric
``E[σ²(f)]`` (law of total variance; natural draws with ``η₂ ≥ 0`` are dropped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods.base import Likelihood, register

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class NaturalHead(nn.Module):
    """``(B, 2D) ↦ (η₁, η₂) = (u, -g(v)/2 - eps)`` with ``g`` = ``softplus`` (default) or
    ``exp`` (``positive=``): a network ending in this module outputs valid natural
    parameters (``η₂ < 0``) for :class:`Heteroscedastic`."""

    def __init__(self, eps: float = 1e-6, positive: str = "softplus") -> None:
        super().__init__()
        if positive not in ("softplus", "exp"):
            raise InvalidArgumentError(f"positive must be 'softplus' or 'exp', got {positive!r}")
        self.eps, self.positive = eps, positive

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2:
            raise ShapeError(f"NaturalHead needs an even number of outputs; got {x.shape[-1]}")
        u, v = x.chunk(2, dim=-1)
        g = F.softplus(v) if self.positive == "softplus" else v.exp()
        return torch.cat([u, -0.5 * g - self.eps], dim=-1)


class _TwoHeaded(Likelihood):
    """Shared checks of the two parametrizations: outputs ``(B, 2D)``, targets ``(B, D)``."""

    links = ("delta", "mc")

    def check_outputs(self, f: Tensor) -> Tensor:
        f = super().check_outputs(f)
        if f.shape[-1] % 2:
            raise ShapeError(
                f"the {self.name} likelihood needs 2D outputs per input (D means and D "
                f"variance parameters); the network has {f.shape[-1]}")
        return f

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        d = f.shape[-1] // 2
        if not torch.is_tensor(y):
            y = torch.as_tensor(y)
        if y.dim() == 1:
            y = y.unsqueeze(-1)
        if y.shape != (f.shape[0], d):
            raise ShapeError(
                f"{self.name} targets of shape {tuple(y.shape)} do not fit network outputs "
                f"{tuple(f.shape)}: targets must be (batch, {d}) for {2 * d} outputs")
        self.mean_var(f)  # validates the variance parameters
        return f, y.to(f.dtype)

    def mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, σ²)`` ``(B, D)`` of outputs ``f``."""
        raise NotImplementedError

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        mu, var = self.mean_var(f)
        return (-0.5 * (y - mu).square() / var - 0.5 * var.log() - _HALF_LOG_2PI).sum(-1)

    def sample(self, f, num_samples, generator):
        mu, var = self.mean_var(f)
        eps = torch.randn((num_samples, *mu.shape), generator=generator, device=f.device,
                          dtype=f.dtype)
        return mu + var.sqrt() * eps

    def inverse_link(self, f: Tensor) -> Tensor:
        return self.mean_var(f)[0]

    def mean_jacobian(self, f: Tensor) -> Tensor:
        r""":math:`\partial\mu_d/\partial f` per output: ``(B, D, 2)`` (w.r.t. the pair
        ``(f_d, f_{D+d})``); ``(1, 0)`` where the first half of the outputs is the mean."""
        mu = f.chunk(2, dim=-1)[0]
        return torch.stack([torch.ones_like(mu), torch.zeros_like(mu)], -1)

    def predictive(self, mean, cov, link="delta", num_samples=100, generator=None):
        """``(mean, epistemic variance, aleatoric variance)``, each ``(B, D)``."""
        self.check_link(link)
        mean = self.check_outputs(mean)
        d = mean.shape[-1] // 2
        if cov.dim() == 2:
            cov = torch.diag_embed(cov)
        if link == "delta":
            mu, var = self.mean_var(mean)
            g = self.mean_jacobian(mean)  # (B, D, 2)
            idx = torch.arange(d, device=mean.device)
            s11 = cov[:, idx, idx]
            s22 = cov[:, idx + d, idx + d]
            s12 = cov[:, idx, idx + d]
            epi = g[..., 0] ** 2 * s11 + 2 * g[..., 0] * g[..., 1] * s12 + g[..., 1] ** 2 * s22
            return mu, epi, var
        from bayescurv.links import psd_sqrt

        z = torch.randn((num_samples, *mean.shape), generator=generator, device=mean.device,
                        dtype=mean.dtype)
        f = mean + torch.einsum("bij,sbj->sbi", psd_sqrt(cov), z)
        return self.predictive_from_samples(f)

    def predictive_from_samples(self, f: Tensor):
        """Law of total variance over output samples ``(S, B, 2D)``: ``(E[μ], Var[μ],
        E[σ²])``; draws outside the domain (natural ``η₂ ≥ 0``) are dropped."""
        mu, var = self._sample_mean_var(f)
        ok = torch.isfinite(var) & (var > 0)
        w = ok.to(f.dtype)
        n = w.sum(0).clamp_min(1)
        mu, var = torch.where(ok, mu, 0), torch.where(ok, var, 0)
        m = (w * mu).sum(0) / n
        epi = (w * (mu - m).square()).sum(0) / n
        return m, epi, (w * var).sum(0) / n

    def _sample_mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean_var(f)


class Heteroscedastic(_TwoHeaded):
    r"""Gaussian with per-input mean and variance, natural parameters ``(η₁, η₂)``: the loss
    Hessian is the log-partition Hessian :math:`\mathrm{Cov}[(y, y^2)]` (PSD, ``y``-free);
    see the module docstring."""

    name = "heteroscedastic"
    aliases = ("heteroscedastic-natural",)

    def mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        eta1, eta2 = self.check_outputs(f).chunk(2, dim=-1)
        if not bool((eta2 < 0).all()):
            raise InvalidArgumentError(
                "the heteroscedastic likelihood needs η₂ < 0 (the second half of the "
                "outputs); end the network with bayescurv.likelihoods.NaturalHead")
        return -eta1 / (2 * eta2), -0.5 / eta2

    def _sample_mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        eta1, eta2 = f.chunk(2, dim=-1)
        bad = eta2 >= 0
        eta2 = torch.where(bad, -1.0, eta2)
        var = torch.where(bad, float("nan"), -0.5 / eta2)
        return -eta1 / (2 * eta2), var

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        eta1, eta2 = f.chunk(2, dim=-1)
        a = -eta1.square() / (4 * eta2) - 0.5 * torch.log(-2 * eta2)
        return (eta1 * y + eta2 * y.square() - a - _HALF_LOG_2PI).sum(-1)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``∇A(η) − T(y) = (μ − y, μ² + σ² − y²)``."""
        f, y = self.check(f, y)
        mu, var = self.mean_var(f)
        return torch.cat([mu - y, mu.square() + var - y.square()], dim=-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        f = self.check_outputs(f).detach()
        mu, var = self.mean_var(f)
        sd = var.sqrt()
        top = torch.cat([torch.diag_embed(sd), torch.zeros_like(torch.diag_embed(sd))], -1)
        bottom = torch.cat([torch.diag_embed(2 * mu * sd), torch.diag_embed(math.sqrt(2) * var)],
                           -1)
        return torch.cat([top, bottom], -2)

    def mean_jacobian(self, f: Tensor) -> Tensor:
        eta1, eta2 = f.chunk(2, dim=-1)
        return torch.stack([-0.5 / eta2, 0.5 * eta1 / eta2.square()], -1)


class HeteroscedasticMeanVar(_TwoHeaded):
    r"""Gaussian with outputs ``(μ, s = log σ²)``; curvature: the Fisher
    :math:`\mathrm{diag}(e^{-s}, 1/2)` (the Hessian in these coordinates is not PSD)."""

    name = "heteroscedastic-meanvar"

    def mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        mu, s = self.check_outputs(f).chunk(2, dim=-1)
        return mu, s.exp()

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        mu, var = self.mean_var(f)
        return torch.cat([(mu - y) / var, 0.5 - 0.5 * (y - mu).square() / var], dim=-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        f = self.check_outputs(f).detach()
        _, var = self.mean_var(f)
        return torch.diag_embed(torch.cat([var.rsqrt(), torch.full_like(var, 0.5**0.5)], -1))


class StudentT(_TwoHeaded):
    r"""Robust regression: location–scale Student-t with ``df`` degrees of freedom (fixed),
    outputs ``(μ, s = log σ)`` ``(B, 2D)``. The curvature is the Fisher, diagonal in these
    coordinates: :math:`\mathrm{diag}\big(\tfrac{\nu+1}{(\nu+3)\sigma^2},
    \tfrac{2\nu}{\nu+3}\big)`. The aleatoric variance of the predictive is that of the
    t distribution, :math:`\sigma^2\nu/(\nu-2)` (infinite for :math:`\nu \le 2`)."""

    name = "student-t"

    def __init__(self, df: float = 4.0) -> None:
        if not math.isfinite(df) or df <= 0:
            raise InvalidArgumentError(f"df must be finite and positive, got {df}")
        self.df = float(df)

    def _loc_scale(self, f: Tensor) -> tuple[Tensor, Tensor]:
        mu, s = self.check_outputs(f).chunk(2, dim=-1)
        return mu, s.exp()

    def mean_var(self, f: Tensor) -> tuple[Tensor, Tensor]:
        mu, sigma = self._loc_scale(f)
        nu = self.df
        factor = nu / (nu - 2) if nu > 2 else math.inf
        return mu, sigma.square() * factor

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        mu, sigma = self._loc_scale(f)
        nu = self.df
        z = (y - mu) / sigma
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return (const - sigma.log() - 0.5 * (nu + 1) * torch.log1p(z.square() / nu)).sum(-1)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        mu, sigma = self._loc_scale(f)
        nu = self.df
        z = (y - mu) / sigma
        w = (nu + 1) / (nu + z.square())
        return torch.cat([-w * z / sigma, 1 - w * z.square()], dim=-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        mu, sigma = self._loc_scale(f.detach())
        nu = self.df
        loc = math.sqrt((nu + 1) / (nu + 3)) / sigma
        return torch.diag_embed(torch.cat([loc, torch.full_like(loc, math.sqrt(2 * nu / (nu + 3)))],
                                          -1))

    def sample(self, f, num_samples, generator):
        """``μ + σ z/√(g/ν)``, ``z ~ N(0, 1)``, ``g ~ χ²_ν``; the χ² draw runs on the global
        generator re-seeded from ``generator`` (torch's gamma sampler takes none)."""
        mu, sigma = self._loc_scale(f)
        shape = (num_samples, *mu.shape)
        z = torch.randn(shape, generator=generator, device=f.device, dtype=f.dtype)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=f.device))
        devices = [f.device] if f.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            g = torch.distributions.Chi2(torch.tensor(self.df, dtype=f.dtype,
                                                      device=f.device)).sample(shape)
        return mu + sigma * z / (g / self.df).sqrt()


register(Heteroscedastic, HeteroscedasticMeanVar, StudentT)

__all__ = ["Heteroscedastic", "HeteroscedasticMeanVar", "StudentT", "NaturalHead"]
