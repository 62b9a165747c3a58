r"""Rauch-Tung-Striebel smoothing over the stored filtered and predicted moments.

With filtered :math:`(m_t, \Lambda_t)`, predicted :math:`(m^-_{t+1}, \Lambda^-_{t+1})` and
:math:`\theta_{t+1} = A_{t+1}\theta_t + q`, the smoother gain is
:math:`G_t = P_t A_{t+1}^\top (P^-_{t+1})^{-1} = \Lambda_t^{-1} A_{t+1} \Lambda^-_{t+1}` and,
backwards from :math:`m^s_T = m_T`, :math:`P^s_T = \Lambda_T^{-1}`,

.. math::
    m^s_t = m_t + G_t (m^s_{t+1} - m^-_{t+1}), \qquad
    P^s_t = \Lambda_t^{-1} + G_t (P^s_{t+1} - P^-_{t+1}) G_t^\top.

The means cost one low-rank matvec and one Woodbury solve per task and touch no data.
:math:`P^s_t` is a lazy operator: a product with it runs the recursion to the last task
(``O((T - t) P k)`` per column). For a network the filter is a Laplace filter, so the
smoother is the matching Laplace-RTS approximation (exact for linear-Gaussian models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.linalg import LowRankPlusDiagonal

__all__ = ["FilterStep", "SmoothedCovariance", "SmootherResult", "rts_smooth"]


@dataclass
class FilterStep:
    """Moments of one task: predicted before training, filtered after the update.

    Attributes:
        predicted_mean: ``m⁻_t``.
        predicted: ``Λ⁻_t``.
        mean: ``m_t`` (the MAP of task ``t``).
        precision: ``Λ_t``.
        scale: ``a`` of the transition into task ``t`` (ones for the first task).
        discarded: squared singular values dropped by the rank truncation of the update.
    """

    predicted_mean: Tensor
    predicted: LowRankPlusDiagonal
    mean: Tensor
    precision: LowRankPlusDiagonal
    scale: Tensor
    discarded: Tensor


class SmoothedCovariance:
    """Lazy ``P^s_t`` (``P x P``) of the RTS recursion; ``matvec``/``matmat``/``to_dense``."""

    def __init__(self, steps: Sequence[FilterStep], task: int) -> None:
        self._steps, self._task = list(steps), task

    @property
    def shape(self) -> tuple[int, int]:
        n = self._steps[0].mean.shape[0]
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._steps[0].mean.dtype

    @property
    def device(self) -> torch.device:
        return self._steps[0].mean.device

    def _apply(self, t: int, V: Tensor) -> Tensor:
        out = self._steps[t].precision.solve(V)  # P_t V
        if t == len(self._steps) - 1:
            return out
        nxt = self._steps[t + 1]
        a = nxt.scale.unsqueeze(-1)
        X = nxt.predicted.matvec(a * out)  # G_tᵀ V
        Y = self._apply(t + 1, X) - nxt.predicted.solve(X)  # (P^s_{t+1} − P⁻_{t+1}) G_tᵀ V
        return out + self._steps[t].precision.solve(a * nxt.predicted.matvec(Y))

    def matmat(self, V: Tensor) -> Tensor:
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ShapeError(f"matmat needs ({self.shape[0]}, k), got {tuple(V.shape)}")
        return self._apply(self._task, V)

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        M = self.matmat(eye)
        return 0.5 * (M + M.mT)


@dataclass
class SmootherResult:
    """Smoothed means ``m^s_t`` (one weight vector per task) and lazy covariances."""

    means: list[Tensor]
    steps: list[FilterStep]

    def covariance(self, task: int) -> SmoothedCovariance:
        """``P^s_task`` as a lazy operator."""
        if not 0 <= task < len(self.means):
            raise InvalidArgumentError(f"task must lie in [0, {len(self.means) - 1}], got {task}")
        return SmoothedCovariance(self.steps, task)


@torch.no_grad()
def rts_smooth(steps: Sequence[FilterStep]) -> SmootherResult:
    """The RTS smoother over ``steps`` (see the module docstring)."""
    steps = list(steps)
    if not steps:
        raise InvalidArgumentError("nothing to smooth: no task has been filtered yet")
    means: list[Tensor] = [s.mean for s in steps]
    for t in range(len(steps) - 2, -1, -1):
        nxt = steps[t + 1]
        v = means[t + 1] - nxt.predicted_mean
        means[t] = steps[t].mean + steps[t].precision.solve(nxt.scale * nxt.predicted.matvec(v))
    return SmootherResult(means, steps)
