"""Neural operators with linearized-Laplace uncertainty: Fourier neural operators (ours and
``neuralop``'s) as function-valued Gaussian processes over their output grids (LUNO)."""

from bayescurv.operators.fno import FNO, FlattenOutput, FNO1d, FNO2d, FNOBlock, call_operator
from bayescurv.operators.gp import OperatorGP, tune_prior_precision
from bayescurv.operators.spectral import SpectralConv, fourier_resample, mode_weights

__all__ = [
    "FNO",
    "FNO1d",
    "FNO2d",
    "FNOBlock",
    "FlattenOutput",
    "call_operator",
    "OperatorGP",
    "tune_prior_precision",
    "SpectralConv",
    "fourier_resample",
    "mode_weights",
]
