"""Dense PSD matrix ``A = c · M + diag(δ)`` sharing one eigendecomposition of ``M``."""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from bayescurv.errors import ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, finish, jittered_cholesky, shift_times

__all__ = ["Dense"]


class _EighCache:
    """Lazily computed ``M = Q diag(λ) Qᵀ`` (no grad, ``λ`` clamped at 0), shared by copies."""

    def __init__(self, M: Tensor) -> None:
        self.matrix = M
        self._eig: tuple[Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            with torch.no_grad():
                lam, Q = torch.linalg.eigh(self.matrix.detach())
            self._eig = (lam.clamp_min(0), Q)
        return self._eig


class Dense(PSDOperator):
    """``A = c · M + diag(δ)`` for a symmetric PSD ``M`` of shape ``(n, n)``.

    With a constant shift ``δ`` everything uses ``M = Q diag(λ) Qᵀ`` (computed once, shared by
    all scaled/shifted copies): ``A = Q diag(c λ + δ) Qᵀ``, so ``logdet`` is ``O(n)`` and
    ``solve`` ``O(n²)``. A non-constant ``δ`` falls back to a Cholesky of the dense matrix.
    Gradients flow to ``c`` and ``δ``; the eigendecomposition itself is not differentiated.
    """

    def __init__(self, M: Tensor) -> None:
        if not isinstance(M, Tensor) or M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ShapeError(
                f"Dense needs a square 2-D tensor, got {getattr(M, 'shape', type(M))}."
            )
        self._cache = _EighCache((M + M.mT) / 2)
        self._c = torch.ones((), dtype=M.dtype, device=M.device)
        self._shift = torch.zeros((), dtype=M.dtype, device=M.device)
        self._chol: Tensor | None = None

    @classmethod
    def _from_parts(cls, cache: _EighCache, c: Tensor, shift: Tensor) -> Dense:
        op = cls.__new__(cls)
        op._cache, op._c, op._shift, op._chol = cache, c, shift, None
        return op

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        return self._cache.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._cache.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self._cache.matrix.device

    @property
    def base(self) -> Tensor:
        """The (symmetrised) base matrix ``M``."""
        return self._cache.matrix

    @property
    def scale_factor(self) -> Tensor:
        """``c`` (0-dim)."""
        return self._c

    @property
    def shift(self) -> Tensor:
        """``δ``: 0-dim or ``(n,)``."""
        return self._shift

    def _uses_eig(self) -> bool:
        return self._shift.ndim == 0

    def eigenvalues(self) -> Tensor:
        """``c λ + δ``: eigenvalues of ``A`` (constant shift only), basis ``eigenvectors()``."""
        if not self._uses_eig():
            raise ShapeError("Dense.eigenvalues needs a constant (scalar) diagonal shift.")
        lam, _ = self._cache.get()
        return self._c * lam + self._shift

    def eigenvectors(self) -> Tensor:
        """``Q`` of the base matrix ``M`` (no grad)."""
        return self._cache.get()[1]

    def _cholesky(self) -> Tensor:
        """Cholesky factor of ``A`` (vector shift); cached only when nothing requires grad."""
        if self._chol is not None:
            return self._chol
        L = jittered_cholesky(self.to_dense())
        if not any(t.requires_grad for t in (self._c, self._shift, self._cache.matrix)):
            self._chol = L
        return L

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        return finish(self._c * (self._cache.matrix @ V) + shift_times(self._shift, V), vec)

    def solve(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        if self._uses_eig():
            Q = self.eigenvectors()
            out = Q @ ((Q.mT @ V) / self.eigenvalues().unsqueeze(-1))
        else:
            out = torch.cholesky_solve(V, self._cholesky())
        return finish(out, vec)

    def logdet(self) -> Tensor:
        if self._uses_eig():
            return self.eigenvalues().log().sum()
        return 2 * self._cholesky().diagonal().log().sum()

    def diagonal(self) -> Tensor:
        return self._c * self._cache.matrix.diagonal() + self._shift

    def inv_diagonal(self) -> Tensor:
        if self._uses_eig():
            Q = self.eigenvectors()
            return Q.square() @ self.eigenvalues().reciprocal()
        L = self._cholesky()
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        return Linv.square().sum(0)

    def to_dense(self) -> Tensor:
        out = self._c * self._cache.matrix
        if self._shift.ndim == 0:
            eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
            return out + self._shift * eye
        return out + torch.diag(self._shift)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        if self._uses_eig():
            out = self.eigenvectors() @ (Z * self.eigenvalues().rsqrt().unsqueeze(-1))
        else:  # R = L⁻ᵀ: R Rᵀ = (L Lᵀ)⁻¹
            out = torch.linalg.solve_triangular(self._cholesky().mT, Z, upper=True)
        return finish(out, vec)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        if self._uses_eig():
            out = self.eigenvectors() @ (Z * self.eigenvalues().sqrt().unsqueeze(-1))
        else:
            out = self._cholesky() @ Z
        return finish(out, vec)

    def scale(self, c: Scalar) -> Dense:
        c = self._scalar(c, "c", nonnegative=True)
        return Dense._from_parts(self._cache, c * self._c, c * self._shift)

    def add_diagonal(self, d: Scalar) -> Dense:
        return Dense._from_parts(self._cache, self._c, self._shift + self._diag_arg(d))

    def to_linear_operator(self) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())
