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
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.continual.curvature import EIGENSOLVERS, task_curvature
from bayescurv.continual.dynamics import Transition
from bayescurv.continual.evidence import EvidenceNoise, evidence_noise
from bayescurv.continual.gaussian import add_low_rank, predict_precision
from bayescurv.continual.sequence import TaskSequence, prior_mean_vector, prior_precision_vector
from bayescurv.continual.smoother import FilterStep, SmootherResult, rts_smooth
from bayescurv.errors import InvalidArgumentError, NotFittedError
from bayescurv.likelihoods import Likelihood
from bayescurv.linalg import LowRankPlusDiagonal
from bayescurv.params import OutputKey, ParamSet

CURVATURE_KINDS = ("ggn", "ef")

__all__ = ["LaplaceFilter", "DiagonalFilter"]


# ------------------------------------------------------------------------------------------
# diagonal-plus-low-rank Laplace filter
# ------------------------------------------------------------------------------------------
class LaplaceFilter(TaskSequence):
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
        self.prior_mean = prior_mean_vector(prior_mean, self.params)
        self.prior = LowRankPlusDiagonal(torch.zeros(P, 0, dtype=dt, device=dev),
                                         torch.zeros(0, dtype=dt, device=dev),
                                         prior_precision_vector(prior_precision, self.params))
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
