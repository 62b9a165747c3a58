"""Laplace and linearized-Laplace posteriors."""

from bayescurv.laplace.glm import GaussianGLM  # noqa: E402  (needs Laplace first)
from bayescurv.laplace.posterior import PRED_TYPES, Laplace

__all__ = ["Laplace", "GaussianGLM", "PRED_TYPES"]
