"""Exceptions raised at bayescurv's public boundary.

Every error says what was wrong and what to do. They subclass the built-in exception a
user would expect (``ValueError`` for bad values, ``TypeError`` for bad types), so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class BayesCurvError(Exception):
    """Base class of all bayescurv errors."""


class InvalidArgumentError(BayesCurvError, ValueError):
    """An argument has a value outside what the function accepts (unknown option string,
    negative precision, rank larger than the parameter count, ...)."""


class ShapeError(BayesCurvError, ValueError):
    """Tensors whose shapes do not fit each other or the likelihood."""


class NonFiniteError(BayesCurvError, ValueError):
    """NaN or Inf in data, targets, network outputs or hyperparameters."""


class EmptyDataError(BayesCurvError, ValueError):
    """A data loader yielded no data."""


class UnsupportedLayerError(BayesCurvError, TypeError):
    """A module holds parameters that the requested curvature structure cannot handle."""


class NotFittedError(BayesCurvError, RuntimeError):
    """A posterior was used (predict, sample, evidence) before ``fit``."""


class NumericalError(BayesCurvError, ArithmeticError):
    """A matrix that must be positive definite is not, even after the documented jitter."""


class ConvergenceWarning(UserWarning):
    """An iterative tuner (e.g. prior-precision optimization) stopped before its tolerance."""


class UnderconfidenceWarning(UserWarning):
    """The tuned Laplace predictive is far less confident than the MAP network on the
    training data (all-weights Laplace often is; see the guide's "when Laplace is
    under-confident")."""


__all__ = [
    "ConvergenceWarning",
    "UnderconfidenceWarning",
    "BayesCurvError",
    "InvalidArgumentError",
    "ShapeError",
    "NonFiniteError",
    "EmptyDataError",
    "UnsupportedLayerError",
    "NotFittedError",
    "NumericalError",
]
