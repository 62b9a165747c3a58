r"""One fit of the surrogate's posterior: MAP training, curvature and MAP-II tuning.

:class:`~bayescurv.bo.LaplaceModel` calls these for every candidate network, and again, warm
started, when it is conditioned on real data. Three routes:

- :func:`fit_laplace`: MAP training (:func:`~bayescurv.bo.training.train_map`), a
  :class:`~bayescurv.Laplace` fit of the requested structure and MAP-II tuning of prior
  precision and noise (:func:`~bayescurv.bo.hyperparameters.tune_hyperparameters`), with the
  linearized model's evidence and posterior mean (:class:`~bayescurv.laplace.glm.GaussianGLM`)
  for ``evidence="linearized"``;
- :func:`prepare_ntk` and :func:`fit_ntk` (``structure="ntk"``): alternating MAP training
  towards the prior mean and evidence tuning on the data-space kernel, then the exact
  linearized GP (:class:`~bayescurv.bo.ntk.LinearizedGP`);
- :func:`fit_ard_network`: the default Fourier network with ARD lengthscales fitted by the
  evidence (:func:`~bayescurv.bo.ard.fit_lengthscales`).

``cfg`` is the model's configuration dictionary (the keyword arguments of ``LaplaceModel``
after defaults are resolved).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.bo.ard import ARDFit, fit_lengthscales
from bayescurv.bo.features import fourier_network
from bayescurv.bo.hyperparameters import noise_log_prior, tune_hyperparameters
from bayescurv.bo.ntk import Center, LinearizedGP, prior_groups, tune
from bayescurv.bo.ntk_factors import FactoredJacobian
from bayescurv.bo.training import train_map
from bayescurv.laplace import Laplace
from bayescurv.laplace.glm import GaussianGLM
from bayescurv.params import select

#: points per batch of the Laplace fit
FIT_CHUNK = 2048


@dataclass
class PosteriorFit:
    """A fitted posterior: ``la`` (with ``glm`` and its mean ``theta_bar`` for
    ``evidence="linearized"``) or, for ``structure="ntk"``, ``gp``; the MAP-II objective and
    the final MAP training loss (NaN when there was no training)."""

    objective: float
    train_loss: float
    la: Laplace | None = None
    glm: GaussianGLM | None = None
    theta_bar: Tensor | None = None
    gp: LinearizedGP | None = None


@dataclass
class NTKState:
    r"""What the ``"ntk"`` fits of one network share: the prior mean :math:`\theta_0`, the
    prior group of every parameter (:func:`~bayescurv.bo.ntk.prior_groups`) and the input
    scale of :class:`~bayescurv.bo.ntk.Center` (0: no centring)."""

    theta0: Tensor
    groups: Tensor
    num_groups: int
    center: float = 0.0


def fixed_noise(cfg: dict[str, Any]) -> float | None:
    """The fixed noise std of ``noise=<float>``, else ``None``."""
    mode = cfg["noise"]
    return float(mode) if isinstance(mode, (int, float)) else None


def fit_laplace(
    net: nn.Module, X: Tensor, Y: Tensor, cfg: dict[str, Any], *, steps: int,
    prior_precision, sigma_noise, noise_prior, generator: torch.Generator,
    marglik_steps: int | None = None,
) -> PosteriorFit:
    """MAP training (``steps`` Adam steps from the current weights of ``net``, in place),
    Laplace fit and marginal-likelihood tuning of prior precision and noise; the objective is
    the MAP-II one (log evidence + log noise prior)."""
    n = X.shape[0]
    prior = torch.as_tensor(prior_precision, dtype=X.dtype, device=X.device)
    sigma = torch.as_tensor(sigma_noise, dtype=X.dtype, device=X.device).reshape(())
    wd = float((sigma**2 * prior.mean()).item()) / n
    train_loss = math.nan
    if cfg.get("train", True):
        train_loss = train_map(
            net, X, Y, wd, steps=steps, lr=cfg["lr"], batch_size=cfg["batch_size"],
            patience=cfg["patience"], generator=generator,
        )
    mode = cfg["noise"]
    if mode == "residual":  # sigma^2 = training MSE (floored): the MAP fit's own noise level
        with torch.no_grad():
            mse = (net(X) - Y).square().mean()
        sigma = mse.clamp_min(cfg["min_noise"] ** 2).sqrt()
    elif mode != "marglik":
        sigma = torch.as_tensor(float(mode), dtype=X.dtype, device=X.device)
    la = Laplace(net, "regression", subset=cfg["subset"], structure=cfg["structure"],
                 prior_precision=prior, sigma_noise=sigma)
    data = [(X[i:i + FIT_CHUNK], Y[i:i + FIT_CHUNK]) for i in range(0, n, FIT_CHUNK)]
    la.fit(data, progress=False)
    glm = GaussianGLM(la, data) if cfg["evidence"] == "linearized" else None
    evidence = la.log_marginal_likelihood if glm is None else glm.log_marginal_likelihood
    steps_ml = cfg["marglik_steps"] if marglik_steps is None else marglik_steps
    tune_sigma = mode == "marglik"
    if steps_ml > 0:
        tune_hyperparameters(la, cfg["prior_granularity"], steps_ml, tune_sigma=tune_sigma,
                             noise_prior=noise_prior, evidence=evidence,
                             min_noise=cfg["min_noise"])
    with torch.no_grad():
        objective = evidence(la.prior_precision, la.sigma_noise)
        if tune_sigma:
            objective = objective + noise_log_prior(noise_prior, la.sigma_noise)
    theta_bar = None if glm is None else glm.posterior_mean().detach()
    return PosteriorFit(float(objective), train_loss, la=la, glm=glm, theta_bar=theta_bar)


def prepare_ntk(net: nn.Module, input_dim: int, cfg: dict[str, Any],
                center: float | None = None) -> tuple[nn.Module, NTKState]:
    """The network as the ``"ntk"`` posterior sees it (behind :class:`~bayescurv.bo.ntk.Center`
    of scale ``center``, default ``cfg["center"]``, when it is nonzero) and its prior mean and
    groups."""
    scale = float(cfg["center"] if center is None else center)
    if scale:
        net = nn.Sequential(Center(scale), net)
    ps = select(net, "all")
    theta0 = ps.vector() if cfg["prior_mean"] == "init" else torch.zeros(ps.numel).to(
        ps.vector())
    groups = prior_groups(ps, input_dim, cfg["prior_granularity"])
    return net, NTKState(theta0, groups, int(groups.max()) + 1, scale)


def ntk_evidence(
    net: nn.Module, X: Tensor, Y: Tensor, cfg: dict[str, Any], state: NTKState, *,
    delta: Tensor | None, sigma: float, fixed: float | None, noise_prior,
    generator: torch.Generator, max_iter: int,
) -> tuple[Tensor, float, float]:
    r"""Tune :math:`(\delta_g, \sigma)` on the evidence of the linearized GP of ``net`` at its
    current weights (on at most ``cfg["tune_points"]`` random points): the per-group Gram
    matrices from per-layer factors (:class:`~bayescurv.bo.ntk_factors.FactoredJacobian`, no
    ``N x P`` Jacobian), L-BFGS (:func:`~bayescurv.bo.ntk.tune`). Returns the precisions, the
    noise std and the MAP-II objective."""
    n = X.shape[0]
    ps = select(net, "all")
    if n > cfg["tune_points"]:
        idx = torch.randperm(n, generator=generator)[:cfg["tune_points"]].to(X.device)
        X, Y = X[idx], Y[idx]
    with torch.no_grad():
        jac = FactoredJacobian(ps, state.groups, X)
        F = jac.factors(X)
        res = Y.reshape(-1) - F.f + jac.jvp(F, ps.vector() - state.theta0)
        grams = jac.grams(F, state.num_groups)
    hyper = tune(grams, res, init_precision=delta, init_sigma=sigma, min_noise=cfg["min_noise"],
                 fixed_noise=fixed, noise_prior=noise_prior, max_iter=max_iter)
    return hyper.prior_precision, hyper.sigma_noise.item(), hyper.objective


def select_center(
    net: nn.Module, X: Tensor, Y: Tensor, cfg: dict[str, Any], scales: tuple[float, ...], *,
    sigma: float, noise_prior, generator: torch.Generator, max_iter: int,
) -> tuple[nn.Module, NTKState]:
    r"""The input scale :math:`c` of :class:`~bayescurv.bo.ntk.Center` among ``scales`` whose
    NTK GP *at the initialization* has the best tuned evidence (model selection by the
    evidence before any training: one set of factors and one tuning per candidate).

    :math:`c` plays the part of an inverse lengthscale: it sets how nonlinear the first layer
    is across the box (with PyTorch's default initialization a tanh MLP on ``[-1, 1]^d`` is
    nearly linear, and its NTK nearly a linear kernel). Returns the wrapped network and its
    state (``state.center`` is the chosen scale)."""
    fixed = fixed_noise(cfg)
    prior_ = noise_prior if cfg["noise"] == "marglik" else None
    best: tuple[float, nn.Module, NTKState] | None = None
    for scale in scales:
        cand, state = prepare_ntk(copy.deepcopy(net), X.shape[-1], cfg, center=scale)
        _, _, objective = ntk_evidence(cand, X, Y, cfg, state, delta=None, sigma=sigma,
                                       fixed=fixed, noise_prior=prior_, generator=generator,
                                       max_iter=max_iter)
        if best is None or objective > best[0]:
            best = (objective, cand, state)
    assert best is not None
    return best[1], best[2]


def fit_ntk(
    net: nn.Module, X: Tensor, Y: Tensor, cfg: dict[str, Any], state: NTKState, *,
    steps: int, delta: Tensor, sigma: float, rounds: int, warm: bool, noise_prior,
    generator: torch.Generator, tune_iter: int = 100,
) -> PosteriorFit:
    r"""``rounds`` x (MAP training of ``net`` in place toward :math:`\theta_0` with the
    per-group weight decay :math:`\sigma^2\delta_g/N`, then the evidence on at most
    ``tune_points`` points), then the linearized GP on all data. The first round's tuning
    starts at the data-driven precisions unless ``warm``. ``noise_prior`` applies to
    ``noise="marglik"`` only. ``tune_iter=0`` keeps ``delta`` and ``sigma`` (conditioning, as
    BoTorch conditions a GP at fixed hyperparameters)."""
    n = X.shape[0]
    ps = select(net, "all")
    theta0, groups = state.theta0, state.groups
    anchor = ps.unflatten(theta0)
    mode = cfg["noise"]
    fixed = fixed_noise(cfg)
    prior_ = noise_prior if mode == "marglik" else None
    train_loss = objective = math.nan

    def evidence_fit(delta: Tensor | None, sigma: float, fixed: float | None):
        return ntk_evidence(net, X, Y, cfg, state, delta=delta, sigma=sigma, fixed=fixed,
                            noise_prior=prior_, generator=generator, max_iter=tune_iter)

    train = cfg["train"] and steps > 0
    start: Tensor | None = delta if warm else None
    if train and not warm and cfg["prior_first"] and mode != "residual":
        # the evidence of the NTK GP at θ₀ chooses the prior the MAP is trained under
        delta, sigma, objective = evidence_fit(None, sigma, fixed)
        start = delta
    for _ in range(max(rounds, 1) if train else 1):
        if train:
            wd = ps.unflatten(sigma**2 * delta[groups] / n)
            train_loss = train_map(
                net, X, Y, wd, anchor=anchor, steps=steps, lr=cfg["lr"],
                batch_size=cfg["batch_size"], patience=cfg["patience"], generator=generator)
        if mode == "residual":
            with torch.no_grad():
                mse = (net(X) - Y).square().mean().item()
            fixed = math.sqrt(max(mse, cfg["min_noise"] ** 2))
        if fixed is not None:
            sigma = fixed
        if tune_iter > 0:
            delta, sigma, objective = evidence_fit(start, sigma, fixed)
        start = delta
        steps = steps if warm else max(steps // 2, 1)  # later rounds start from θ*
    gp = LinearizedGP(ps, theta0, groups, delta, torch.tensor(sigma), X, Y)
    if n > cfg["tune_points"] or tune_iter == 0:  # the evidence of all data at these values
        objective = float(gp.log_evidence) + (
            0.0 if prior_ is None else float(noise_log_prior(prior_, gp.sigma_noise)))
    return PosteriorFit(objective, train_loss, gp=gp)


def fit_ard_network(
    X: Tensor, Y: Tensor, cfg: dict[str, Any], *, num_features: int, seed: int | None,
    max_points: int, noise_prior, generator: torch.Generator,
) -> tuple[nn.Module, ARDFit]:
    """The default Fourier network with ARD lengthscales fitted by the evidence on (at most
    ``max_points`` of) the training data, and the fit (its prior precision and noise are the
    initial values for the Laplace fit)."""
    if X.shape[0] > max_points:
        idx = torch.randperm(X.shape[0], generator=generator)[:max_points]
        X, Y = X[idx.to(X.device)], Y[idx.to(X.device)]
    net = fourier_network(X.shape[-1], Y.shape[-1], num_features, 1.0, seed).to(X)
    fit = fit_lengthscales(net[0], X, Y, noise_prior=noise_prior,
                           min_noise=cfg["min_noise"], fixed_noise=fixed_noise(cfg))
    net[0].set_lengthscale(fit.lengthscale)
    return net, fit
