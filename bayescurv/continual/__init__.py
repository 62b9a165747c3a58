"""Continual learning as Bayesian filtering and smoothing over the weights: a state-space
model between tasks, Laplace filters (diagonal plus low rank, diagonal = online EWC, K-FAC
online Laplace) with a drop-in quadratic regulariser, and the RTS smoother."""

from bayescurv.continual.dynamics import Transition
from bayescurv.continual.filter import (
    EIGENSOLVERS,
    DiagonalFilter,
    KFACFilter,
    LaplaceFilter,
    task_curvature,
)
from bayescurv.continual.gaussian import add_low_rank, canonical, predict_precision
from bayescurv.continual.smoother import (
    FilterStep,
    SmoothedCovariance,
    SmootherResult,
    rts_smooth,
)

__all__ = [
    "Transition",
    "LaplaceFilter",
    "DiagonalFilter",
    "KFACFilter",
    "task_curvature",
    "EIGENSOLVERS",
    "predict_precision",
    "add_low_rank",
    "canonical",
    "FilterStep",
    "SmoothedCovariance",
    "SmootherResult",
    "rts_smooth",
]
