"""Laplace and linearized-Laplace posteriors."""

from bayescurv.laplace.posterior import PRED_TYPES, Laplace

__all__ = ["Laplace", "PRED_TYPES"]
