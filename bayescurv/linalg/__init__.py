"""Structured symmetric PSD matrices: dense, diagonal, Kronecker, low rank, block diagonal."""

from bayescurv.linalg.base import PSDOperator, internal_dtype, jittered_cholesky, product_dtype
from bayescurv.linalg.block import BlockDiagonal
from bayescurv.linalg.dense import Dense
from bayescurv.linalg.diagonal import Diagonal
from bayescurv.linalg.eigh import robust_eigh
from bayescurv.linalg.kronecker import Kronecker, KroneckerEigen, kronecker
from bayescurv.linalg.kronecker_batch import KroneckerBatch
from bayescurv.linalg.lowrank import LowRank, LowRankPlusDiagonal
from bayescurv.linalg.serialize import from_state, to_state

__all__ = [
    "PSDOperator",
    "internal_dtype",
    "product_dtype",
    "jittered_cholesky",
    "robust_eigh",
    "Dense",
    "Diagonal",
    "Kronecker",
    "KroneckerEigen",
    "KroneckerBatch",
    "kronecker",
    "LowRank",
    "LowRankPlusDiagonal",
    "BlockDiagonal",
    "to_state",
    "from_state",
]
