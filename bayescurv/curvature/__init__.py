"""Curvature of a network's loss (GGN, Fisher, empirical Fisher, Hessian) in dense,
diagonal, Kronecker-factored (K-FAC expand / reduce, EKFAC) structures, from one streaming
pass over the data; matrix-free products and spectral tools beside them."""

from bayescurv.curvature.compute import ALL_KINDS, STRUCTURES, Curvature, compute

__all__ = ["compute", "Curvature", "STRUCTURES", "ALL_KINDS"]
