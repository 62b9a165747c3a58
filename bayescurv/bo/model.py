r"""A BoTorch surrogate whose posterior is the linearized-Laplace GP of a neural network.

After MAP training and a Laplace fit, the network linearized at :math:`\theta^*`,
:math:`f_{lin}(x) = f(x;\theta^*) + J(x)(\theta - \theta^*)` with
:math:`\theta \sim N(\theta^*, \Sigma)`, is a Gaussian process with mean
:math:`f(x;\theta^*)` and kernel :math:`k(x, x') = J(x)\,\Sigma\,J(x')^\top` (the empirical NTK
under the posterior covariance). :class:`LaplaceModel` exposes that GP to BoTorch: the joint
covariance over the ``q`` points of each t-batch, observation noise, transforms, gradients in
``X`` and fantasies.

Conditioning has two routes:

- **real data** (``condition_on_observations`` with plain ``n' x d`` / ``n' x m`` tensors): the
  MAP network is refined from its current weights on old + new data (a short Adam run) and the
  curvature is refit, with the prior precision and noise warm-started — a new
  :class:`LaplaceModel`, no retraining from scratch;
- **fantasies** (``fantasize``, or batched / differentiable observations): the exact Bayesian
  update of the *linearized* model, :math:`\Lambda' = \Lambda + J'^\top N^{-1} J'` and one
  Gauss-Newton step from :math:`\theta^*` (exact MAP for the linearized model), which in function
  space is GP conditioning with the kernel above:

  .. math::
      \mu'(x) = \mu(x) + k(x, X')(K' + N)^{-1}(Y' - \mu(X')),\quad
      k'(x, x') = k(x, x') - k(x, X')(K' + N)^{-1}k(X', x').

  It is cheap, batched over any number of fantasy samples and differentiable in ``X'`` —
  what :class:`~botorch.acquisition.qKnowledgeGradient` needs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
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
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor, nn

from bayescurv.bo._joint import check_inputs, expand_noise, joint_functional, make_mvn
from bayescurv.bo.ard import ARDFit, fit_lengthscales
from bayescurv.bo.features import fourier_network
from bayescurv.bo.ntk import Center, LinearizedGP, group_grams, jacobian, prior_groups, tune
from bayescurv.bo.subset import OutputSubsetModel
from bayescurv.laplace import Laplace
from bayescurv.laplace.glm import GaussianGLM
from bayescurv.params import select

NetworkSpec = nn.Module | Callable[[int, int], nn.Module] | None
#: an isotropic lengthscale grid (unit-cube input units) for ``lengthscales=LENGTHSCALES``
LENGTHSCALES = (0.1, 0.175, 0.25, 0.35, 0.5, 0.7)
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def default_network(
    input_dim: int, num_outputs: int, hidden: tuple[int, ...] = (50, 50),
    activation: str = "tanh",
) -> nn.Sequential:
    """MLP ``d -> hidden... -> m`` with ``activation`` between linear layers."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {list(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def train_map(
    net: nn.Module,
    X: Tensor,
    Y: Tensor,
    weight_decay: float | list[Tensor],
    *,
    anchor: list[Tensor] | None = None,
    steps: int = 2000,
    lr: float = 1e-2,
    batch_size: int = 512,
    patience: int = 100,
    rel_tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    r"""Minimize :math:`\frac{1}{2N}\sum_i \|y_i - f(x_i)\|^2 + \frac{\lambda}{2}\|\theta\|^2`
    with Adam and a cosine schedule; full batch when ``N <= batch_size``.

    With :math:`\lambda = \sigma_0^2\delta_0/N` this is the negative log joint
    :math:`\sum_i \|y_i - f\|^2/(2\sigma_0^2) + \delta_0\|\theta\|^2/2` times
    :math:`\sigma_0^2/N`, i.e. the MAP under the Laplace prior. Early stopping: every 10 steps
    the (running) training objective is compared with the best so far; after ``patience``
    steps without a relative improvement of ``rel_tol`` training stops and the best weights
    are restored. Returns the final objective.

    ``weight_decay`` may be one tensor per trainable parameter (broadcast against it: a
    per-group prior), and ``anchor`` (same order) the prior mean :math:`\theta_0`; the penalty
    is then :math:`\frac12\sum \lambda \odot (\theta - \theta_0)^2`.
    """
    # small problems run on one thread: per-op threading overhead dominates them (measured
    # 8x faster for a 50-50 MLP on 100 points on a busy 2-core machine)
    threads = torch.get_num_threads()
    small = min(X.shape[0], batch_size) * sum(p.numel() for p in net.parameters()) < 2**22
    if small:
        torch.set_num_threads(1)
    try:
        return _train_map(net, X, Y, weight_decay, anchor, steps, lr, batch_size, patience,
                          rel_tol, generator)
    finally:
        torch.set_num_threads(threads)


