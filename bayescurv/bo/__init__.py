"""BoTorch surrogate and GPyTorch kernel from the linearized Laplace posterior.

- :class:`LaplaceModel`: a ``botorch`` model whose posterior is the linearized-Laplace GP.
- :class:`ConditionedLaplaceModel`: a (batch of) exact linearized updates, from ``fantasize``.
- :class:`NTKKernel`: ``k(x, x') = J(x) Σ J(x')ᵀ`` as a ``gpytorch`` kernel.
- :class:`FourierFeatures`, :func:`fourier_network`: the default surrogate's network.
- :class:`OutputSubsetModel`: some outputs of a model (``subset_output``).
- :func:`fit_lengthscales`: its ARD lengthscales by the exact evidence.
"""

from bayescurv.bo.ard import fit_lengthscales
from bayescurv.bo.conditioned import ConditionedLaplaceModel
from bayescurv.bo.features import FourierFeatures, fourier_network
from bayescurv.bo.kernel import NTKKernel
from bayescurv.bo.model import LaplaceModel
from bayescurv.bo.networks import default_network
from bayescurv.bo.subset import OutputSubsetModel
from bayescurv.bo.training import train_map

__all__ = ["LaplaceModel", "ConditionedLaplaceModel", "NTKKernel", "FourierFeatures",
           "OutputSubsetModel",
           "default_network", "fit_lengthscales", "fourier_network", "train_map"]
