r"""The exact GP of a linearized network, in the cheaper of data space and weight space.

For a network :math:`f(x;\theta)` with MAP weights :math:`\theta^*`, the linearization
:math:`f_{lin}(x;\theta) = f(x;\theta^*) + J(x)(\theta - \theta^*)` under the prior
:math:`\theta \sim N(\theta_0, D^{-1})` (prior mean :math:`\theta_0`, e.g. the initialization;
:math:`D = diag(\delta_{g(p)})`, one precision per parameter *group*) and Gaussian noise
:math:`\sigma^2` is the Gaussian process

.. math::
    f_{lin} \sim GP\big(f(x;\theta^*) + J(x)(\theta_0 - \theta^*),\;
    k(x, x') = J(x) D^{-1} J(x')^\top = \textstyle\sum_g J_g(x) J_g(x')^\top/\delta_g\big),

the full-GGN linearized Laplace (exact for this model). With :math:`N` targets (points x
outputs) and :math:`P` parameters, its evidence and posterior need either the ``N x N`` kernel
matrix :math:`K = J D^{-1}J^\top + \sigma^2 I` (*data space*, :math:`O(N^2 P + N^3)`; formed from
per-layer factors without the Jacobian, :math:`O(N^2\sum_l (d_{in} + d_{out}) + N^3)` for
``nn.Linear`` layers, :mod:`bayescurv.bo.ntk_factors`) or the
``P x P`` precision :math:`\Lambda = J^\top J/\sigma^2 + D` (*weight space*,
:math:`O(N P^2 + P^3)`); :class:`LinearizedGP` takes data space when :math:`N \le P`. With
:math:`\tilde r = y - f(X;\theta^*) + J(\theta^* - \theta_0)`:

.. math::
    \log p(y) = \log N(\tilde r; 0, K),\qquad
    \bar\theta = \theta_0 + D^{-1}J^\top K^{-1}\tilde r
               = \theta_0 + \Lambda^{-1}J^\top\tilde r/\sigma^2,\qquad
    \Sigma = D^{-1} - D^{-1}J^\top K^{-1} J D^{-1} = \Lambda^{-1},

and the predictive is :math:`N(f(x;\theta^*) + J(x)(\bar\theta - \theta^*),\; J(x)\Sigma
J(x)^\top)`. Hyperparameters :math:`(\delta_g, \sigma)` maximize the data-space evidence plus
a noise hyperprior (:func:`tune`) on at most ``tune_points`` points; the per-group Gram
matrices :math:`J_g J_g^\top` are formed once, so a step costs one ``N x N`` Cholesky.
The noise floor is part of the parametrization, :math:`\sigma^2 = \sigma_{min}^2 + e^{s}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor, nn

from bayescurv.bo.hyperparameters import (
    CLOSED_FORM_TOL,
    floored_noise_variance,
    gaussian_log_evidence,
    noise_start,
)
from bayescurv.bo.ntk_factors import FactoredJacobian
from bayescurv.errors import InvalidArgumentError, NumericalError
from bayescurv.laplace.marglik import maximize_lbfgs
from bayescurv.params import ParamSet

#: points per vmapped Jacobian call
JAC_CHUNK = 512
PRIOR_GRANULARITIES = ("ard", "layer", "scalar")


class Center(nn.Module):
    """``x -> scale (2x - 1)``: the unit cube of ``Normalize`` mapped to
    ``[-scale, scale]^d``, so the network (and its NTK) is centred on the search box instead of
    on one of its corners; ``scale`` sets how nonlinear the first layer is across the box."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (2 * x - 1)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def prior_groups(params: ParamSet, input_dim: int, granularity: str = "ard") -> Tensor:
    """Group index of every flat parameter (``(P,)``, values ``0 .. G-1``).

    ``"scalar"``: one group. ``"layer"``: one per parameter tensor. ``"ard"``: as ``"layer"``,
    but the first weight matrix acting on the inputs (the first 2-d parameter with ``d``
    columns, e.g. the first ``nn.Linear``) gets one group per input column — automatic
    relevance determination for networks: the evidence sets the prior scale of each input's
    weights, which is the network's analogue of an ARD lengthscale.
    """
    if granularity not in PRIOR_GRANULARITIES:
        raise InvalidArgumentError(
            f"prior_granularity must be one of {PRIOR_GRANULARITIES}, got {granularity!r}")
    device = params.device
    if granularity == "scalar":
        return torch.zeros(params.numel, dtype=torch.long, device=device)
    out, start, ard_done = [], 0, granularity != "ard"
    for p in params.params:
        if not ard_done and p.dim() == 2 and p.shape[1] == input_dim:
            cols = torch.arange(input_dim, device=device).expand(p.shape[0], input_dim)
            out.append(start + cols.reshape(-1))
            start, ard_done = start + input_dim, True
        else:
            out.append(torch.full((p.numel(),), start, dtype=torch.long, device=device))
            start += 1
    return torch.cat(out)


