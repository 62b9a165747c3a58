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

from bayescurv.continual.dynamics import Transition, check_finite_positive
from bayescurv.continual.gaussian import add_low_rank, predict_precision
from bayescurv.continual.smoother import FilterStep, SmootherResult, rts_smooth
from bayescurv.curvature import compute
from bayescurv.curvature.eigen import lanczos_topk, randomized_eigh
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.errors import InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.linalg import (
    BlockDiagonal,
    KroneckerBatch,
    KroneckerEigen,
    LowRankPlusDiagonal,
    robust_eigh,
)
from bayescurv.params import OutputKey, ParamSet, check_output_key, select

EIGENSOLVERS = ("randomized", "lanczos", "dense")
CURVATURE_KINDS = ("ggn", "ef")

__all__ = ["LaplaceFilter", "DiagonalFilter", "KFACFilter", "task_curvature", "EIGENSOLVERS"]


# ------------------------------------------------------------------------------------------
# the task curvature
# ------------------------------------------------------------------------------------------
def task_curvature(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable[Any],
    params: ParamSet,
    *,
    rank: int,
    diagonal: bool = True,
    eigensolver: str = "randomized",
    kind: str = "ggn",
    generator: torch.Generator | None = None,
    oversample: int = 10,
    power_iters: int = 3,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Top-``rank`` eigenpairs ``(V, g)`` of the task curvature ``G`` (summed over ``data``)
    and, with ``diagonal=True``, the residual diagonal ``max(diag(G) − diag(V g Vᵀ), 0)``
    (exact ``diag(G)`` from :func:`~bayescurv.curvature.compute`), so that
    ``V diag(g) Vᵀ + diag(r)`` has the exact diagonal of ``G``.

    ``eigensolver``: ``"randomized"`` (block subspace iteration, ``power_iters + 2`` passes
    over the data), ``"lanczos"`` (``≈ 2 rank + 20`` passes) — both on the matrix-free
    :class:`~bayescurv.curvature.matfree.CurvatureLinearOperator` — or ``"dense"`` (the full
    ``P x P`` GGN and ``eigh``; small nets only, exact).
    """
    P = params.numel
    dt, dev = params.dtype, params.device
    V = torch.zeros(P, 0, dtype=dt, device=dev)
    g = torch.zeros(0, dtype=dt, device=dev)
    dense = None
    if rank > 0:
        if eigensolver == "dense":
            dense = compute(model, likelihood, data, structure="full", kind=kind,
                            subset=params).matrix.to_dense()
            evals, evecs = robust_eigh(0.5 * (dense + dense.mT), "task GGN")
            g, V = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
        else:
            op = CurvatureLinearOperator(model, likelihood, data, params, kind=kind)
            if eigensolver == "lanczos":
                g, V = lanczos_topk(op, P, rank, generator=generator)
            else:
                g, V = randomized_eigh(op, P, rank, oversample=oversample,
                                       power_iters=power_iters, generator=generator)
        g = g.clamp_min(0)
    resid = None
    if diagonal:
        if dense is not None:
            diag = dense.diagonal()
        else:
            diag = compute(model, likelihood, data, structure="diag", kind=kind,
                           subset=params).matrix.diagonal()
        resid = (diag - V.square() @ g).clamp_min(0)
    return V.detach(), g.detach(), None if resid is None else resid.detach()


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
        self.transition = transition if transition is not None else Transition()
        self.transition.resolve(self.params)  # validate early
        dt, dev = self.params.dtype, self.params.device
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
        overrides the filter's transition for this step only."""
        if self._phase == "predicted":
            raise NotFittedError("predict() was already called for this task; train, then call "
                                 "update(data) before the next predict()")
        P = self.params.numel
        if not self.steps:
            mean, prec = self.prior_mean, self.prior
            a = torch.ones(P, dtype=self.params.dtype, device=self.params.device)
        else:
            a, q, decay = (transition or self.transition).resolve(self.params)
            last = self.steps[-1]
            mean = a * last.mean
            prec = predict_precision(last.precision, a, q, decay)
        self._pending = (mean, prec, a)
        self._phase = "predicted"
        return mean, prec

    def penalty(self, model: nn.Module | None = None) -> Tensor:
        r""":math:`\tfrac12 (\theta - m^-)^\top \Lambda^- (\theta - m^-)` at the model's current
        weights, differentiable (``O(P k)``)."""
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
        mean_pred, prec_pred, a = self._pending
        V, g, resid = task_curvature(
            pset.model, self.likelihood, data, pset, rank=self.curvature_rank,
            diagonal=self.add_diagonal, eigensolver=self.eigensolver, kind=self.kind,
            generator=self.generator, **self.eigensolver_options,
        )
        with torch.no_grad():
            prec, discarded = add_low_rank(prec_pred, V, g, resid, rank=self.rank,
                                           fold=self.fold_residual)
            step = FilterStep(mean_pred, prec_pred, pset.vector().clone(), prec, a, discarded)
        self.steps.append(step)
        self._pending = None
        self._phase = "filtered"
        return step

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


# ------------------------------------------------------------------------------------------
# K-FAC online Laplace
# ------------------------------------------------------------------------------------------
class KFACFilter(_TaskSequence):
    r"""Online Laplace with K-FAC task curvatures (Ritter et al., 2018).

    The precision is :math:`\Lambda_T = \gamma^{T-1}\Lambda_0 + \sum_t \gamma^{T-t} K_t` with
    :math:`K_t` the K-FAC GGN of task ``t`` at its MAP — a :class:`BlockDiagonal` of
    per-layer :class:`KroneckerEigen` blocks (:func:`~bayescurv.curvature.compute`,
    ``structure="kfac"``). The only approximation is K-FAC per task: the sum over tasks is
    kept exactly as a list of terms (memory grows with ``T``; a product costs ``T`` K-FAC
    products), because a sum of Kronecker products is not one. Between tasks only
    ``A = I``, ``Q = 0`` and the decay ``γ`` are supported (``(Σ_t K_t)⁻¹ + Q`` has no
    Kronecker form), so the smoother would return the last MAP for every task.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        *,
        prior_precision: float = 1.0,
        prior_mean: Tensor | str | None = None,
        transition: Transition | None = None,
        subset: Any = "all",
        kind: str = "ggn",
        output_key: OutputKey = None,
    ) -> None:
        super().__init__(model, likelihood, subset, output_key)
        transition = transition if transition is not None else Transition()
        if not (isinstance(transition.scale, (int, float)) and float(transition.scale) == 1.0
                and isinstance(transition.noise, (int, float))
                and float(transition.noise) == 0.0):
            raise InvalidArgumentError(
                "KFACFilter supports A = I and Q = 0 (with a decay γ) only: the predicted "
                "precision ((Σ K_t)⁻¹ + Q)⁻¹ has no Kronecker form. Use LaplaceFilter for drift."
            )
        _, _, self.decay = transition.resolve(self.params)
        if kind not in ("ggn", "ef", "mc"):
            raise InvalidArgumentError(f"kind must be 'ggn', 'mc' or 'ef', got {kind!r}")
        self.kind = kind
        self.prior_precision = check_finite_positive(prior_precision, "prior_precision")
        self.prior_mean = _prior_mean(prior_mean, self.params)
        self.terms: list[BlockDiagonal] = []
        self.weights: list[float] = []  # γ^{T-t} per term
        self.prior_weight = 1.0
        self.means: list[Tensor] = []

    @property
    def num_tasks(self) -> int:
        return len(self.means)

    @property
    def mean(self) -> Tensor:
        return self.means[-1] if self.means else self.prior_mean

    def precision_matvec(self, v: Tensor) -> Tensor:
        """``Λ v`` of the current (predicted) precision."""
        out = (self.prior_weight * self.prior_precision) * v
        for w, K in zip(self.weights, self.terms):
            out = out + w * K.matvec(v)
        return out

    def to_dense(self) -> Tensor:
        """The dense precision (small models / tests)."""
        eye = torch.eye(self.num_params, dtype=self.params.dtype, device=self.params.device)
        return self.precision_matvec(eye)

    def memory_bytes(self) -> int:
        """Bytes of the stored K-FAC eigenbases and eigenvalues plus the mean."""
        total = self.mean.numel() * self.mean.element_size()
        for K in self.terms:
            for b in K.blocks:
                if not isinstance(b, (KroneckerEigen, KroneckerBatch)):
                    total += b.size * b.size * b.to_dense().element_size()
                    continue
                # a diagonal factor (embedding counts) stores no eigenbasis
                bases = [q for q, diag in zip(("QA", "QB"), b.diagonal_factors) if not diag]
                for t in [getattr(b, q) for q in bases] + [b.base_eigenvalues]:
                    total += t.numel() * t.element_size()
        return total

    def predict(self) -> Tensor:
        """Start a task: decay the precision by ``γ`` (not for the first task)."""
        if self._phase == "predicted":
            raise NotFittedError("predict() was already called for this task")
        if self.means and self.decay != 1.0:
            self.prior_weight *= self.decay
            self.weights = [w * self.decay for w in self.weights]
        self._phase = "predicted"
        return self.mean

    def penalty(self, model: nn.Module | None = None) -> Tensor:
        r""":math:`\tfrac12 (\theta - m)^\top \Lambda (\theta - m)`, differentiable."""
        self._require("predicted", "penalty()")
        theta = self._theta(self._params_of(model, "penalty()"))
        diff = theta - self.mean.to(theta)
        return 0.5 * (diff * self.precision_matvec(diff)).sum()

    def update(self, data: Iterable[Any], model: nn.Module | None = None) -> BlockDiagonal:
        """End a task: add the K-FAC GGN of ``data`` at the current weights."""
        self._require("predicted", "update()")
        pset = self._params_of(model, "update()")
        K = compute(pset.model, self.likelihood, data, structure="kfac", kind=self.kind,
                    subset=pset).matrix
        self.terms.append(K)
        self.weights.append(1.0)
        self.means.append(pset.vector().clone())
        self._phase = "filtered"
        return K
