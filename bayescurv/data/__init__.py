"""Offline data sets: scikit-learn's bundled digits and locally generated synthetic data.

Nothing is downloaded; scikit-learn is imported only when the digits are loaded.
"""

from bayescurv.data.digits import (
    DigitsSplit,
    load_digits_split,
    loaders,
    permuted_digits,
    rotated_digits,
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
]
