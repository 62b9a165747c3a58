"""Laplace and linearized-Laplace posteriors."""

from bayescurv.laplace.glm import GaussianGLM  # noqa: E402  (needs Laplace first)
from bayescurv.laplace.posterior import Laplace
from bayescurv.laplace.predictions import PRED_TYPES

__all__ = ["Laplace", "GaussianGLM", "PRED_TYPES"]
