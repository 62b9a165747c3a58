"""K-FAC online Laplace (Ritter et al., 2018): the precision as the exact sum of per-task
K-FAC GGNs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.continual.dynamics import Transition, check_finite_positive
from bayescurv.continual.sequence import TaskSequence, prior_mean_vector
from bayescurv.curvature import compute
from bayescurv.errors import InvalidArgumentError, NotFittedError
from bayescurv.likelihoods import Likelihood
from bayescurv.linalg import BlockDiagonal, KroneckerBatch, KroneckerEigen
from bayescurv.params import OutputKey

__all__ = ["KFACFilter"]


# ------------------------------------------------------------------------------------------
# K-FAC online Laplace
# ------------------------------------------------------------------------------------------
class KFACFilter(TaskSequence):
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
        self.prior_mean = prior_mean_vector(prior_mean, self.params)
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
        data = self._check_data(data, "update()")
        with self._data_pass("update()"):
            K = compute(pset.model, self.likelihood, data, structure="kfac", kind=self.kind,
                        subset=pset).matrix
        self.terms.append(K)
        self.weights.append(1.0)
        self.means.append(pset.vector().clone())
        self._phase = "filtered"
        return K
