"""Continual learning as Bayesian filtering and smoothing over the weights: a state-space
model between tasks, Laplace filters (diagonal plus low rank, diagonal = online EWC, K-FAC
online Laplace) with a drop-in quadratic regulariser, process noise chosen by the evidence,
and the RTS smoother."""

from bayescurv.continual.curvature import EIGENSOLVERS, kfac_topk, task_curvature
from bayescurv.continual.dynamics import Transition
from bayescurv.continual.evidence import EvidenceNoise, evidence_noise
from bayescurv.continual.filter import DiagonalFilter, LaplaceFilter
from bayescurv.continual.gaussian import add_low_rank, canonical, predict_precision
from bayescurv.continual.kfac import KFACFilter
from bayescurv.continual.smoother import (
    FilterStep,
    SmoothedCovariance,
    SmootherResult,
    rts_smooth,
)

__all__ = [
    "Transition",
    "EvidenceNoise",
    "evidence_noise",
    "LaplaceFilter",
    "DiagonalFilter",
    "KFACFilter",
    "task_curvature",
    "kfac_topk",
    "EIGENSOLVERS",
    "predict_precision",
    "add_low_rank",
    "canonical",
    "FilterStep",
    "SmoothedCovariance",
    "SmootherResult",
    "rts_smooth",
]
