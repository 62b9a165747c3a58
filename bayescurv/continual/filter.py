r"""Laplace filtering over a sequence of tasks.

The weights follow the state-space model of :class:`~bayescurv.continual.Transition`; task
``t`` observes its data set :math:`\mathcal D_t` through the network's likelihood. The
filter keeps a Gaussian :math:`N(m, \Lambda^{-1})` over the weights:

- ``predict()`` — :math:`m^- = A m`, :math:`\Lambda^- = \gamma (A\Lambda^{-1}A + Q)^{-1}`
  (exact for the diagonal-plus-low-rank precision, :mod:`bayescurv.continual.gaussian`);
  the first call returns the prior :math:`N(m_0, \Lambda_0^{-1})`;
- training with ``loss = task_nll_sum + filter.penalty(model)``, the negative log of the
  predicted density, :math:`\tfrac12 (\theta - m^-)^\top \Lambda^- (\theta - m^-)`, finds
  the MAP :math:`\theta^*_t` (a mean NLL pairs with ``penalty(model) / N``);
- ``update(data)`` — Laplace at the mode: :math:`m = \theta^*_t`,
  :math:`\Lambda = \Lambda^- + G_t(\theta^*_t)` with :math:`G_t` the GGN of the task's
  summed NLL, kept as diagonal plus rank ``k``.

Special cases: ``rank=0`` with the exact GGN diagonal, ``A = I``, ``Q = 0`` is online EWC /
the diagonal online Laplace (Schwarz et al. 2018; Ritter et al. 2018), with
:math:`\Lambda_T = \Lambda_0 + \sum_t \mathrm{diag}\, G_t(\theta^*_t)` and penalty centred at
the last MAP; ``decay`` is EWC's γ. :class:`KFACFilter` is the K-FAC online Laplace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.batches import peek_inputs
from bayescurv.continual.curvature import EIGENSOLVERS, task_curvature
from bayescurv.continual.dynamics import Transition, check_finite_positive
from bayescurv.continual.evidence import EvidenceNoise, evidence_noise
from bayescurv.continual.gaussian import add_low_rank, predict_precision
from bayescurv.continual.smoother import FilterStep, SmootherResult, rts_smooth
from bayescurv.errors import BayesCurvError, InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.linalg import LowRankPlusDiagonal
from bayescurv.params import OutputKey, ParamSet, check_output_key, select

CURVATURE_KINDS = ("ggn", "ef")

__all__ = ["LaplaceFilter", "DiagonalFilter"]


# ------------------------------------------------------------------------------------------
# shared plumbing
# ------------------------------------------------------------------------------------------
class _TaskSequence:
    """Parameter bookkeeping and phase checks shared by the filters."""

    def __init__(self, model: nn.Module, likelihood: str | Likelihood, subset: Any,
                 output_key: OutputKey = None) -> None:
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.subset = subset
        output_key = check_output_key(output_key)
        if isinstance(subset, ParamSet):
            self.params = subset if output_key is None else dataclasses.replace(
                subset, output_key=output_key)
        else:
            self.params = select(model, subset, output_key=output_key)
        self._signature = [(n, tuple(p.shape)) for n, p in zip(self.params.names,
                                                                self.params.params)]
        self._phase = "start"  # start -> predicted -> filtered -> predicted -> ...
        self._input_shape: tuple[int, ...] | None = None  # per-example inputs of the tasks
        self._candidate_shape: tuple[int, ...] | None = None

    @property
    def num_params(self) -> int:
        return self.params.numel

    def _params_of(self, model: nn.Module | None, where: str) -> ParamSet:
        """The parameter set of ``model`` (default: the filter's), checked against the first."""
        if model is None or model is self.model:
            return self.params
        subset = self.subset if not isinstance(self.subset, ParamSet) else self.params.names
        pset = select(model, subset, output_key=self.params.output_key)
        sig = [(n, tuple(p.shape)) for n, p in zip(pset.names, pset.params)]
        if sig != self._signature:
            diff = [(a, b) for a, b in zip(self._signature, sig) if a != b][:3]
            raise ShapeError(
                f"{where}: the model does not match the one the filter was built for "
                f"({len(self._signature)} parameters / P={self.params.numel} before, "
                f"{len(sig)} / P={pset.numel} now; first differences (before, now): {diff}). "
                "Every task must use the same architecture and parameter subset."
            )
        return pset

    def _check_data(self, data: Iterable[Any], where: str) -> Iterable[Any]:
        """``data`` (re-chained when one-shot), its first batch's inputs checked against the
        per-example shape of the earlier tasks' inputs."""
        x, data = peek_inputs(data)
        if isinstance(x, Tensor):
            shape = tuple(x.shape[1:])
            if self._input_shape is not None and shape != self._input_shape:
                raise ShapeError(
                    f"{where}: the data's inputs have per-example shape {shape}, but the filter "
                    f"was built on inputs of shape {self._input_shape} (earlier tasks); every "
                    "task must feed the same model the same input layout"
                )
            self._candidate_shape = shape  # recorded once a pass over the data succeeds
        return data

    @contextmanager
    def _data_pass(self, where: str) -> Iterator[None]:
        """Re-raise torch's shape errors from a pass of the model over the data as a
        library :class:`~bayescurv.errors.ShapeError` that names the problem."""
        try:
            yield
            if self._input_shape is None:
                self._input_shape = self._candidate_shape
        except RuntimeError as err:
            if isinstance(err, BayesCurvError) or not any(
                    w in str(err) for w in ("shape", "size", "dimension")):
                raise
            raise ShapeError(
                f"{where}: the model cannot run on the data (inputs of per-example shape "
                f"{self._candidate_shape}): {err}. Give the data the model "
                "was built for."
            ) from err

    def _require(self, phase: str, what: str) -> None:
        if self._phase != phase:
            hint = {
                "predicted": "call predict() at the start of each task",
                "filtered": "call update(data) after training on the task",
            }[phase]
            raise NotFittedError(f"{what} needs the filter in the {phase!r} phase: {hint}")

    @staticmethod
    def _theta(pset: ParamSet) -> Tensor:
        """The flat parameters, differentiable."""
        return torch.cat([p.reshape(-1) for p in pset.params])


def _prior_mean(prior_mean: Any, params: ParamSet) -> Tensor:
    if prior_mean is None:
        return torch.zeros(params.numel, dtype=params.dtype, device=params.device)
    if isinstance(prior_mean, str):
        if prior_mean != "init":
            raise InvalidArgumentError(f"prior_mean must be None, 'init' or a tensor, got "
                                       f"{prior_mean!r}")
        return params.vector().clone()
    m = torch.as_tensor(prior_mean, dtype=params.dtype, device=params.device)
    if m.shape != (params.numel,):
        raise ShapeError(f"prior_mean must have shape ({params.numel},), got {tuple(m.shape)}")
    return m.clone()


def _prior_precision(prior_precision: float | Tensor, params: ParamSet) -> Tensor:
    if isinstance(prior_precision, Tensor) and prior_precision.numel() > 1:
        d = prior_precision.detach().to(dtype=params.dtype, device=params.device)
        if d.shape != (params.numel,):
            raise ShapeError(f"prior_precision must be a scalar or ({params.numel},), got "
                             f"{tuple(d.shape)}")
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise InvalidArgumentError("prior_precision must be finite and > 0 everywhere")
        return d.clone()
    delta = check_finite_positive(float(prior_precision), "prior_precision")
    return torch.full((params.numel,), delta, dtype=params.dtype, device=params.device)


# ------------------------------------------------------------------------------------------
# diagonal-plus-low-rank Laplace filter
# ------------------------------------------------------------------------------------------
class LaplaceFilter(_TaskSequence):
    r"""Laplace filter and RTS smoother with a diagonal-plus-rank-``k`` precision.

    Args:
        model: the network (every task uses this architecture and parameter subset).
        likelihood: ``"classification"``, ``"regression"``, ... or a
            :class:`~bayescurv.likelihoods.Likelihood` (e.g. ``Gaussian(sigma_noise)``).
        rank: ``k``, the rank kept in the precision (``0 ≤ k ≤ P``; ``0``: diagonal filter).
        prior_precision: ``Λ_0``, a number or ``(P,)``.
        prior_mean: ``m_0``: ``None`` (zeros), ``"init"`` (the current weights) or ``(P,)``.
        transition: the :class:`Transition` between tasks (default: ``A = I``, ``Q = 0``).
        subset: which parameters (``"all"``, ``"last_layer"``, names, a ParamSet).
        curvature_rank: eigen-directions taken from each task's GGN (default ``rank``).
        add_diagonal: also add the exact diagonal of the part of the GGN not in the top
            eigen-directions (so the GGN's diagonal is added exactly).
        fold_residual: fold the diagonal of what the re-truncation to rank ``k`` discards
            into ``D`` (keeps ``diag Λ`` exact); otherwise drop it (``Λ_kept ⪯ Λ``).
        eigensolver: see :func:`task_curvature`.
        kind: see :func:`task_curvature`.
        generator: see :func:`task_curvature`.
        eigensolver_options: ``{"oversample": int, "power_iters": int}`` for the randomized
            eigensolver (defaults 10 and 3).
        output_key: how to read the network output when the model returns a tuple, a dict
            or a HuggingFace-style output (:data:`~bayescurv.params.OutputKey`); default the
            ``output_key`` of a ``ParamSet`` given as ``subset``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        *,
        rank: int = 20,
        prior_precision: float | Tensor = 1.0,
        prior_mean: Tensor | str | None = None,
        transition: Transition | None = None,
        subset: Any = "all",
        curvature_rank: int | None = None,
        add_diagonal: bool = True,
        fold_residual: bool = True,
        eigensolver: str = "randomized",
        kind: str = "ggn",
        generator: torch.Generator | None = None,
        eigensolver_options: dict[str, int] | None = None,
        output_key: OutputKey = None,
    ) -> None:
        super().__init__(model, likelihood, subset, output_key)
        P = self.params.numel
        self.eigensolver_options = dict(eigensolver_options or {})
        unknown = set(self.eigensolver_options) - {"oversample", "power_iters"}
        if unknown:
            raise InvalidArgumentError(f"unknown eigensolver_options {sorted(unknown)}; use "
                                       "'oversample' and 'power_iters'")
        for name, value in (("rank", rank), ("curvature_rank", curvature_rank)):
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"{name} must be an int >= 0, got {value!r}")
            if value > P:
                raise InvalidArgumentError(
                    f"{name}={value} exceeds the number of parameters P={P}; use {name} <= {P}"
                )
        if eigensolver not in EIGENSOLVERS:
            raise InvalidArgumentError(f"eigensolver must be one of {EIGENSOLVERS}, got "
                                       f"{eigensolver!r}")
        if kind not in CURVATURE_KINDS:
            raise InvalidArgumentError(f"kind must be one of {CURVATURE_KINDS}, got {kind!r}")
        self.rank = rank
        self.curvature_rank = rank if curvature_rank is None else curvature_rank
        if self.curvature_rank == 0 and not add_diagonal:
            raise InvalidArgumentError("rank 0 without add_diagonal adds no curvature at all; "
                                       "set add_diagonal=True (diagonal filter) or rank > 0")
        self.add_diagonal = add_diagonal
        self.fold_residual = fold_residual
        self.eigensolver = eigensolver
        self.kind = kind
        self.generator = generator
        transition = transition if transition is not None else Transition()
        if not isinstance(transition, Transition):
            raise InvalidArgumentError(f"transition must be a Transition, got "
                                       f"{type(transition).__name__}")
        dt, dev = self.params.dtype, self.params.device
        self.noise_rule: EvidenceNoise | None = None
        if isinstance(transition.noise, EvidenceNoise):
            self.noise_rule = transition.noise
            self.noise_rule.mask(self.params)  # validate the layer names early
            transition = dataclasses.replace(transition, noise=0.0)
        self.transition = transition
        self.transition.resolve(self.params)  # validate early
        #: ``q`` of the next predict (re-estimated by every update under ``EvidenceNoise``)
        self.noise = torch.zeros(P, dtype=dt, device=dev)
        self.prior_mean = _prior_mean(prior_mean, self.params)
        self.prior = LowRankPlusDiagonal(torch.zeros(P, 0, dtype=dt, device=dev),
                                         torch.zeros(0, dtype=dt, device=dev),
                                         _prior_precision(prior_precision, self.params))
        self.steps: list[FilterStep] = []
        self._pending: tuple[Tensor, LowRankPlusDiagonal, Tensor] | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_tasks(self) -> int:
        """Number of tasks filtered so far."""
        return len(self.steps)

    @property
    def mean(self) -> Tensor:
        """Current mean: predicted during a task, filtered after ``update``."""
        if self._phase == "predicted":
            return self._pending[0]
        return self.steps[-1].mean if self.steps else self.prior_mean

    @property
    def precision(self) -> LowRankPlusDiagonal:
        """Current precision (predicted during a task, filtered after ``update``)."""
        if self._phase == "predicted":
            return self._pending[1]
        return self.steps[-1].precision if self.steps else self.prior

    def memory_bytes(self) -> int:
        """Bytes of the current state (mean, ``U``, ``s``, ``d``)."""
        prec = self.precision
        tensors = (self.mean, prec.U, prec.s, prec.d)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ filter
    @torch.no_grad()
    def predict(self, transition: Transition | None = None) -> tuple[Tensor, LowRankPlusDiagonal]:
        """Start a task: ``(m⁻, Λ⁻)`` (the prior for the first task). ``transition``
        overrides the filter's transition for this step only (under ``EvidenceNoise`` the
        noise is the latest evidence estimate :attr:`noise`)."""
        if self._phase == "predicted":
            raise NotFittedError("predict() was already called for this task; train, then call "
                                 "update(data) before the next predict()")
        if transition is not None and (not isinstance(transition, Transition)
                                       or isinstance(transition.noise, EvidenceNoise)):
            raise InvalidArgumentError(
                "predict(transition) takes a Transition with a fixed noise; pass "
                "EvidenceNoise to the filter's constructor instead"
            )
        P = self.params.numel
        if not self.steps:
            mean, prec = self.prior_mean, self.prior
            a = torch.ones(P, dtype=self.params.dtype, device=self.params.device)
        else:
            step = transition or self.transition
            if self.noise_rule is not None and transition is None:
                step = dataclasses.replace(step, noise=self.noise)
            a, q, decay = step.resolve(self.params)
            last = self.steps[-1]
            mean = a * last.mean
            prec = predict_precision(last.precision, a, q, decay)
        self._pending = (mean, prec, a)
        self._phase = "predicted"
        return mean, prec

    def penalty(self, model: nn.Module | None = None) -> Tensor:
        r""":math:`\tfrac12 (\theta - m^-)^\top \Lambda^- (\theta - m^-)` at the model's current
        weights, differentiable (``O(P k)``).

        Raises:
            ShapeError: ``model``'s parameters differ from those the filter was built for.
        """
        self._require("predicted", "penalty()")
        pset = self._params_of(model, "penalty()")
        theta = self._theta(pset)
        mean, prec, _ = self._pending
        diff = theta - mean.to(theta)
        proj = prec.U.to(theta).mT @ diff
        return 0.5 * ((prec.d.to(theta) * diff.square()).sum()
                      + (prec.s.to(theta) * proj.square()).sum())

    def update(self, data: Iterable[Any], model: nn.Module | None = None) -> FilterStep:
        """End a task: Laplace at the model's current (trained) weights on ``data``."""
        self._require("predicted", "update()")
        pset = self._params_of(model, "update()")
        data = self._check_data(data, "update()")
        mean_pred, prec_pred, a = self._pending
        with self._data_pass("update()"):
            V, g, resid = task_curvature(
                pset.model, self.likelihood, data, pset, rank=self.curvature_rank,
                diagonal=self.add_diagonal, eigensolver=self.eigensolver, kind=self.kind,
                generator=self.generator, **self.eigensolver_options,
            )
        with torch.no_grad():
            if self.noise_rule is not None and self.steps:
                prec_pred = self._evidence_prior(pset, V, g, resid, a)
            prec, discarded = add_low_rank(prec_pred, V, g, resid, rank=self.rank,
                                           fold=self.fold_residual)
            step = FilterStep(mean_pred, prec_pred, pset.vector().clone(), prec, a, discarded)
        self.steps.append(step)
        self._pending = None
        self._phase = "filtered"
        return step

    def _evidence_prior(self, pset: ParamSet, V: Tensor, g: Tensor, resid: Tensor | None,
                        a: Tensor) -> LowRankPlusDiagonal:
        """Re-estimate ``q`` by the evidence of this task (:mod:`~bayescurv.continual.evidence`)
        and return the predicted precision under it (also the next task's noise)."""
        last = self.steps[-1]
        curv = V.square() @ g + (0 if resid is None else resid)
        q = evidence_noise(self.noise_rule, pset, pset.vector() - a * last.mean,
                           last.precision.diagonal(), curv, a)
        self.noise = q
        _, _, decay = self.transition.resolve(self.params)
        return predict_precision(last.precision, a, q, decay)

    # ------------------------------------------------------------------ smoother
    def smooth(self) -> SmootherResult:
        """RTS smoother over all filtered tasks; ``result.means[t]`` are task ``t``'s weights."""
        if self._phase == "predicted":
            raise NotFittedError("smooth() during a task: call update(data) first")
        return rts_smooth(self.steps)

    @torch.no_grad()
    def assign(self, model: nn.Module | None, weights: Tensor) -> None:
        """Write a flat weight vector (e.g. ``smooth().means[t]``) into ``model``."""
        self._params_of(model, "assign()").assign(weights)


class DiagonalFilter(LaplaceFilter):
    """``LaplaceFilter`` with ``rank=0``: a diagonal precision from the exact GGN diagonal.
    With ``A = I``, ``Q = 0`` it is online EWC (``transition=Transition(decay=γ)``)."""

    def __init__(self, model: nn.Module, likelihood: str | Likelihood, **kwargs: Any) -> None:
        kwargs.setdefault("rank", 0)
        if kwargs["rank"] != 0:
            raise InvalidArgumentError("DiagonalFilter has rank 0; use LaplaceFilter for rank > 0")
        kwargs["add_diagonal"] = True
        super().__init__(model, likelihood, **kwargs)
