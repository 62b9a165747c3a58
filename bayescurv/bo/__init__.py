"""BoTorch surrogate and GPyTorch kernel from the linearized Laplace posterior.

- :class:`LaplaceModel`: a ``botorch`` model whose posterior is the linearized-Laplace GP.
- :class:`ConditionedLaplaceModel`: a (batch of) exact linearized updates, from ``fantasize``.
- :class:`NTKKernel`: ``k(x, x') = J(x) Σ J(x')ᵀ`` as a ``gpytorch`` kernel.
- :class:`FourierFeatures`, :func:`fourier_network`: the default surrogate's network.
- :class:`OutputSubsetModel`: some outputs of a model (``subset_output``).
- :func:`fit_lengthscales`: its ARD lengthscales by the exact evidence.
"""

from bayescurv.bo.ard import fit_lengthscales
from bayescurv.bo.features import FourierFeatures, fourier_network
from bayescurv.bo.kernel import NTKKernel
from bayescurv.bo.model import (
    ConditionedLaplaceModel,
    LaplaceModel,
    default_network,
    train_map,
)
from bayescurv.bo.subset import OutputSubsetModel

__all__ = ["LaplaceModel", "ConditionedLaplaceModel", "NTKKernel", "FourierFeatures",
           "OutputSubsetModel",
           "default_network", "fit_lengthscales", "fourier_network", "train_map"]
