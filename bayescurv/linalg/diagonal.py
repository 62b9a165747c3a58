"""Diagonal PSD matrix ``A = diag(c · d + δ)``."""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DiagLinearOperator
from torch import Tensor

from bayescurv.errors import NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, affine, finish

__all__ = ["Diagonal"]


class Diagonal(PSDOperator):
    """``A = diag(d)`` with ``d > 0`` of shape ``(n,)``; every operation is ``O(n)`` per column."""

    def __init__(self, d: Tensor) -> None:
        if not isinstance(d, Tensor) or d.ndim != 1:
            raise ShapeError(f"Diagonal needs a 1-D tensor, got {getattr(d, 'shape', type(d))}.")
        self._d = d

    @property
    def size(self) -> int:
        return self._d.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._d.dtype

    @property
    def device(self) -> torch.device:
        return self._d.device

    def diagonal(self) -> Tensor:
        return affine(self._d, *self._affine())

    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        return finish(self.diagonal().unsqueeze(-1) * V, vec)

    def solve(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        return finish(V / self.diagonal().unsqueeze(-1), vec)

    def logdet(self) -> Tensor:
        d = self.diagonal()
        if bool((d.detach() < 0).any()):
            raise NumericalError(
                f"Diagonal.logdet: {int((d.detach() < 0).sum())} negative diagonal entries "
                f"(smallest {float(d.detach().min()):.4g}): the matrix is not positive definite. "
                "For a Hessian use a PSD curvature (kind='ggn' or 'ef') or a larger prior "
                "precision."
            )
        return d.log().sum()

    def inv_diagonal(self) -> Tensor:
        return self.diagonal().reciprocal()

    def to_dense(self) -> Tensor:
        return torch.diag(self.diagonal())

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        return finish(Z * self.diagonal().rsqrt().unsqueeze(-1), vec)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        return finish(Z * self.diagonal().sqrt().unsqueeze(-1), vec)

    def to_linear_operator(self) -> LinearOperator:
        return DiagLinearOperator(self.diagonal())