def jacobian(params: ParamSet, x: Tensor) -> tuple[Tensor, Tensor]:
    """``f(x)`` flattened to ``(n m,)`` and the Jacobian ``(n m, P)`` (input-major rows) at
    the current parameters, per sample with ``vmap(jacrev)``; differentiable in ``x``."""
    theta = params.vector()

    def single(t: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
        out = params.functional_call(t, xi.unsqueeze(0)).reshape(-1)
        return out, out

    jac = torch.func.vmap(torch.func.jacrev(single, has_aux=True), in_dims=(None, 0))
    fs, Js = [], []
    for chunk in x.split(JAC_CHUNK):
        J, f = jac(theta, chunk)
        fs.append(f)
        Js.append(J)
    f, J = torch.cat(fs), torch.cat(Js)
    return f.reshape(-1), J.reshape(-1, params.numel)


@dataclass
class Hyper:
    """Tuned hyperparameters: per-group prior precisions, noise std, MAP-II objective."""

    prior_precision: Tensor
    sigma_noise: Tensor
    objective: float


def tune(
    grams: Tensor, r: Tensor, *, init_precision: Tensor | None = None,
    init_sigma: float = 0.1, min_noise: float = 1e-3, fixed_noise: float | None = None,
    noise_prior: Any = None, max_iter: int = 100,
) -> Hyper:
    r"""Maximize :math:`\log N(\tilde r; 0, \sum_g K_g/\delta_g + \sigma^2 I) + \log p(\sigma^2)`
    over :math:`\log\delta_g` and :math:`s` with :math:`\sigma^2 = \sigma_{min}^2 + e^s` (the
    floor holds during tuning) by L-BFGS (:func:`~bayescurv.laplace.marglik.maximize_lbfgs`,
    the loop of every evidence tuner); the best iterate is returned. ``init_precision``
    defaults to the data-driven :math:`\delta_g = G\,tr(K_g)/N` (every group explains an equal
    share of a unit prior variance). ``fixed_noise`` holds :math:`\sigma` fixed."""
    G, n, _ = grams.shape
    eye = torch.eye(n, dtype=grams.dtype, device=grams.device)
    if init_precision is None:
        tr = grams.diagonal(dim1=-2, dim2=-1).sum(-1)
        init_precision = torch.where(tr > 0, G * tr / n, torch.ones_like(tr))
    floor = min_noise**2
    s0 = noise_start(init_sigma, floor)
    z = torch.cat([init_precision.detach().log().reshape(-1).expand(G),
                   grams.new_tensor([s0])]).clone().requires_grad_(True)

    def unpack(z: Tensor) -> tuple[Tensor, Tensor]:
        delta = z[:G].clamp(-23.0, 23.0).exp()
        s2 = (grams.new_tensor(fixed_noise**2) if fixed_noise is not None
              else floored_noise_variance(z[G], floor))
        return delta, s2

    def objective(z: Tensor) -> Tensor:
        delta, s2 = unpack(z)
        K = torch.einsum("g,gij->ij", 1 / delta, grams) + s2 * eye
        value = gaussian_log_evidence(r, K)
        if noise_prior is not None and fixed_noise is None:
            value = value + noise_prior.log_prob(s2).sum()
        return value

    value, _, _ = maximize_lbfgs(lambda: objective(z), [z], max_iter, tol=CLOSED_FORM_TOL,
                                 keep_best=True)
    if not math.isfinite(value):
        raise NumericalError("the linearized evidence is not finite at any iterate (singular "
                             "kernel matrix); raise min_noise")
    delta, s2 = unpack(z.detach())
    return Hyper(delta, s2.sqrt(), value)


class LinearizedGP:
    r"""The posterior of the linearized network (module docstring) for fixed hyperparameters.

    Args:
        params: the posterior's parameters (at :math:`\theta^*`).
        theta0: prior mean :math:`\theta_0` (``(P,)``).
        groups: group of every parameter (:func:`prior_groups`).
        prior_precision: :math:`\delta_g` (``(G,)``).
        sigma_noise: :math:`\sigma`.
        X, Y: training data (``n x d``, ``n x m``; the network's input space).
        space: ``"auto"`` (data space when ``n m <= P``), ``"data"`` or ``"weight"``.
    """

    def __init__(self, params: ParamSet, theta0: Tensor, groups: Tensor,
                 prior_precision: Tensor, sigma_noise: Tensor, X: Tensor, Y: Tensor,
                 space: str = "auto") -> None:
        if space not in ("auto", "data", "weight"):
            raise InvalidArgumentError(f"space must be 'auto', 'data' or 'weight', got {space!r}")
        self.params = params
        self.theta_star = params.vector()
        self.theta0 = theta0
        self.prior_precision = prior_precision
        self.sigma_noise = torch.as_tensor(sigma_noise).reshape(()).to(theta0)
        self.num_outputs = Y.shape[-1]
        P, N = params.numel, Y.numel()
        self.space = ("data" if N <= P else "weight") if space == "auto" else space
        self.dinv = 1 / prior_precision[groups]  # (P,)
        s2 = self.sigma_noise**2
        shift = self.theta_star - theta0
        with torch.no_grad():
            if self.space == "data":  # per-layer factors, no N x P Jacobian
                self.factored = FactoredJacobian(params, groups, X)
                self.train_factors = F = self.factored.factors(X)
                r = (Y.reshape(-1) - F.f) + self.factored.jvp(F, shift)
                K = self.factored.kernel(F, F, prior_precision)
                K = K + s2 * torch.eye(N, dtype=K.dtype, device=K.device)
                self.L = L = psd_safe_cholesky(K)  # Σ = D⁻¹ − D⁻¹JᵀK⁻¹JD⁻¹
                a = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
                alpha = torch.linalg.solve_triangular(L.T, a, upper=True).squeeze(-1)
                self.theta_bar = theta0 + self.dinv * self.factored.vjp(F, alpha)
                self.log_evidence = -0.5 * (a.square().sum() + 2 * L.diagonal().log().sum()
                                            + N * math.log(2 * math.pi))
            else:
                G = torch.zeros(P, P, dtype=theta0.dtype, device=theta0.device)
                Jr = torch.zeros_like(theta0)
                rr = theta0.new_zeros(())
                for xb, yb in zip(X.split(JAC_CHUNK), Y.split(JAC_CHUNK)):
                    f, J = jacobian(params, xb)
                    r = (yb.reshape(-1) - f) + J @ shift
                    G += J.T @ J
                    Jr += J.T @ r
                    rr += r.square().sum()
                lam = G / s2 + torch.diag(1 / self.dinv)
                L = psd_safe_cholesky(lam)
                c = torch.linalg.solve_triangular(L, (Jr / s2).unsqueeze(-1), upper=False)
                self.theta_bar = theta0 + torch.linalg.solve_triangular(
                    L.T, c, upper=True).squeeze(-1)
                self.C = L  # Σ = Λ⁻¹ = L⁻ᵀL⁻¹
                logdet_k = (2 * L.diagonal().log().sum() + N * s2.log()
                            + torch.log(self.dinv).sum())
                quad = rr / s2 - c.square().sum()
                self.log_evidence = -0.5 * (quad + logdet_k + N * math.log(2 * math.pi))

    def moments(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(T, q, m)`` and joint covariance ``(T, q m, q m)`` of the ``q`` points of
        every t-batch of ``X`` (``(T, q, *input_shape)``, e.g. ``(T, q, d)``); t-batches are
        independent. Differentiable in ``X``."""
        T, q = X.shape[:2]
        pts = X.reshape(T * q, *X.shape[2:])
        m = self.num_outputs
        if self.space == "data":
            F = self.factored.factors(pts)
            mean = F.f + self.factored.jvp(F, self.theta_bar - self.theta_star)
            k_train = self.factored.kernel(self.train_factors, F, self.prior_precision)
            W = torch.linalg.solve_triangular(self.L, k_train, upper=False)  # (N, Tqm)
            Wb = W.T.reshape(T, q * m, -1)
            Fb = F.batched(T)
            cov = (self.factored.kernel(Fb, Fb, self.prior_precision)
                   - Wb @ Wb.transpose(-1, -2))
        else:
            f, J = jacobian(self.params, pts)  # (Tqm,), (Tqm, P)
            mean = f + J @ (self.theta_bar - self.theta_star)
            W = torch.linalg.solve_triangular(self.C, J.T, upper=False)  # (P, Tqm)
            Wb = W.T.reshape(T, q * m, -1)
            cov = Wb @ Wb.transpose(-1, -2)
        return mean.reshape(T, q, m), cov