def _train_map(net, X, Y, weight_decay, anchor, steps, lr, batch_size, patience, rel_tol,
               generator) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    wds = weight_decay if isinstance(weight_decay, list) else [weight_decay] * len(params)
    anchors = anchor if anchor is not None else [None] * len(params)
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = X.shape[0]
    full = n <= batch_size
    best, best_state, since, running = math.inf, None, 0, None
    net.train()
    for step in range(steps):
        if full:
            xb, yb = X, Y
        else:
            idx = torch.randint(n, (batch_size,), generator=generator).to(X.device)
            xb, yb = X[idx], Y[idx]
        opt.zero_grad()
        fit = 0.5 * (net(xb) - yb).square().sum(-1).mean()
        reg = 0.5 * sum((wd * (p if a is None else p - a).square()).sum()
                        for p, wd, a in zip(params, wds, anchors))
        loss = fit + reg
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        running = value if running is None or full else 0.9 * running + 0.1 * value
        if step % 10 == 9 or step == steps - 1:
            if running < best * (1 - rel_tol) or best_state is None:
                best, since = running, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                since += 10
                if since >= patience:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return best


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


def tune_hyperparameters(
    la: Laplace, granularity: str, n_steps: int, lr: float = 0.1, tune_sigma: bool = True,
    noise_prior=None, evidence: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> float:
    r"""MAP-II: maximize :math:`\log p(D \mid \delta, \sigma) + \log p(\sigma^2)` (the
    evidence plus the noise hyperprior) with Adam on :math:`\log\delta` (one per layer for
    ``granularity="layer"``, else one) and :math:`\log\sigma`. ``evidence(prior, sigma)``
    defaults to the Laplace evidence ``la.log_marginal_likelihood`` (e.g.
    :meth:`GaussianGLM.log_marginal_likelihood` instead). Keeps the best iterate and stores
    it in ``la``; returns the best objective."""
    evidence = la.log_marginal_likelihood if evidence is None else evidence
    cur = la.prior_precision
    size = la.num_layers if granularity == "layer" else 0
    if size == 0:
        init = cur.mean().reshape(())
    elif cur.dim() == 1 and cur.numel() == size:
        init = cur.clone()
    else:
        init = cur.mean().expand(size).clone()
    log_prior = init.log().clone().requires_grad_(True)
    log_sigma = la.sigma_noise.reshape(()).log().clone().requires_grad_(tune_sigma)
    variables = [log_prior] + ([log_sigma] if tune_sigma else [])
    opt = torch.optim.Adam(variables, lr=lr)

    def objective():
        sigma = log_sigma.exp()
        lml = evidence(log_prior.exp(), sigma)
        return lml + (noise_log_prior(noise_prior, sigma) if tune_sigma else 0.0)

    best = (-math.inf, log_prior.detach().clone(), log_sigma.detach().clone())
    for step in range(n_steps + 1):
        opt.zero_grad()
        obj = objective()
        if torch.isfinite(obj) and obj.item() > best[0]:
            best = (obj.item(), log_prior.detach().clone(), log_sigma.detach().clone())
        if step == n_steps:
            break
        (-obj).backward()
        opt.step()
    la.prior_precision = best[1].exp()
    if tune_sigma:
        la.sigma_noise = best[2].exp()
    return best[0]


class _LinearizedMixin:
    """Shared helpers of the two models (they both hold ``self.la``)."""

    la: Laplace | None = None
    glm: GaussianGLM | None = None
    theta_bar: Tensor | None = None
    #: the linearized GP of ``structure="ntk"`` (then ``la`` is ``None``)
    gp: LinearizedGP | None = None

    def _moments(self, pts: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(T, q, m)`` and joint covariance ``(T, q m, q m)`` at ``(T, q, d)``
        (transformed inputs) from whichever posterior the model holds."""
        if self.gp is not None:
            if torch.is_grad_enabled() and pts.requires_grad:
                return self.gp.moments(pts)
            with torch.no_grad():
                return self.gp.moments(pts)
        mean, cov = joint_functional(self.la, pts)
        return mean + self._mean_offset(pts), cov

    def _mean_offset(self, X: Tensor) -> Tensor | float:
        r""":math:`J(X)(\bar\theta - \theta^*)` for ``X`` of shape ``(T, n, d)`` when the mean
        is the exact linearized-model posterior mean (``evidence="linearized"``), else 0."""
        if self.glm is None:
            return 0.0
        t, n, d = X.shape
        return self.glm.mean_offset(X.reshape(t * n, d), self.theta_bar).reshape(t, n, -1)

    def subset_output(self, idcs: list[int]) -> Model:
        """The model of outputs ``idcs``: the exact marginal of the joint posterior
        (:class:`~bayescurv.bo.subset.OutputSubsetModel`; posterior only, no refit)."""
        return OutputSubsetModel(self, idcs)

    def _set_transformed_inputs(self) -> None:  # training inputs are stored transformed
        pass

    def _revert_to_original_inputs(self) -> None:
        pass

    @property
    def sigma2(self) -> Tensor:
        """Observation-noise variance (outcome-transformed space)."""
        if self.gp is not None:
            return self.gp.sigma_noise.reshape(()) ** 2
        return self.la.sigma_noise.reshape(()) ** 2

    def _finish(self, mvn, X: Tensor, posterior_transform,
                 output_indices: list[int] | None = None) -> GPyTorchPosterior:
        posterior = GPyTorchPosterior(distribution=mvn)
        if hasattr(self, "outcome_transform"):
            transform = self.outcome_transform
            if output_indices is not None:  # untransform only the selected outputs
                transform = transform.subset_output(list(output_indices))
            posterior = transform.untransform_posterior(posterior, X=X)
        if posterior_transform is not None:
            return posterior_transform(posterior=posterior, X=X)
        return posterior


class LaplaceModel(_LinearizedMixin, Model, FantasizeMixin):
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
            MLP :func:`default_network` (``hidden``, ``activation``).
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
            ``False`` no centring.
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
        prior_precision, sigma_noise: initial :math:`\delta_0, \sigma_0`; the MAP objective uses
            weight decay :math:`\sigma_0^2\delta_0/N`, then both are tuned by marginal
            likelihood (``prior_granularity`` "scalar"/"layer", or "ard" for ``"ntk"``: one
            precision per input column of the first layer, one per other tensor — the
            default there; see :func:`~bayescurv.bo.ntk.prior_groups`).
        noise: ``"marglik"`` (tune :math:`\sigma` with the prior precision), ``"residual"``
            (:math:`\sigma^2` = the MAP fit's training MSE) or a fixed float; in all cases
            :math:`\sigma \ge` ``min_noise`` (outcome-transformed units).
        noise_prior: hyperprior on :math:`\sigma^2` for ``noise="marglik"`` (MAP-II, see
            :func:`tune_hyperparameters`): ``"default"`` (LogNormal(-4, 1), BoTorch's
            ``SingleTaskGP`` noise prior), a ``torch.distributions.Distribution`` over
            :math:`\sigma^2`, or ``None`` (type-II maximum likelihood).
        steps, lr, batch_size, patience: MAP training (see :func:`train_map`); ``steps``
            defaults to 500 for ``"ntk"`` (half of it in later rounds), 2000 otherwise.
        marglik_steps: Adam steps (Laplace path) or L-BFGS iterations (``"ntk"``) of the
            hyperparameter tuning.
        refine_steps: Adam steps (default 100 for ``"ntk"``, else 300) of the warm-started
            refinement in
            :meth:`condition_on_observations`.
        input_transform, outcome_transform: BoTorch transforms (e.g. ``Normalize``,
            ``Standardize``), learned on the training data as BoTorch models do.
        seed: seeds the network initialization and mini-batch draws.
    """

    _num_outputs: int
    #: the ARD fit of the default network (``lengthscales="ard"``), else ``None``
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
        activation: str = "tanh",
        num_features: int = 512,
        lengthscales: str | tuple[float, ...] = "ard",
        ard_points: int = 1000,
        evidence: str | None = None,
        prior_precision: float = 1.0,
        sigma_noise: float = 0.1,
        prior_granularity: str = "auto",
        prior_mean: str = "init",
        center: bool | float = True,
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
        self._validate_training_data(train_X, train_Y)
        n, d = train_X.shape
        m = train_Y.shape[-1]
        self._num_outputs = m
        self._input_dim = d
        fourier = network is None and hidden is None
        if structure == "auto":
            structure = "full" if fourier and subset == "all" else (
                "ntk" if subset == "all" else "kfac")
        ntk = structure == "ntk"
        if ntk and subset != "all":
            raise ValueError("structure='ntk' puts all weights in the posterior: subset='all'")
        if prior_granularity == "auto":
            prior_granularity = "ard" if ntk else "layer"
        if prior_mean not in ("init", "zero"):
            raise ValueError(f"prior_mean must be 'init' or 'zero', got {prior_mean!r}")
        if steps is None:
            steps = 500 if ntk else 2000
        if refine_steps is None:
            refine_steps = 100 if ntk else 300
        self._config = dict(
            subset=subset, structure=structure, steps=steps, lr=lr, batch_size=batch_size,
            patience=patience, marglik_steps=marglik_steps, refine_steps=refine_steps,
            prior_granularity=prior_granularity, noise=noise, min_noise=min_noise,
            noise_prior=noise_prior, prior_mean=prior_mean, center=float(center) if ntk else 0.0,
            rounds=rounds, tune_points=tune_points, prior_first=prior_first,
            evidence=("linearized" if structure in ("full", "ntk") else "laplace")
            if evidence is None else evidence,
        )
        if self._config["evidence"] not in ("linearized", "laplace"):
            raise ValueError(f"evidence must be 'linearized' or 'laplace', got {evidence!r}")
        if self._config["evidence"] == "linearized" and structure not in ("full", "ntk"):
            raise ValueError("evidence='linearized' needs structure='full' or 'ntk'")
        if ntk and self._config["evidence"] != "linearized":
            raise ValueError("structure='ntk' is the exact linearized GP: evidence='linearized'")
        if ntk:  # the model normalizes: inputs to the unit cube, outcomes standardized
            if input_transform is None:
                input_transform = Normalize(d)
            if outcome_transform is None:
                outcome_transform = Standardize(m)
        if not (noise in ("marglik", "residual") or isinstance(noise, (int, float))):
            raise ValueError(f"noise must be 'marglik', 'residual' or a float, got {noise!r}")
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
                    raise ValueError(f"lengthscales must be 'ard' or a tuple of floats, got "
                                     f"{lengthscales!r}")
                network, prior_precision, sigma_noise = self._ard_network(
                    num_features, seed, ard_points)
            else:
                network = [partial(fourier_network, num_features=num_features,
                                   lengthscale=ell, seed=seed) for ell in lengthscales]
        specs = list(network) if isinstance(network, (list, tuple)) else [network]
        if not specs:
            raise InputDataError("network: an empty list of candidates")
        best = None
        hidden = (50, 50) if hidden is None else hidden
        for spec in specs:
            self.net = self._make_network(spec, d, m, hidden, activation, seed).to(train_X)
            if ntk:
                objective = self._init_ntk(prior_precision, sigma_noise)
            else:
                objective = self._fit(self._config["steps"], prior_precision, sigma_noise)
            if best is None or objective > best[0]:
                best = (objective, self.net, self.la, self.glm, self.theta_bar,
                        self.train_loss, self.gp, getattr(self, "_ntk", None))
        (self.log_evidence, self.net, self.la, self.glm, self.theta_bar, self.train_loss,
         self.gp, self._ntk) = best
        self.eval()

    # construction ------------------------------------------------------------------------
    @staticmethod
    def _validate_training_data(train_X: Tensor, train_Y: Tensor) -> None:
        """BoTorch conventions: tensors, ``n x d`` / ``n x m``, one dtype, no NaN."""
        if not (torch.is_tensor(train_X) and torch.is_tensor(train_Y)):
            raise InputDataError("train_X and train_Y must be tensors")
        if train_X.dim() != train_Y.dim():
            if train_X.dim() - train_Y.dim() == 1 and train_X.shape[:-1] == train_Y.shape:
                raise BotorchTensorDimensionError(
                    "An explicit output dimension is required for targets. Expected Y with "
                    f"dimension {train_X.dim()} (got {train_Y.dim()}); use train_Y.unsqueeze(-1)"
                )
            raise BotorchTensorDimensionError(
                f"Expected X and Y to have the same number of dimensions (got X with dimension "
                f"{train_X.dim()} and Y with dimension {train_Y.dim()})."
            )
        if train_X.dim() != 2:
            raise BotorchTensorDimensionError(
                "LaplaceModel does not support batched training data (batch_shape x n x d): "
                "it takes train_X n x d and train_Y n x m, got "
                f"{tuple(train_X.shape)} and {tuple(train_Y.shape)}. Fit one model per batch "
                "element (e.g. combined with botorch.models.ModelList)."
            )
        if train_X.shape[0] != train_Y.shape[0]:
            raise BotorchTensorDimensionError(
                f"train_X has {train_X.shape[0]} points but train_Y has {train_Y.shape[0]}"
            )
        if train_X.shape[0] == 0:
            raise InputDataError("no training data: train_X has 0 rows")
        if not (train_X.is_floating_point() and train_Y.is_floating_point()):
            raise InputDataError("train_X and train_Y must be floating-point tensors")
        if train_X.dtype != train_Y.dtype:
            raise InputDataError(
                "Expected all inputs to share the same dtype. Got "
                f"{train_X.dtype} for X and {train_Y.dtype} for Y."
            )
        if train_X.device != train_Y.device:
            raise InputDataError(
                f"train_X is on {train_X.device} but train_Y on {train_Y.device}"
            )
        for name, t in (("train_X", train_X), ("train_Y", train_Y)):
            if torch.isnan(t).any():
                raise InputDataError(f"Input data contains NaN values ({name}).")
            if torch.isinf(t).any():
                raise InputDataError(f"Input data contains infinite values ({name}).")

    def _noise_prior(self):
        prior = self._config["noise_prior"]
        if isinstance(prior, str):  # "default"
            return default_noise_prior(self.train_X.dtype, self.train_X.device)
        return prior

    def _ard_network(self, num_features: int, seed: int | None,
                     max_points: int) -> tuple[nn.Module, Tensor, Tensor]:
        """The default Fourier network with ARD lengthscales fitted by the evidence on (at
        most ``max_points`` of) the training data; returns it with the fitted prior precision
        and noise (initial values for the Laplace fit)."""
        X, Y = self.train_X, self.train_Y
        if X.shape[0] > max_points:
            idx = torch.randperm(X.shape[0], generator=self._generator)[:max_points]
            X, Y = X[idx.to(X.device)], Y[idx.to(X.device)]
        net = fourier_network(X.shape[-1], Y.shape[-1], num_features, 1.0, seed).to(X)
        mode = self._config["noise"]
        fixed = float(mode) if isinstance(mode, (int, float)) else None
        fit = fit_lengthscales(net[0], X, Y, noise_prior=self._noise_prior(),
                               min_noise=self._config["min_noise"], fixed_noise=fixed)
        net[0].set_lengthscale(fit.lengthscale)
        self.ard = fit
        return net, fit.prior_precision, fit.sigma_noise

    @staticmethod
    def _make_network(network: NetworkSpec, d: int, m: int, hidden, activation, seed):
        if seed is not None:
            torch.manual_seed(seed)
        if network is None:
            return default_network(d, m, tuple(hidden), activation)
        if isinstance(network, nn.Module):
            return copy.deepcopy(network)
        if callable(network):
            net = network(d, m)
            if not isinstance(net, nn.Module):
                raise InputDataError(
                    f"the network factory must return an nn.Module, got {type(net).__name__}"
                )
            return net
        raise InputDataError(
            f"network must be an nn.Module, a factory (d, m) -> nn.Module or None; got "
            f"{type(network).__name__}"
        )

    def _fit(self, steps: int, prior_precision, sigma_noise, marglik_steps=None) -> float:
        """MAP training (``steps`` Adam steps from the current weights), Laplace fit and
        marginal-likelihood tuning of prior precision and noise; returns the MAP-II objective
        (log evidence + log noise prior)."""
        cfg = self._config
        X, Y = self.train_X, self.train_Y
        n = X.shape[0]
        prior = torch.as_tensor(prior_precision, dtype=X.dtype, device=X.device)
        sigma = torch.as_tensor(sigma_noise, dtype=X.dtype, device=X.device).reshape(())
        wd = float((sigma**2 * prior.mean()).item()) / n
        self.train_loss = math.nan
        if cfg.get("train", True):
            self.train_loss = train_map(
                self.net, X, Y, wd, steps=steps, lr=cfg["lr"], batch_size=cfg["batch_size"],
                patience=cfg["patience"], generator=self._generator,
            )
        mode = cfg["noise"]
        if mode == "residual":  # sigma^2 = training MSE (floored): the MAP fit's own noise level
            with torch.no_grad():
                mse = (self.net(X) - Y).square().mean()
            sigma = mse.clamp_min(cfg["min_noise"] ** 2).sqrt()
        elif mode != "marglik":
            sigma = torch.as_tensor(float(mode), dtype=X.dtype, device=X.device)
        la = Laplace(self.net, "regression", subset=cfg["subset"], structure=cfg["structure"],
                     prior_precision=prior, sigma_noise=sigma)
        chunk = 2048
        data = [(X[i:i + chunk], Y[i:i + chunk]) for i in range(0, n, chunk)]
        la.fit(data, progress=False)
        glm = GaussianGLM(la, data) if cfg["evidence"] == "linearized" else None
        evidence = la.log_marginal_likelihood if glm is None else glm.log_marginal_likelihood
        steps_ml = cfg["marglik_steps"] if marglik_steps is None else marglik_steps
        prior_ = self._noise_prior()
        tune_sigma = mode == "marglik"
        if steps_ml > 0:
            tune_hyperparameters(la, cfg["prior_granularity"], steps_ml, lr=0.1,
                                 tune_sigma=tune_sigma, noise_prior=prior_, evidence=evidence)
            if tune_sigma and la.sigma_noise < cfg["min_noise"]:
                la.sigma_noise = cfg["min_noise"]
        with torch.no_grad():
            objective = evidence(la.prior_precision, la.sigma_noise)
            if tune_sigma:
                objective = objective + noise_log_prior(prior_, la.sigma_noise)
        self.la, self.glm = la, glm
        self.theta_bar = None if glm is None else glm.posterior_mean().detach()
        return float(objective)

    def _init_ntk(self, prior_precision, sigma_noise) -> float:
        """Set up the ``structure="ntk"`` state (centring, prior mean, groups) for the
        current network and fit it; returns the MAP-II objective."""
        cfg = self._config
        if cfg["center"]:
            self.net = nn.Sequential(Center(float(cfg["center"])), self.net)
        ps = select(self.net, "all")
        theta0 = ps.vector() if cfg["prior_mean"] == "init" else torch.zeros(ps.numel).to(
            ps.vector())
        groups = prior_groups(ps, self._input_dim, cfg["prior_granularity"])
        G = int(groups.max()) + 1
        delta = torch.as_tensor(prior_precision, dtype=theta0.dtype, device=theta0.device)
        self._ntk = dict(theta0=theta0, groups=groups, num_groups=G)
        return self._fit_ntk(cfg["steps"], delta.reshape(-1).expand(G).clone(),
                             float(sigma_noise), rounds=cfg["rounds"], warm=False,
                             tune_iter=cfg["marglik_steps"])

    def _fit_ntk(self, steps: int, delta: Tensor, sigma: float, *, rounds: int,
                 warm: bool, tune_iter: int = 100) -> float:
        r"""``rounds`` x (MAP training toward :math:`\theta_0` with the per-group weight decay
        :math:`\sigma^2\delta_g/N`, then the evidence on at most ``tune_points`` points),
        then the linearized GP on all data. The first round's tuning starts at the
        data-driven precisions unless ``warm``; returns the MAP-II objective."""
        cfg, st = self._config, self._ntk
        X, Y = self.train_X, self.train_Y
        n = X.shape[0]
        ps = select(self.net, "all")
        theta0, groups, G = st["theta0"], st["groups"], st["num_groups"]
        anchor = ps.unflatten(theta0)
        mode = cfg["noise"]
        fixed = float(mode) if isinstance(mode, (int, float)) else None
        prior_ = self._noise_prior() if mode == "marglik" else None
        self.train_loss = math.nan
        objective = math.nan
        def evidence_fit(delta: Tensor | None, sigma: float, fixed: float | None):
            Xs, Ys = X, Y
            if n > cfg["tune_points"]:
                idx = torch.randperm(n, generator=self._generator)[:cfg["tune_points"]]
                Xs, Ys = X[idx.to(X.device)], Y[idx.to(X.device)]
            with torch.no_grad():
                f, J = jacobian(ps, Xs)
                res = Ys.reshape(-1) - f + J @ (ps.vector() - theta0)
                grams = group_grams(J, groups, G)
            hyper = tune(grams, res, init_precision=delta, init_sigma=sigma,
                         min_noise=cfg["min_noise"], fixed_noise=fixed, noise_prior=prior_,
                         max_iter=tune_iter)
            return hyper.prior_precision, hyper.sigma_noise.item(), hyper.objective

        train = cfg["train"] and steps > 0
        start: Tensor | None = delta if warm else None
        if train and not warm and cfg["prior_first"] and mode != "residual":
            # the evidence of the NTK GP at θ₀ chooses the prior the MAP is trained under
            delta, sigma, objective = evidence_fit(None, sigma, fixed)
            start = delta
        for _ in range(max(rounds, 1) if train else 1):
            if train:
                wd = ps.unflatten(sigma**2 * delta[groups] / n)
                self.train_loss = train_map(
                    self.net, X, Y, wd, anchor=anchor, steps=steps, lr=cfg["lr"],
                    batch_size=cfg["batch_size"], patience=cfg["patience"],
                    generator=self._generator)
            if mode == "residual":
                with torch.no_grad():
                    mse = (self.net(X) - Y).square().mean().item()
                fixed = math.sqrt(max(mse, cfg["min_noise"] ** 2))
            delta, sigma, objective = evidence_fit(start, sigma if fixed is None else fixed,
                                                   fixed)
            start = delta
            steps = steps if warm else max(steps // 2, 1)  # later rounds start from θ*
        self.gp = LinearizedGP(ps, theta0, groups, delta, torch.tensor(sigma), X, Y)
        self.la = self.glm = self.theta_bar = None
        if n > cfg["tune_points"]:  # the evidence of all data at the tuned values
            objective = float(self.gp.log_evidence) + (
                0.0 if prior_ is None else float(noise_log_prior(prior_, self.gp.sigma_noise)))
        return objective

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
        check_inputs(X, self._input_dim, self.train_X.dtype)
        Xt = self.transform_inputs(X)
        batch = Xt.shape[:-2]
        q = Xt.shape[-2]
        m = self.num_outputs
        pts = Xt.reshape(-1, q, Xt.shape[-1])
        mean, cov = self._moments(pts)
        mean = mean.reshape(*batch, q, m)
        cov = cov.reshape(*batch, q * m, q * m)
        noise = expand_noise(observation_noise, self.sigma2, mean.shape)
        if noise is not None:
            cov = cov + torch.diag_embed(noise.reshape(*mean.shape[:-2], q * m))
        mvn = make_mvn(mean, cov, output_indices)
        return self._finish(mvn, Xt, posterior_transform, output_indices)

    def _transform_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        check_inputs(X, self._input_dim, self.train_X.dtype)
        if not torch.is_tensor(Y) or Y.dtype != X.dtype:
            raise InputDataError(
                f"Expected all inputs to share the same dtype. Got {X.dtype} for X and "
                f"{getattr(Y, 'dtype', type(Y))} for Y."
            )
        if Y.dim() < 2 or Y.shape[-1] != self.num_outputs or Y.shape[-2] != X.shape[-2]:
            raise BotorchTensorDimensionError(
                f"Y must have shape batch_shape x {X.shape[-2]} x {self.num_outputs} "
                f"(an explicit output dimension), got {tuple(Y.shape)}"
            )
        if torch.isnan(Y).any():
            raise InputDataError("Input data contains NaN values (Y).")
        Xt = self.transform_inputs(X)
        if hasattr(self, "outcome_transform"):
            self.outcome_transform.eval()
            Y, _ = self.outcome_transform(Y, X=Xt)
        return Xt, Y

    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, refine: bool | None = None,
        **kwargs: Any,
    ) -> Model:
        r"""The model conditioned on ``(X, Y)`` (raw, untransformed space).

        ``refine=True`` (default for unbatched data): warm-started MAP refinement on old + new
        data (``refine_steps`` Adam steps) and a curvature refit; returns a
        :class:`LaplaceModel`. ``refine=False`` (default for batched ``Y``, e.g. fantasies, or
        when ``X``/``Y`` need gradients): the exact linearized update (module docstring);
        returns a :class:`ConditionedLaplaceModel` whose batch shape is the broadcast of the
        batch shapes of ``X`` and ``Y``. ``noise`` (outcome-transformed, shape of ``Y``)
        defaults to the learned :math:`\sigma^2`.
        """
        Xt, Yt = self._transform_observations(X, Y, noise)
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
        new._config = dict(self._config)
        new._generator = self._generator
        new.ard = self.ard  # the network (its lengthscales) is kept
        for name in ("input_transform", "outcome_transform"):
            if hasattr(self, name):
                setattr(new, name, copy.deepcopy(getattr(self, name)))
        new._original_train_X = torch.cat([self._original_train_X, X_raw])
        new.train_X = torch.cat([self.train_X, Xt])
        new.train_Y = torch.cat([self.train_Y, Yt])
        new.net = copy.deepcopy(self.net)
        if self.gp is not None:  # warm start: refine θ*, a few L-BFGS steps on (δ, σ)
            new._ntk = self._ntk
            new.log_evidence = new._fit_ntk(
                self._config["refine_steps"], self.gp.prior_precision,
                self.gp.sigma_noise.item(), rounds=1, warm=True,
                tune_iter=max(self._config["marglik_steps"] // 5, 1))
            new.eval()
            return new
        new.log_evidence = new._fit(
            self._config["refine_steps"], self.la.prior_precision, self.la.sigma_noise,
            marglik_steps=max(self._config["marglik_steps"] // 2, 1))
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


class ConditionedLaplaceModel(_LinearizedMixin, Model):
    r"""A :class:`LaplaceModel` conditioned on (possibly batched) observations through the exact
    update of its linearized model (GP conditioning with the NTK kernel
    :math:`J\Sigma J^\top`). ``X_cond`` (``batch x n' x d``) is in transformed input space,
    ``Y_cond`` (``batch' x n' x m``) and ``noise`` in transformed outcome space.
    """

    def __init__(
        self, base: LaplaceModel, X_cond: Tensor, Y_cond: Tensor, noise: Tensor | None = None
    ) -> None:
        super().__init__()
        self.base = [base]  # a list: keep the base out of this module's children
        self.la, self.glm, self.theta_bar, self.gp = base.la, base.glm, base.theta_bar, base.gp
        for name in ("input_transform", "outcome_transform"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        try:
            self._batch_shape = torch.broadcast_shapes(X_cond.shape[:-2], Y_cond.shape[:-2])
        except RuntimeError as e:
            raise BotorchTensorDimensionError(
                f"batch shapes of X {tuple(X_cond.shape)} and Y {tuple(Y_cond.shape)} do not "
                "broadcast"
            ) from e
        self.X_cond = X_cond
        self.Y_cond = Y_cond
        self.noise = noise

    @property
    def num_outputs(self) -> int:
        return self.base[0].num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """Conditioned joint posterior at ``X`` (``batch x q x d`` broadcastable with the
        model's batch shape)."""
        self.eval()
        base = self.base[0]
        check_inputs(X, base._input_dim, base.train_X.dtype)
        Xt = self.transform_inputs(X)
        q, d = Xt.shape[-2:]
        n = self.X_cond.shape[-2]
        m = self.num_outputs
        try:
            batch = torch.broadcast_shapes(Xt.shape[:-2], self._batch_shape)
        except RuntimeError as e:
            raise BotorchTensorDimensionError(
                f"X batch shape {tuple(Xt.shape[:-2])} does not broadcast with the model "
                f"batch shape {tuple(self._batch_shape)}"
            ) from e
        Xc = self.X_cond.expand(*batch, n, d)
        Xq = Xt.expand(*batch, q, d)
        pts = torch.cat([Xc, Xq], -2).reshape(-1, n + q, d)
        mu, K = base._moments(pts)  # (T, n+q, m), (T, (n+q)m, (n+q)m)
        nm = n * m
        mu1, mu2 = mu[:, :n].reshape(-1, nm), mu[:, n:].reshape(-1, q * m)
        K11, K12, K22 = K[:, :nm, :nm], K[:, :nm, nm:], K[:, nm:, nm:]
        y = self.Y_cond.expand(*batch, n, m).reshape(-1, nm)
        if self.noise is None:
            nz = self.sigma2.expand(y.shape)
        else:
            nz = self.noise.expand(*batch, n, m).reshape(-1, nm)
        L = psd_safe_cholesky(K11 + torch.diag_embed(nz))
        A = torch.linalg.solve_triangular(L, K12, upper=False)  # (T, nm, qm)
        r = torch.linalg.solve_triangular(L, (y - mu1).unsqueeze(-1), upper=False)
        mean = mu2 + (A.transpose(-1, -2) @ r).squeeze(-1)
        cov = K22 - A.transpose(-1, -2) @ A
        mean = mean.reshape(*batch, q, m)
        cov = cov.reshape(*batch, q * m, q * m)
        obs = expand_noise(observation_noise, self.sigma2, mean.shape)
        if obs is not None:
            cov = cov + torch.diag_embed(obs.reshape(*batch, q * m))
        mvn = make_mvn(mean, cov, output_indices)
        return self._finish(mvn, Xt, posterior_transform, output_indices)

    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> ConditionedLaplaceModel:
        """Condition further (the linearized update is associative: the data are stacked)."""
        base = self.base[0]
        Xt, Yt = base._transform_observations(X, Y, noise)
        batch = torch.broadcast_shapes(self._batch_shape, Xt.shape[:-2], Yt.shape[:-2])
        n0, n1 = self.X_cond.shape[-2], Xt.shape[-2]
        m = self.num_outputs
        Xc = torch.cat([self.X_cond.expand(*batch, n0, Xt.shape[-1]),
                        Xt.expand(*batch, n1, Xt.shape[-1])], -2)
        Yc = torch.cat([self.Y_cond.expand(*batch, n0, m), Yt.expand(*batch, n1, m)], -2)
        nz = None
        if self.noise is not None or noise is not None:
            old = self.noise if self.noise is not None else self.sigma2
            new = noise if noise is not None else self.sigma2
            nz = torch.cat([torch.as_tensor(old).expand(*batch, n0, m),
                            torch.as_tensor(new).expand(*batch, n1, m)], -2)
        return ConditionedLaplaceModel(base, Xc, Yc, nz)
