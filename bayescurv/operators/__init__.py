"""Neural operators with linearized-Laplace uncertainty: Fourier neural operators (ours and
``neuralop``'s) as function-valued Gaussian processes over their output grids (LUNO)."""

from bayescurv.operators.fno import FNO, FlattenOutput, FNO1d, FNO2d, FNOBlock, call_operator
from bayescurv.operators.gp import OperatorGP, tune_prior_precision
from bayescurv.operators.metrics import evaluate, gaussian_crps
from bayescurv.operators.neuralop_support import merge_complex, split_complex
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
    "evaluate",
    "gaussian_crps",
    "split_complex",
    "merge_complex",
    "SpectralConv",
    "fourier_resample",
    "mode_weights",
]
