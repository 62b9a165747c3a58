"""bayescurv: curvature of neural-network losses and Laplace posteriors on top of it."""

from bayescurv import errors, glm, likelihoods, params
from bayescurv.curvature import Curvature, compute
from bayescurv.laplace import Laplace

__version__ = "0.1.0"

__all__ = ["Laplace", "compute", "Curvature", "errors", "glm", "likelihoods", "params",
           "__version__"]
