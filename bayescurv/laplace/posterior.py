r"""Laplace and linearized-Laplace posteriors over any parameter subset.

The posterior is :math:`N(\theta^*, \Lambda^{-1})` with precision
:math:`\Lambda = \frac{1}{\sigma^2_{lik}} H + diag(\delta)`: ``H`` the curvature of the summed
negative log-likelihood at the MAP (computed once by :func:`bayescurv.curvature.compute`;
for regression with unit noise, scaled by :math:`1/\sigma^2`), :math:`\delta` the prior
precision of the zero-mean Gaussian prior (scalar, one per layer, or one per parameter).

A *layer* is a module that owns parameters of the posterior (weight and bias together), so
that a per-layer prior keeps every K-FAC block exactly decomposable.

Precision: for float32/bf16/fp16 models the curvature, the mean, the prior and the noise are
held in float64 (:func:`~bayescurv.linalg.internal_dtype`), so the evidence, its gradient and
the posterior's decompositions carry float64 rounding; what a user reads back (evidence,
variances, samples, hyperparameters) is returned in the model's dtype.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import compute
from bayescurv.curvature.compute import check_options, passes
from bayescurv.curvature.layers import check_modes
from bayescurv.errors import InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.laplace import confidence, marglik, noise, subnetwork
from bayescurv.laplace import prior as priors  # module; `prior` is a common local name
from bayescurv.laplace.predictions import PredictionsMixin
from bayescurv.laplace.state import StateDictMixin
from bayescurv.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    get_likelihood,
    unimplemented,
)
from bayescurv.linalg import PSDOperator, internal_dtype
from bayescurv.params import OutputKey, check_output_key, find_last_layer, select

#: likelihood names ``Laplace`` accepts (canonical names and aliases): all registered but
#: Poisson (a GLM likelihood, :mod:`bayescurv.glm`)
LIKELIHOOD_NAMES = tuple(n for n, cls in LIKELIHOODS.items() if cls is not Poisson)


def _likelihood(likelihood: str | Likelihood, kind: str) -> Likelihood:
    """The posterior's likelihood: one of :data:`LIKELIHOOD_NAMES`, or a copy of a
    :class:`Likelihood` instance that implements what the posterior uses (refused with the
    missing methods named)."""
    lik = get_likelihood(likelihood, accepted=LIKELIHOOD_NAMES, caller="Laplace")
    if not isinstance(likelihood, Likelihood):
        return lik
    needs: list[str | tuple[str, ...]] = ["check", ("log_prob", "nll"), "inverse_link",
                                          "predictive"]
    needs += {"ggn": ["hessian_sqrt"], "ef": ["gradient"],
              "mc": [("sampled_hessian_sqrt", "sample"), ("sampled_hessian_sqrt", "gradient")]
              }.get(kind, [])
    missing = unimplemented(lik, needs)
    if missing:
        raise InvalidArgumentError(
            f"the likelihood {type(lik).__name__} does not implement {', '.join(missing)}, "
            f"which Laplace (kind={kind!r}) needs; implement them in the subclass (see "
            "bayescurv.likelihoods.Likelihood)")
    if lik.name == "regression" and not isinstance(lik, Gaussian):
        raise InvalidArgumentError(
            f"a likelihood named 'regression' must subclass bayescurv.likelihoods.Gaussian "
            f"(Laplace scales its curvature by the observation noise); {type(lik).__name__} "
            "does not. Give it another name")
    return copy.copy(lik)  # sigma_noise is set on it: never change the caller's object


class Laplace(PredictionsMixin, StateDictMixin):
    """Post-hoc Laplace approximation of a trained network.

    Args:
        model: the trained network (its current parameters are the MAP ``θ*``).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"`` (or an alias:
            ``"categorical"``, ``"softmax"``, ``"gaussian"``, ``"bernoulli"``), or a
            :class:`~bayescurv.likelihoods.Likelihood` instance (copied) implementing
            ``check``, ``log_prob`` (or ``nll``), ``inverse_link``, ``predictive`` and what
            ``kind`` needs (``hessian_sqrt`` for ``"ggn"``, ``gradient`` for ``"ef"``,
            ``sample`` and ``gradient`` — or ``sampled_hessian_sqrt`` — for ``"mc"``),
            e.g. ``Poisson()`` or a subclass of one of the library's likelihoods. An instance
            named ``"regression"`` must be a :class:`~bayescurv.likelihoods.Gaussian`.
        subset: ``"all"`` / ``"trainable"`` (every parameter with ``requires_grad``),
            ``"last_layer"``, or a list of parameter / module names and name patterns
            (``"*lora_*"``); see :func:`bayescurv.params.select`.
        structure: ``"full"``, ``"diag"``, ``"kfac"``, ``"kfac-reduce"``, ``"ekfac"``,
            ``"lowrank"`` or ``"diag+lowrank"`` (docs/guide.md: which one when).
        prior_precision: scalar, one value per layer, or one per parameter.
        sigma_noise: observation noise (regression), scalar or one per output; default
            that of a :class:`~bayescurv.likelihoods.Gaussian` instance passed as
            ``likelihood``, else 1.
        kind: curvature kind, ``"ggn"`` (default), ``"mc"`` or ``"ef"``.
        rank: for ``"lowrank"`` / ``"diag+lowrank"``: the number of eigenpairs kept.
        lowrank_method: for ``"lowrank"`` / ``"diag+lowrank"``: how the eigenpairs are found,
            ``"sqrt"``, ``"lanczos"`` or ``"randomized"`` (see :func:`bayescurv.compute`).
        factor_rank: for ``"kfac"`` / ``"kfac-reduce"`` / ``"ekfac"``: keep only the top
            ``factor_rank`` eigenpairs of every larger Kronecker factor (wide layers; the
            discarded directions revert to the prior). See :func:`bayescurv.compute` and
            docs/laplace.md ("Wide layers").
        batch_dim: the dimension of the model's inputs that indexes data points (0, or 1 for
            sequence-first ``(T, B, ...)`` inputs); used by :meth:`fit` and the predictive.
            See :func:`bayescurv.compute` for how each layer's batch dimension follows.
        output_key: how to read the network output when the model returns a tuple, a dict
            or a HuggingFace-style output: a key / index, or a callable ``out -> f``.
        unknown_layers: modules no structured extractor knows that own posterior parameters
            (loose parameters): ``"auto"`` (default, exact), ``"per_sample"`` or
            ``"error"``; see :func:`bayescurv.compute`.

    ``subset="last_layer"`` (without ``last_layer_name``) is resolved at :meth:`fit` from a
    forward pass on the first batch: the module with parameters called last; the choice is
    in :attr:`last_layer_name`. The posterior is tied to the weights it was fitted at
    (:attr:`mean`): predictions refuse to run when the live weights differ (refit, or
    :meth:`restore_map`).

    Usage:

    ```python
    la = Laplace(model, "classification", subset="last_layer", structure="kfac")
    la.fit(train_loader)
    la.optimize_prior_precision()
    probs = la.predict(x_test)
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "classification",
        subset: str | Iterable[str] = "all",
        structure: str = "kfac",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor | None = None,
        *,
        last_layer_name: str | None = None,
        kind: str = "ggn",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        unknown_layers: str = "auto",
        rank: int = 10,
        lowrank_method: str = "sqrt",
        batch_dim: int = 0,
        output_key: OutputKey = None,
        factor_rank: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        check_options(structure, kind, num_samples, rank, lowrank_method, unknown_layers,
                      factor_rank)
        self.likelihood = _likelihood(likelihood, kind)
        if sigma_noise is None:
            sigma_noise = self.likelihood.sigma_noise if isinstance(
                self.likelihood, Gaussian) else 1.0
        self.model = model
        self.structure = structure
        self.kind = kind
        self.num_samples = num_samples
        self.generator = generator
        self.unknown_layers = unknown_layers
        self.batch_dim = batches.check_batch_dim(batch_dim)
        self.curvature_options = {"rank": rank, "lowrank_method": lowrank_method} \
            if structure in ("lowrank", "diag+lowrank") else {}
        if factor_rank is not None:
            self.curvature_options["factor_rank"] = factor_rank
        self.output_key = check_output_key(output_key)
        self.index: Tensor | None = None  # masked subnetwork: flat positions in self.params
        #: the output layer's module name for ``subset="last_layer"`` (else ``None``)
        self.last_layer_name: str | None = last_layer_name
        # "last_layer" without a name: provisional (registration order) until fit() finds it
        # from the forward pass
        self._find_last_layer = isinstance(subset, str) and subset == "last_layer" and (
            last_layer_name is None)
        if subnetwork.is_mask_subset(subset):
            self.params, self.index = subnetwork.parse_masks(model, subset)
            if structure not in subnetwork.MASK_STRUCTURES:
                raise InvalidArgumentError(
                    f"a masked subnetwork supports structure in {subnetwork.MASK_STRUCTURES}, "
                    f"got {structure!r}"
                )
            self.params.output_key = self.output_key
        else:
            if self._find_last_layer:
                self.last_layer_name = find_last_layer(model)
            self.params = select(model, subset, last_layer_name=self.last_layer_name,
                                 output_key=self.output_key)
        self.tuning: marglik.TuningReport | None = None  #: report of the last marglik tuning
        self._use_params()
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self._H: PSDOperator | None = None
        self._H_outputs: list[PSDOperator] | None = None  # per-output noise: [H_c]
        self.mean: Tensor | None = None
        self.loss: Tensor | None = None
        self.num_data = 0
        self.num_outputs = 0

    def _use_params(self) -> None:
        """Set what depends on :attr:`params` (dtype, layer and tensor groupings)."""
        #: dtype of the curvature, mean and hyperparameters (float64 for float32/bf16/fp16)
        self.internal_dtype = internal_dtype(self.params.dtype)
        self.layer_index = priors.layer_index(self.params)
        self.tensor_index = priors.tensor_index(self.params)
        if self.index is not None:
            self.layer_index = self.layer_index[self.index]
            self.tensor_index = self.tensor_index[self.index]

    def _resolve_last_layer(self, loader: Iterable, x_key: str, y_key: str) -> Iterable:
        """Find the output layer from a forward pass on the first batch (``subset=
        "last_layer"``); re-select the parameters when it is not the provisional one."""
        x, loader = batches.peek_inputs(loader, x_key, y_key)
        name = find_last_layer(self.model, x, self.output_key)
        if name != self.last_layer_name:
            self.params = select(self.model, "last_layer", last_layer_name=name,
                                 output_key=self.output_key)
            self._use_params()
            self.last_layer_name = name
            self.prior_precision = self._prior  # re-validated for the new layer
        self._find_last_layer = False
        return loader

    # hyperparameters ---------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Number of parameters in the posterior (entries selected by a mask, if any)."""
        return self.params.numel if self.index is None else self.index.numel()

    @property
    def num_layers(self) -> int:
        """Modules owning posterior parameters (weight and bias of a layer together)."""
        return int(self.layer_index.max()) + 1

    @property
    def num_tensors(self) -> int:
        """Parameter tensors in the posterior (weights and biases apart)."""
        return int(self.tensor_index.max()) + 1

    def prior_groups(self, prior_precision: Tensor | None = None) -> Tensor:
        """``(num_params,)`` group index expanding ``prior_precision`` (default: the current
        one) to the parameters: :attr:`layer_index` or :attr:`tensor_index`."""
        prior = self._prior if prior_precision is None else prior_precision
        return priors.group_index(prior, self.layer_index, self.tensor_index)

    @property
    def prior_precision(self) -> Tensor:
        """Current prior precision: shape ``()``, ``(num_layers,)``, ``(num_tensors,)`` or
        ``(num_params,)`` (a count shared by two groupings is read per layer first), in the
        model's dtype (held in :attr:`internal_dtype`)."""
        return self._prior.to(self.params.dtype)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior = priors.check_prior(value, self.num_params, self.num_layers,
                                         self.internal_dtype, self.params.device,
                                         num_tensors=self.num_tensors)

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise: ``()`` or one value per output ``(C,)``, in the model's dtype."""
        return self._sigma.to(self.params.dtype)

    @property
    def per_output_noise(self) -> bool:
        return self._sigma.numel() > 1

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        s = self.as_internal(value)
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise InvalidArgumentError(f"sigma_noise must be finite and positive, got {value}")
        if self.likelihood.name != "regression" and not torch.all(s == 1):
            raise InvalidArgumentError("sigma_noise applies to likelihood='regression' only")
        if s.dim() > 1:
            raise ShapeError(f"sigma_noise must be a scalar or (outputs,), got {tuple(s.shape)}")
        if hasattr(self, "_sigma") and s.numel() != self._sigma.numel():
            raise ShapeError("sigma_noise cannot change between scalar and per-output after "
                             "construction; build a new Laplace")
        if s.numel() > 1 and self.structure not in noise.PER_OUTPUT_STRUCTURES:
            raise InvalidArgumentError(
                f"per-output sigma_noise needs structure in {noise.PER_OUTPUT_STRUCTURES} (a "
                "per-output weighting breaks the Kronecker factorisation); use a scalar noise "
                f"with structure={self.structure!r}"
            )
        if s.numel() > 1 and self.kind != "ggn":
            raise InvalidArgumentError(
                "per-output sigma_noise needs kind='ggn' (the sampled and empirical Fisher "
                "do not split into per-output terms)"
            )
        if s.numel() > 1 and self.index is not None:
            raise InvalidArgumentError("per-output sigma_noise is not available with masks")
        self._sigma = s
        if isinstance(self.likelihood, Gaussian):
            self.likelihood.sigma_noise = s.detach().to(self.params.dtype)

    def prior_diagonal(self, prior_precision: Tensor | None = None) -> Tensor:
        """The prior precision expanded to ``(num_params,)`` (the current one in
        :attr:`internal_dtype`, a given one in its own dtype)."""
        prior = self._prior if prior_precision is None else prior_precision
        return priors.expand_prior(prior, self.prior_groups(prior))

    # fitting -----------------------------------------------------------------------------
    def fit(
        self,
        loader: Iterable,
        progress: bool = False,
        *,
        x_key: str = "x",
        y_key: str = "y",
    ) -> Laplace:
        """Compute the curvature at the current parameters (the MAP) and store ``θ*``;
        curvature, loss, data count and regression residuals come from one pass over
        ``loader`` (:attr:`passes`; a one-shot iterator works where it is one). Regression
        curvature is computed at unit noise and scaled by ``1/σ²`` afterwards, so ``σ`` can
        be tuned without refitting."""
        if self.passes > 1:
            batches.check_reiterable(loader, f"a {self.likelihood.name} fit with structure="
                                     f"{self.structure!r} ({self.passes} passes)")
        check_modes(self.model)
        if self._find_last_layer:
            loader = self._resolve_last_layer(loader, x_key, y_key)
        if self.likelihood.name != "regression":
            loader = self._keep_inputs(loader, x_key, y_key)
        unit = Gaussian(1.0) if self.likelihood.name == "regression" else self.likelihood
        options = dict(kind=self.kind, num_samples=self.num_samples, generator=self.generator,
                       unknown_layers=self.unknown_layers, x_key=x_key, y_key=y_key,
                       progress=progress)
        if self.index is None:
            curv = compute(self.model, unit, loader, structure=self.structure,
                           subset=self.params, **options, **self.curvature_options,
                           batch_dim=self.batch_dim)
        else:
            if self.batch_dim:
                raise InvalidArgumentError("masked subnetworks need batch_dim=0")
            curv = subnetwork.masked_curvature(self.params, self.index, unit, loader,
                                               self.structure, **options)
        self._H = curv.matrix
        self.mean = self.posterior_entries(self.params.vector()).to(self.internal_dtype)
        self.num_data = curv.num_data
        self.loss = curv.loss
        if isinstance(self.likelihood, Gaussian):
            # per-output sums of squared residuals: log p(D|θ*) for any noise level
            self._sse = curv.sum_of_squares if curv.sum_of_squares is not None else (
                noise.sum_of_squares(self.params, loader, x_key, y_key,
                                     batch_dim=self.batch_dim))
            self.num_outputs = self._sse.numel()
            if self.per_output_noise:
                if self._sigma.numel() != self.num_outputs:
                    raise ShapeError(f"sigma_noise has {self._sigma.numel()} entries but the "
                                     f"network has {self.num_outputs} outputs")
                self._H_outputs = noise.per_output_curvatures(
                    self.params, loader, self.structure, self.num_outputs,
                    batch_dim=self.batch_dim,
                    **{k: v for k, v in options.items() if k != "progress"})
        return self

    @property
    def passes(self) -> int:
        """Passes over the data :meth:`fit` makes (:func:`~bayescurv.curvature.compute.
        passes`); Gaussian per-output noise adds one per output, a masked subnetwork's
        residuals (structures other than ``"diag"``) one."""
        g = isinstance(self.likelihood, Gaussian)
        n = passes(self.structure, self.kind, self.curvature_options.get(
            "lowrank_method", "sqrt"), residuals=g and self.index is None)
        if g and self.per_output_noise:
            n += self._sigma.numel()
        return n + int(g and self.index is not None and self.structure != "diag")

    def check_fitted(self) -> None:
        """Raise :class:`~bayescurv.errors.NotFittedError` before :meth:`fit`."""
        if self._H is None:
            raise NotFittedError("call fit(train_loader) before using the posterior")

    def check_weights(self) -> None:
        """Refuse to predict when the network's live weights are not the posterior mean
        ``θ*`` (changed after fit, or a state dict of another model loaded): the predictive
        would mix the new network with the old covariance. One ``O(P)`` comparison."""
        live = self.posterior_entries(self.params.vector()).to(self.internal_dtype)
        if live.shape != self.mean.shape or not torch.equal(live, self.mean):
            raise InvalidArgumentError(
                "the network's weights are not the ones this posterior was fitted at (they "
                "changed after fit, or load_state_dict restored another posterior); call "
                "la.fit(train_loader) again to refit at the new weights, or la.restore_map() "
                "to write the posterior mean back into the network"
            )

    def restore_map(self) -> Laplace:
        """Write the posterior mean ``θ*`` into the network's parameters (e.g. after
        :meth:`load_state_dict` into a freshly built model, or after the weights were
        changed), so the posterior and the network agree again."""
        self.check_fitted()
        self.params.assign(self.with_posterior_entries(self.mean.to(self.params.dtype),
                                       self.params.vector()))
        return self

    # the posterior -----------------------------------------------------------------------
    @property
    def curvature(self) -> PSDOperator:
        """``H``, the curvature of the summed NLL (unit noise for regression)."""
        self.check_fitted()
        return self._H

    def posterior_precision_at(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> PSDOperator:
        """:math:`\\Lambda = H/\\sigma^2 + diag(\\delta)`, differentiable in both."""
        self.check_fitted()
        prior = self._prior if prior_precision is None else self.as_internal(prior_precision)
        sigma = self._sigma if sigma_noise is None else self.as_internal(sigma_noise)
        h = self._H
        if self.likelihood.name == "regression":
            if self._H_outputs is not None:
                h = noise.combine(self._H_outputs, sigma)
                if self.structure == "full":  # a vector shift keeps the graph through H(σ)
                    prior = priors.expand_prior(prior, self.prior_groups(prior))
            else:
                # GGN and Fisher scale as 1/σ²; the empirical Fisher, a sum of squared
                # gradients (f - y)/σ², as 1/σ⁴
                power = 4 if self.kind == "ef" else 2
                h = h.scale(1.0 / sigma.reshape(()) ** power)
        return priors.add_prior(h, prior, self.prior_groups(prior), self.num_layers)

    @property
    def posterior_precision(self) -> PSDOperator:
        r""":math:`\Lambda` at the current hyperparameters. Cached per (curvature, prior,
        noise) value, so repeated ``predict``/``functional``/``sample`` calls reuse its
        factorization (a full posterior with a per-layer prior needs a Cholesky)."""
        key = (id(self._H), self._prior.detach().clone(), self._sigma.detach().clone())
        cached = getattr(self, "_precision_cache", None)
        if cached is not None and cached[0][0] == key[0] and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[0][1:], key[1:])
        ):
            return cached[1]
        op = self.posterior_precision_at()
        self._precision_cache = (key, op)
        return op

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal posterior variances ``(num_params,)`` (model dtype)."""
        return self.posterior_precision.inv_diagonal().to(self.params.dtype)

    def as_internal(self, value: float | Tensor) -> Tensor:
        """A hyperparameter in :attr:`internal_dtype` (differentiable cast; Python numbers
        are converted directly, never through the default float32)."""
        if not torch.is_tensor(value):
            return torch.as_tensor(value, dtype=self.internal_dtype, device=self.params.device)
        return value.to(device=self.params.device, dtype=self.internal_dtype)

    def log_likelihood_at(self, sigma_noise: Tensor | None = None) -> Tensor:
        """:math:`\\log p(D | \\theta^*)`, differentiable in the observation noise."""
        self.check_fitted()
        if self.likelihood.name != "regression":
            return -self.loss
        s = (self._sigma if sigma_noise is None else self.as_internal(sigma_noise)).reshape(-1)
        s = s.expand(self.num_outputs)
        n, c = self.num_data, self.num_outputs
        return (-0.5 * (self._sse / s**2).sum() - n * torch.log(s).sum()
                - 0.5 * n * c * math.log(2 * math.pi))

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None,
        *, in_internal_dtype: bool = False,
    ) -> Tensor:
        r"""Laplace log evidence, differentiable in ``prior_precision`` and ``sigma_noise``:

        .. math::
            \log p(D) \approx \log p(D|\theta^*) + \log p(\theta^*)
              + \tfrac{P}{2}\log 2\pi - \tfrac12 \log\det\Lambda
            = \log p(D|\theta^*) - \tfrac12 \theta^{*\top} diag(\delta)\, \theta^*
              + \tfrac12 \log\det diag(\delta) - \tfrac12\log\det\Lambda,

        with the zero-mean Gaussian prior :math:`p(\theta) = N(0, diag(\delta)^{-1})`.
        Computed in :attr:`internal_dtype` (float64 for float32/bf16/fp16 models) and
        returned in the model's dtype (``in_internal_dtype=True``: as computed, what the
        tuner's line search uses); gradients reach hyperparameters of either dtype.
        """
        self.check_fitted()
        prior = self._prior if prior_precision is None else priors.check_prior(
            prior_precision, self.num_params, self.num_layers, self.internal_dtype,
            self.params.device, allow_grad=True, num_tensors=self.num_tensors)
        sigma = self._sigma if sigma_noise is None else self.as_internal(sigma_noise)
        lam = self.posterior_precision_at(prior, sigma)
        lml = (
            self.log_likelihood_at(sigma)
            + priors.log_prior(prior, self.mean, self.prior_groups(prior))
            - 0.5 * lam.logdet()
        )
        return lml if in_internal_dtype else lml.to(self.params.dtype)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        granularity: str = "scalar",
        *,
        n_steps: int = 100,
        lr: float | None = None,
        tune_sigma_noise: bool = False,
        verbose: bool = False,
        val_loader: Iterable | None = None,
        metric: str | Callable = "nll",
        grid: Tensor | None = None,
        link: str | None = None,
        tol: float = 1e-4,
        x_key: str = "x",
        y_key: str = "y",
    ) -> Tensor:
        """Tune the prior precision (and, with ``tune_sigma_noise``, the observation noise) by
        maximizing :meth:`log_marginal_likelihood` (``method="marglik"``: a coarse log-grid
        start for a scalar prior, then L-BFGS on the log-hyperparameters with at most
        ``n_steps`` iterations, stopping when the largest gradient entry is below ``tol``;
        a :class:`~bayescurv.errors.ConvergenceWarning` when it is not, and the report in
        :attr:`tuning`), or by a grid search over a scalar prior precision on
        ``val_loader`` (``method="gridsearch"``) minimizing ``metric``: ``"nll"`` (predictive
        NLL; for regression the Gaussian predictive NLL, which depends on the prior, unlike
        the RMSE), ``"ece"``, ``"brier"``, or a callable ``(prediction, y) -> float`` (lower is
        better). ``grid`` defaults to ``logspace(-4, 4, 21)``; every grid point is evaluated
        from the same fitted curvature, and the prior is set to the best one.

        ``granularity``: ``"scalar"`` (one), ``"layer"`` (one per layer: weight and bias of
        a module share it), ``"tensor"`` (one per parameter tensor: weights and biases apart,
        laplace-torch's "layerwise"; diag, full and low-rank structures, and K-FAC/EKFAC
        posteriors whose layers hold one tensor each), ``"parameter"`` (one per parameter;
        diag and full structures only). The curvature is decomposed once;
        each step then costs ``O(P)`` for diag, K-FAC and EKFAC and for full with a scalar
        prior (a full posterior with a non-scalar prior needs a Cholesky per step).
        Returns the tuned prior precision (also stored).

        ``lr`` is deprecated and ignored (it was Adam's step size; L-BFGS needs none).
        """
        self.check_fitted()
        if lr is not None:
            warnings.warn("optimize_prior_precision(lr=...) is deprecated and ignored: the "
                          "tuner is L-BFGS with a line search", FutureWarning, stacklevel=2)
        if method == "gridsearch":
            if val_loader is None:
                raise InvalidArgumentError("method='gridsearch' needs a val_loader")
            if granularity != "scalar":
                raise InvalidArgumentError("method='gridsearch' tunes a scalar prior precision")
            prior = marglik.gridsearch(self, val_loader, metric, grid, link, verbose,
                                       x_key=x_key, y_key=y_key)
            self._check_confidence()
            return prior
        if method != "marglik":
            raise InvalidArgumentError(
                f"unknown method {method!r}; use 'marglik' or 'gridsearch'"
            )
        prior, self.tuning = marglik.optimize(self, granularity, n_steps, tune_sigma_noise,
                                              verbose, tol=tol)
        self._check_confidence()
        return prior

    def _keep_inputs(self, loader: Iterable, x_key: str, y_key: str) -> Iterable:
        """Keep a few training inputs for :meth:`_check_confidence`
        (:func:`~bayescurv.laplace.confidence.tap_inputs`)."""
        return confidence.tap_inputs(loader, self.batch_dim, x_key, y_key,
                                     lambda x: setattr(self, "_kept_inputs", x))

    def _check_confidence(self) -> None:
        """After tuning a classification posterior: warn when the predictive on the kept
        training inputs is far less confident than the MAP (:mod:`~bayescurv.laplace.
        confidence`)."""
        x = getattr(self, "_kept_inputs", None)
        if x is None or not isinstance(self.likelihood, (Categorical, Bernoulli)):
            return  # a confidence (largest class probability) exists for classifiers only
        x = self._inputs(x)
        with torch.no_grad():
            f = self.likelihood.check_outputs(self.params.forward(x))
            map_probs = self.likelihood.inverse_link(f)
            if isinstance(self.likelihood, Bernoulli):
                map_probs = map_probs.squeeze(-1)
            confidence.warn_if_underconfident(map_probs, self.predict(x))

    def posterior_entries(self, full: Tensor) -> Tensor:
        """The posterior's entries of a full flat vector of ``self.params``."""
        return full if self.index is None else full[self.index]

    def with_posterior_entries(self, theta: Tensor, full: Tensor) -> Tensor:
        """A full flat vector with the posterior's entries replaced by ``theta``."""
        if self.index is None:
            return theta
        out = full.clone()
        out[self.index] = theta.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return (f"Laplace(likelihood={self.likelihood.name!r}, structure={self.structure!r}, "
                f"num_params={self.num_params}, fitted={self._H is not None})")
