r"""A BoTorch surrogate whose posterior is the linearized-Laplace GP of a neural network.

After MAP training and a Laplace fit, the network linearized at :math:`\theta^*`,
:math:`f_{lin}(x) = f(x;\theta^*) + J(x)(\theta - \theta^*)` with
:math:`\theta \sim N(\theta^*, \Sigma)`, is a Gaussian process with mean
:math:`f(x;\theta^*)` and kernel :math:`k(x, x') = J(x)\,\Sigma\,J(x')^\top` (the empirical NTK
under the posterior covariance). :class:`LaplaceModel` exposes that GP to BoTorch: the joint
covariance over the ``q`` points of each t-batch, observation noise, transforms, gradients in
``X`` and fantasies. How it is fitted lives in :mod:`bayescurv.bo.fitting`.

Conditioning has two routes:

- **real data** (``condition_on_observations`` with plain ``n' x d`` / ``n' x m`` tensors): the
  MAP network is refined from its current weights on old + new data (a short Adam run) and the
  curvature is refit, with the prior precision and noise warm-started — a new
  :class:`LaplaceModel`, no retraining from scratch;
- **fantasies** (``fantasize``, or batched / differentiable observations): the exact Bayesian
  update of the *linearized* model, a
  :class:`~bayescurv.bo.conditioned.ConditionedLaplaceModel` (GP conditioning with the kernel
  above; cheap, batched over fantasy samples, differentiable in ``X'``).

The helpers that lived here before the module was split (``default_network``, ``train_map``,
``tune_hyperparameters``, ``noise_log_prior``, ``default_noise_prior``) are re-exported.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from botorch import settings
from botorch.exceptions.errors import BotorchTensorDimensionError, InputDataError
from botorch.models.model import FantasizeMixin, Model
from botorch.models.transforms.input import InputTransform, Normalize
from botorch.models.transforms.outcome import OutcomeTransform, Standardize
from botorch.models.utils import fantasize as fantasize_flag
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.sampling.base import MCSampler
from torch import Tensor, nn

from bayescurv.bo.ard import ARDFit
from bayescurv.bo.base import LinearizedModelMixin
from bayescurv.bo.checks import (
    check_center,
    check_embedding,
    check_inputs,
    check_options,
    check_training_data,
)
from bayescurv.bo.conditioned import ConditionedLaplaceModel
from bayescurv.bo.features import fourier_network
from bayescurv.bo.fitting import (
    NTKState,
    PosteriorFit,
    fit_ard_network,
    fit_laplace,
    fit_ntk,
    prepare_ntk,
    select_center,
)
from bayescurv.bo.hyperparameters import (
    default_noise_prior,
    noise_log_prior,
    resolve_noise_prior,
    tune_hyperparameters,
)
from bayescurv.bo.networks import LENGTHSCALES, NetworkSpec, default_network, make_network
from bayescurv.bo.training import train_map
from bayescurv.errors import InvalidArgumentError

__all__ = ["LaplaceModel", "ConditionedLaplaceModel", "LENGTHSCALES", "NetworkSpec",
           "default_network", "default_noise_prior", "noise_log_prior", "train_map",
           "tune_hyperparameters"]


class LaplaceModel(LinearizedModelMixin, Model, FantasizeMixin):
    r"""Linearized-Laplace neural network as a BoTorch model.

    Args:
        train_X: ``n x d`` training inputs.
        train_Y: ``n x m`` training targets (explicit output dimension).
        network: an ``nn.Module`` (copied, then trained), a factory ``(d, m) -> nn.Module``, a
            list of these (each is fitted; the one with the best tuned MAP-II objective is
            kept: model selection by the evidence), or ``None``: with ``hidden=None`` a
            Fourier-feature network :func:`~bayescurv.bo.features.fourier_network`
            (``num_features``; inputs assumed in about the unit cube, e.g. after
            ``Normalize``) whose lengthscales are set by ``lengthscales``; with ``hidden`` the
            MLP :func:`~bayescurv.bo.networks.default_network` (``hidden``, ``activation``).
            Measured (docs/bo.md, 10 seeds, 100 evaluations): the MLP (with its default
            Fourier ``embedding`` and SiLU) is ahead of random search on all five test
            functions and of ``SingleTaskGP`` on Branin, Hartmann6 and Levy-10, about level
            on Ackley-10 and behind it on a 40-d embedded Hartmann6; the Fourier default is
            cheaper and close to it on these stationary test functions.
        embedding: ``"auto"`` (default): ``"fourier"`` for the MLP (``hidden`` given), ``None``
            for your own ``network``. ``"fourier"``: the network sees frozen random Fourier
            features of the (normalized) inputs, ``embedding_features`` of them, whose ARD
            lengthscales are fitted by the evidence first (as for the default network,
            :func:`~bayescurv.bo.ard.fit_lengthscales`; ``model.ard``), a Fourier-feature
            network (Tancik et al., 2020): its NTK is stationary, so the linearized mean does
            not extrapolate towards the faces of the box as a tanh MLP's does (docs/bo.md).
            Then ``center`` is not used and ``prior_granularity`` defaults to ``"scalar"``;
            factories are called with ``d = embedding_features``; modules are refused (their
            input size is fixed). ``None``: the network sees the inputs.
        activation: the MLP's nonlinearity, ``"silu"`` (default), ``"tanh"``, ``"relu"`` or
            ``"gelu"``. SiLU (smooth like tanh, unbounded like ReLU) was measured ahead of
            tanh on Hartmann6, Ackley-10 and Levy-10, and faster per BO iteration than ReLU
            (docs/bo.md).
        embedding_features: number of Fourier features of the embedding (default 512; 256 were
            too few for the ARD fit on the 40-d embedded Hartmann6 of docs/bo.md).
        lengthscales: for the default Fourier network: ``"ard"`` (default) learns one
            lengthscale per input dimension by the exact evidence with BoTorch's
            ``SingleTaskGP`` hyperpriors (:func:`~bayescurv.bo.ard.fit_lengthscales`, on at
            most ``ard_points`` random training points); a tuple of floats fits one isotropic
            network per value and keeps the best by the evidence.
        subset: ``"all"`` or ``"last_layer"`` weights in the posterior.
        structure: ``"auto"`` (default): ``"ntk"`` for a network (``network`` or ``hidden``
            given), ``"full"`` for the default Fourier network. ``"ntk"``: the exact
            linearized GP of all weights (:mod:`bayescurv.bo.ntk`), full GGN computed in data
            space (``N x N``) when the targets are no more than the parameters, else in weight
            space (``P x P``); the model then normalizes inputs (``Normalize(d)``) and
            outcomes (``Standardize(m)``) unless transforms are given, and ``model.gp`` holds
            the posterior (``model.la`` is ``None``). ``"full"``, ``"kfac"``, ``"diag"``,
            ``"ekfac"``: a :class:`~bayescurv.Laplace` posterior (``model.la``) of that
            structure.
        prior_mean: ``"init"`` (default, ``"ntk"``): the prior is centred at the network's
            initial weights :math:`\theta_0`, so the prior mean function is the initial
            network and the MAP is pulled towards it; ``"zero"``: :math:`N(0, D^{-1})`.
        center: (``"ntk"``) the network sees ``c (2 x - 1)``, the normalized unit cube mapped
            to ``[-c, c]^d`` (:class:`~bayescurv.bo.ntk.Center`); ``True`` is ``c = 1``,
            ``False`` no centring; a tuple of scales: the one whose NTK GP at the
            initialization has the best evidence (:func:`~bayescurv.bo.fitting.select_center`;
            ``c`` acts as an inverse lengthscale). The chosen scale is ``model.center_scale``.
        rounds: (``"ntk"``) alternations of MAP training (weight decay from the current prior
            and noise) and evidence tuning; the second round retrains from :math:`\theta^*`
            with the tuned values, so the MAP is the one of the selected prior.
        prior_first: (``"ntk"``) tune the prior on the NTK GP at the initialization before the
            first MAP training (else the first training uses ``prior_precision``); better
            calibrated on held-out points, not better in the BO benchmark (docs/bo.md).
        tune_points: (``"ntk"``) the evidence is tuned on at most this many random points
            (one ``N x N`` Cholesky per L-BFGS step); the posterior uses all data.
        evidence: ``"linearized"`` (default with ``structure="full"``): hyperparameters by the
            exact evidence of the linearized Gaussian model and the predictive mean its
            posterior mean (:class:`~bayescurv.laplace.glm.GaussianGLM`; this re-solves the
            mean for every noise level, so noiseless objectives get interpolating fits);
            ``"laplace"`` (the only choice for other structures): the Laplace evidence at the
            MAP, predictive mean :math:`f(x;\theta^*)`.
        prior_precision: initial prior precision :math:`\delta_0`; the MAP objective uses
            weight decay :math:`\sigma_0^2\delta_0/N`, then :math:`\delta` and
            :math:`\sigma` are tuned by marginal likelihood (``prior_granularity``
            "scalar"/"layer", or "ard" for ``"ntk"``: one precision per input column of the
            first layer, one per other tensor — the default there without an embedding; see
            :func:`~bayescurv.bo.ntk.prior_groups`).
        sigma_noise: initial observation noise :math:`\sigma_0` (see ``prior_precision``).
        noise: ``"marglik"`` (tune :math:`\sigma` with the prior precision), ``"residual"``
            (:math:`\sigma^2` = the MAP fit's training MSE) or a fixed float; in all cases
            :math:`\sigma \ge` ``min_noise`` (outcome-transformed units).
        noise_prior: hyperprior on :math:`\sigma^2` for ``noise="marglik"`` (MAP-II, see
            :func:`~bayescurv.bo.hyperparameters.tune_hyperparameters`): ``"default"``
            (LogNormal(-4, 1), BoTorch's ``SingleTaskGP`` noise prior), a
            ``torch.distributions.Distribution`` over :math:`\sigma^2`, or ``None`` (type-II
            maximum likelihood).
        steps: MAP training steps (see :func:`~bayescurv.bo.training.train_map`); default
            500 for ``"ntk"`` (half of it in later rounds), 2000 otherwise.
        lr: MAP training learning rate (Adam).
        batch_size: MAP training mini-batch size (full batch when ``N <= batch_size``).
        patience: MAP training stops after this many steps without improvement.
        marglik_steps: L-BFGS iterations (at most) of the
            hyperparameter tuning.
        refine_steps: Adam steps (default 50 for ``"ntk"``, else 300) of the warm-started
            refinement in
            :meth:`condition_on_observations`.
        input_transform: BoTorch input transform (e.g. ``Normalize``), learned on the
            training data as BoTorch models do.
        outcome_transform: BoTorch outcome transform (e.g. ``Standardize``), likewise.
        seed: seeds the network initialization and mini-batch draws.
    """

    _num_outputs: int
    #: the ARD fit of the default network (``lengthscales="ard"``) or of the Fourier
    #: ``embedding``, else ``None``
    ard: ARDFit | None = None

    def __init__(
        self,
        train_X: Tensor,
        train_Y: Tensor,
        network: NetworkSpec = None,
        *,
        subset: str = "all",
        structure: str = "auto",
        hidden: tuple[int, ...] | None = None,
        activation: str = "silu",
        embedding: str | None = "auto",
        embedding_features: int = 512,
        num_features: int = 512,
        lengthscales: str | tuple[float, ...] = "ard",
        ard_points: int = 1000,
        evidence: str | None = None,
        prior_precision: float = 1.0,
        sigma_noise: float = 0.1,
        prior_granularity: str = "auto",
        prior_mean: str = "init",
        center: bool | float | tuple[float, ...] = True,
        rounds: int = 2,
        prior_first: bool = False,
        tune_points: int = 500,
        steps: int | None = None,
        lr: float = 1e-2,
        batch_size: int = 512,
        patience: int = 100,
        marglik_steps: int = 100,
        noise: str | float = "marglik",
        min_noise: float = 1e-3,
        noise_prior: Any = "default",
        refine_steps: int | None = None,
        input_transform: InputTransform | None = None,
        outcome_transform: OutcomeTransform | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_training_data(train_X, train_Y)
        check_options(prior_precision=prior_precision, sigma_noise=sigma_noise, lr=lr,
                      min_noise=min_noise, steps=steps, marglik_steps=marglik_steps,
                      refine_steps=refine_steps, rounds=rounds, patience=patience,
                      batch_size=batch_size, num_features=num_features,
                      ard_points=ard_points, tune_points=tune_points,
                      embedding_features=embedding_features)
        n, d = train_X.shape
        m = train_Y.shape[-1]
        self._num_outputs = m
        self._input_dim = d
        self._dtype = train_X.dtype
        fourier = network is None and hidden is None
        if structure == "auto":
            structure = "full" if fourier and subset == "all" else (
                "ntk" if subset == "all" else "kfac")
        ntk = structure == "ntk"
        if ntk and subset != "all":
            raise InvalidArgumentError(
                "structure='ntk' puts all weights in the posterior: subset='all'")
        center = check_center(center)
        embedding = check_embedding(embedding, network, hidden, center, prior_granularity)
        if embedding is not None:
            center = 0.0  # the features take the unit cube; their lengthscales set the scale
        if prior_granularity == "auto":
            prior_granularity = "scalar" if embedding else ("ard" if ntk else "layer")
        if prior_mean not in ("init", "zero"):
            raise InvalidArgumentError(f"prior_mean must be 'init' or 'zero', got {prior_mean!r}")
        if steps is None:
            steps = 500 if ntk else 2000
        if refine_steps is None:
            refine_steps = 50 if ntk else 300
        self._config = dict(
            subset=subset, structure=structure, steps=steps, lr=lr, batch_size=batch_size,
            patience=patience, marglik_steps=marglik_steps, refine_steps=refine_steps,
            prior_granularity=prior_granularity, noise=noise, min_noise=min_noise,
            noise_prior=noise_prior, prior_mean=prior_mean, center=center if ntk else 0.0,
            rounds=rounds, tune_points=tune_points, prior_first=prior_first,
            evidence=("linearized" if structure in ("full", "ntk") else "laplace")
            if evidence is None else evidence,
        )
        if self._config["evidence"] not in ("linearized", "laplace"):
            raise InvalidArgumentError(
                f"evidence must be 'linearized' or 'laplace', got {evidence!r}")
        if self._config["evidence"] == "linearized" and structure not in ("full", "ntk"):
            raise InvalidArgumentError("evidence='linearized' needs structure='full' or 'ntk'")
        if ntk and self._config["evidence"] != "linearized":
            raise InvalidArgumentError(
                "structure='ntk' is the exact linearized GP: evidence='linearized'")
        if ntk:  # the model normalizes: inputs to the unit cube, outcomes standardized
            if input_transform is None:
                input_transform = Normalize(d)
            if outcome_transform is None:
                outcome_transform = Standardize(m)
        if not (noise in ("marglik", "residual") or isinstance(noise, (int, float))):
            raise InvalidArgumentError(
                f"noise must be 'marglik', 'residual' or a float, got {noise!r}")
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(seed)
        with torch.no_grad():
            if input_transform is not None:
                input_transform.to(train_X)
                input_transform.train()
                X_tf = input_transform(train_X)
                self.input_transform = input_transform
            else:
                X_tf = train_X
            if outcome_transform is not None:
                outcome_transform.train()
                Y_tf, _ = outcome_transform(train_Y, X=X_tf)
                self.outcome_transform = outcome_transform
            else:
                Y_tf = train_Y
        self._original_train_X = train_X.detach()
        self.train_X = X_tf.detach()
        self.train_Y = Y_tf.detach()
        # the default Fourier network is linear in its trainable weights (the head): its
        # linearized model is exact, and with evidence="linearized" the posterior mean is solved
        # in closed form, so there is nothing for MAP training to do
        self._config["train"] = not (fourier and not ntk
                                     and self._config["evidence"] == "linearized")
        if fourier and not ntk:
            if isinstance(lengthscales, str):
                if lengthscales != "ard":
                    raise InvalidArgumentError(
                        f"lengthscales must be 'ard' or a tuple of floats, got {lengthscales!r}")
                network, self.ard = fit_ard_network(
                    self.train_X, self.train_Y, self._config, num_features=num_features,
                    seed=seed, max_points=ard_points, noise_prior=self._noise_prior(),
                    generator=self._generator)
                prior_precision, sigma_noise = self.ard.prior_precision, self.ard.sigma_noise
            else:
                network = [partial(fourier_network, num_features=num_features,
                                   lengthscale=ell, seed=seed) for ell in lengthscales]
        specs = list(network) if isinstance(network, (list, tuple)) else [network]
        if not specs:
            raise InputDataError("network: an empty list of candidates")
        best: tuple[PosteriorFit, nn.Module, NTKState | None] | None = None
        hidden = (50, 50) if hidden is None else hidden
        embed, width = None, d
        if embedding is not None:  # frozen Fourier features with evidence-fitted lengthscales
            embed_net, self.ard = fit_ard_network(
                self.train_X, self.train_Y, self._config, num_features=embedding_features,
                seed=seed, max_points=ard_points, noise_prior=self._noise_prior(),
                generator=self._generator)
            embed, width = embed_net[0], embedding_features
        for spec in specs:
            net = make_network(spec, width, m, hidden, activation, seed).to(train_X)
            if embed is not None:
                net = nn.Sequential(copy.deepcopy(embed), net)
            state = None
            if ntk:
                if isinstance(self._config["center"], tuple):
                    net, state = select_center(
                        net, self.train_X, self.train_Y, self._config, self._config["center"],
                        sigma=float(sigma_noise), noise_prior=self._noise_prior(),
                        generator=self._generator, max_iter=self._config["marglik_steps"])
                else:
                    net, state = prepare_ntk(net, d, self._config)
                delta = torch.as_tensor(prior_precision, dtype=state.theta0.dtype,
                                        device=state.theta0.device)
                fit = self._fit_ntk(net, state, self._config["steps"],
                                    delta.reshape(-1).expand(state.num_groups).clone(),
                                    float(sigma_noise), rounds=self._config["rounds"],
                                    warm=False, tune_iter=self._config["marglik_steps"])
            else:
                fit = self._fit_laplace(net, self._config["steps"], prior_precision,
                                        sigma_noise)
            if best is None or fit.objective > best[0].objective:
                best = (fit, net, state)
        self._set_fit(*best)
        self.eval()

    # fitting (bayescurv.bo.fitting) --------------------------------------------------------
    def _noise_prior(self):
        return resolve_noise_prior(self._config["noise_prior"], self._dtype,
                                   self.train_X.device)

    def _fit_laplace(self, net: nn.Module, steps: int, prior_precision, sigma_noise,
                     marglik_steps: int | None = None) -> PosteriorFit:
        return fit_laplace(net, self.train_X, self.train_Y, self._config, steps=steps,
                           prior_precision=prior_precision, sigma_noise=sigma_noise,
                           noise_prior=self._noise_prior(), generator=self._generator,
                           marglik_steps=marglik_steps)

    def _fit_ntk(self, net: nn.Module, state: NTKState, steps: int, delta: Tensor,
                 sigma: float, *, rounds: int, warm: bool, tune_iter: int) -> PosteriorFit:
        return fit_ntk(net, self.train_X, self.train_Y, self._config, state, steps=steps,
                       delta=delta, sigma=sigma, rounds=rounds, warm=warm,
                       noise_prior=self._noise_prior(), generator=self._generator,
                       tune_iter=tune_iter)

    def _set_fit(self, fit: PosteriorFit, net: nn.Module, state: NTKState | None) -> None:
        self.net, self._ntk = net, state
        self.la, self.glm, self.theta_bar, self.gp = fit.la, fit.glm, fit.theta_bar, fit.gp
        self.log_evidence, self.train_loss = fit.objective, fit.train_loss

    @property
    def center_scale(self) -> float | None:
        """The input scale of :class:`~bayescurv.bo.ntk.Center` the ``"ntk"`` network sees (0:
        no centring; chosen by the evidence when ``center`` was a tuple); ``None`` for the
        other structures."""
        return None if self._ntk is None else self._ntk.center

    # BoTorch model API -------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self._num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size([])

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        r"""Joint linearized-Laplace posterior at ``X`` (``batch_shape x q x d``).

        ``observation_noise``: ``False`` the latent :math:`f`; ``True`` plus the learned
        :math:`\sigma^2`; a tensor (``batch_shape x q x m``, outcome-transformed space) plus
        that noise. Differentiable in ``X``.
        """
        self.eval()
        check_inputs(X, self._input_dim, self._dtype)
        Xt = self.transform_inputs(X)
        batch = Xt.shape[:-2]
        q = Xt.shape[-2]
        m = self.num_outputs
        pts = Xt.reshape(-1, q, Xt.shape[-1])
        mean, cov = self._moments(pts)
        mean = mean.reshape(*batch, q, m)
        cov = cov.reshape(*batch, q * m, q * m)
        return self._finish(mean, cov, Xt, observation_noise, posterior_transform,
                            output_indices)

    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, refine: bool | None = None,
        **kwargs: Any,
    ) -> Model:
        r"""The model conditioned on ``(X, Y)`` (raw, untransformed space).

        ``refine=True`` (default for unbatched data): warm-started MAP refinement on old + new data
        (``refine_steps`` Adam steps) and a curvature refit; returns a :class:`LaplaceModel`. For
        ``"ntk"`` the prior precisions and the noise are kept (as BoTorch conditions a GP at fixed
        hyperparameters; a refit retunes them), for the other structures they get a short warm-
        started retuning. ``refine=False`` (default for batched ``Y``, e.g. fantasies, or when
        ``X``/``Y`` need gradients): the exact linearized update (module docstring); returns a
        :class:`ConditionedLaplaceModel` whose batch shape is the broadcast of the batch shapes of
        ``X`` and ``Y``. ``noise`` (outcome-transformed, shape of ``Y``) defaults to the learned
        :math:`\sigma^2`.
        """
        Xt, Yt = self._transform_observations(X, Y)
        batched = Xt.dim() > 2 or Yt.dim() > 2
        differentiable = torch.is_grad_enabled() and (X.requires_grad or Y.requires_grad)
        if refine is None:
            refine = not (batched or differentiable)
        if not refine:
            return ConditionedLaplaceModel(self, Xt, Yt, noise)
        if batched:
            raise BotorchTensorDimensionError(
                "refine=True needs unbatched observations X n' x d, Y n' x m; use refine=False "
                "for batched (fantasy) observations"
            )
        return self._refined(X.detach(), Xt.detach(), Yt.detach())

    def _refined(self, X_raw: Tensor, Xt: Tensor, Yt: Tensor) -> LaplaceModel:
        new = self.__class__.__new__(self.__class__)
        Model.__init__(new)
        new._num_outputs = self._num_outputs
        new._input_dim = self._input_dim
        new._dtype = self._dtype
        new._config = dict(self._config)
        new._generator = self._generator
        new.ard = self.ard  # the network (its lengthscales) is kept
        for name in ("input_transform", "outcome_transform"):
            if hasattr(self, name):
                setattr(new, name, copy.deepcopy(getattr(self, name)))
        new._original_train_X = torch.cat([self._original_train_X, X_raw])
        new.train_X = torch.cat([self.train_X, Xt])
        new.train_Y = torch.cat([self.train_Y, Yt])
        net = copy.deepcopy(self.net)
        cfg = self._config
        if self.gp is not None:  # warm start: refine θ* at the current (δ, σ), kept fixed
            fit = new._fit_ntk(net, self._ntk, cfg["refine_steps"], self.gp.prior_precision,
                               self.gp.sigma_noise.item(), rounds=1, warm=True, tune_iter=0)
        else:
            fit = new._fit_laplace(net, cfg["refine_steps"], self.la.prior_precision,
                                   self.la.sigma_noise,
                                   marglik_steps=max(cfg["marglik_steps"] // 2, 1))
        new._set_fit(fit, net, self._ntk)
        new.eval()
        return new

    def fantasize(
        self, X: Tensor, sampler: MCSampler, observation_noise: Tensor | None = None,
        **kwargs: Any,
    ) -> ConditionedLaplaceModel:
        """Fantasy model: sample ``Y ~ p(y | X)`` (with observation noise) with ``sampler`` and
        condition the linearized model on every sample; batch shape
        ``sampler.sample_shape x X.batch_shape``. ``observation_noise`` (outcome-transformed,
        broadcastable to ``batch x n' x m``) replaces the learned noise."""
        if observation_noise is not None and not torch.is_tensor(observation_noise):
            raise InputDataError("observation_noise must be None or a tensor")
        propagate_grads = kwargs.pop("propagate_grads", False)
        with fantasize_flag(), settings.propagate_grads(propagate_grads):
            post = self.posterior(
                X, observation_noise=True if observation_noise is None else observation_noise
            )
            Y = sampler(post)  # sample_shape x batch x n' x m (raw outcome space)
            Xt = self.transform_inputs(X)
            if hasattr(self, "outcome_transform"):
                self.outcome_transform.eval()
                Y, _ = self.outcome_transform(Y, X=Xt)
            noise = None
            if observation_noise is not None:
                noise = observation_noise.expand(Y.shape[1:])
            return ConditionedLaplaceModel(self, Xt, Y, noise)

    def __repr__(self) -> str:
        return (f"LaplaceModel(n={self.train_X.shape[0]}, d={self._input_dim}, "
                f"m={self.num_outputs}, {self.la!r})")
