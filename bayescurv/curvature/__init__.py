"""Curvature of a network's loss (GGN, Fisher, empirical Fisher, Hessian) in dense,
diagonal, Kronecker-factored (K-FAC expand / reduce, EKFAC), low-rank and diagonal-plus-
low-rank structures, from one streaming pass over the data (hooks + one batched backward);
an approximate backpropagated diagonal (HesScale); matrix-free products and spectral tools
beside them. See ``docs/curvature.md``."""

from bayescurv.curvature.compute import ALL_KINDS, STRUCTURES, Curvature, compute

__all__ = ["compute", "Curvature", "STRUCTURES", "ALL_KINDS"]
