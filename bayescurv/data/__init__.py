"""Offline data sets: scikit-learn's bundled digits, locally generated synthetic data and PDE
solutions for neural operators (:mod:`bayescurv.data.pde`).

Nothing is downloaded; scikit-learn is imported only when the digits are loaded.
"""

from bayescurv.data.digits import (
    DigitsSplit,
    load_digits_split,
    loaders,
    permuted_digits,
    rotated_digits,
)
from bayescurv.data.pde import (
    OperatorData,
    advection_diffusion_reaction,
    burgers,
    darcy,
    kuramoto_sivashinsky,
)
from bayescurv.data.synthetic import (
    RegressionData,
    sinusoid,
    toy_classification,
    toy_regression,
)

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "loaders",
    "permuted_digits",
    "rotated_digits",
    "RegressionData",
    "sinusoid",
    "toy_classification",
    "toy_regression",
    "OperatorData",
    "burgers",
    "kuramoto_sivashinsky",
    "darcy",
    "advection_diffusion_reaction",
]
