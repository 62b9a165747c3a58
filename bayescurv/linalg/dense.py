"""Dense PSD matrix ``A = c · M + diag(δ)`` sharing one eigendecomposition of ``M``."""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from bayescurv.errors import NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, affine, finish, jittered_cholesky, shift_times
from bayescurv.linalg.eigh import robust_eigh

__all__ = ["Dense"]


class _EighCache:
    """Lazily computed ``M = Q diag(λ) Qᵀ`` (no grad), shared by copies. ``λ`` is kept as
    computed, negative values included: every operation describes the same matrix as
    ``matvec`` (an indefinite ``M``, e.g. a Hessian, is never silently clamped)."""

    def __init__(self, M: Tensor) -> None:
        self.matrix = M
        self._eig: tuple[Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            with torch.no_grad():
                lam, Q = robust_eigh(self.matrix.detach(), "dense curvature block")
            self._eig = (lam, Q)
        return self._eig


class Dense(PSDOperator):
    """``A = c · M + diag(δ)`` for a symmetric PSD ``M`` of shape ``(n, n)``.

    With a constant shift ``δ`` everything uses ``M = Q diag(λ) Qᵀ`` (computed once, shared by
    all scaled/shifted copies): ``A = Q diag(c λ + δ) Qᵀ``, so ``logdet`` is ``O(n)`` and
    ``solve`` ``O(n²)``. A non-constant ``δ`` falls back to a (jittered) Cholesky of the dense
    matrix. Gradients flow to ``c`` and ``δ``; the eigendecomposition is not differentiated.

    ``M`` need not be PSD (a Hessian): the eigenvalues are not clamped, so ``solve``,
    ``logdet``, ``inv_diagonal`` and the roots describe the same matrix as ``matvec``. Inverse
    quantities of an ``A`` that is not positive definite raise
    :class:`~bayescurv.errors.NumericalError`; ``sqrt_matvec`` accepts eigenvalues that are
    negative only at rounding level (``√eps · max|λ|``) and treats them as zero.
    """

    def __init__(self, M: Tensor) -> None:
        if not isinstance(M, Tensor) or M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ShapeError(
                f"Dense needs a square 2-D tensor, got {getattr(M, 'shape', type(M))}."
            )
        self._cache = _EighCache((M + M.mT) / 2)
        self._chol: Tensor | None = None

    @classmethod
    def from_eigendecomposition(cls, M: Tensor, eigenvalues: Tensor,
                                eigenvectors: Tensor) -> Dense:
        """``Dense(M)`` with its eigendecomposition ``M = Q diag(λ) Qᵀ`` already known (a
        restored state): no ``eigh`` is run. The caller vouches that it matches ``M``."""
        op = cls(M)
        op._cache._eig = (eigenvalues, eigenvectors)
        return op

    def _reset_caches(self) -> None:
        self._chol = None

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

    def eigenvalues(self) -> Tensor:
        """``c λ + δ``: eigenvalues of ``A`` (constant shift only), basis ``eigenvectors()``."""
        if self._has_vector_shift():
            raise ShapeError("Dense.eigenvalues needs a constant (scalar) diagonal shift.")
        return affine(self._cache.get()[0], *self._affine())

    def eigenvectors(self) -> Tensor:
        """``Q`` of the base matrix ``M`` (no grad)."""
        return self._cache.get()[1]

    def _positive_eigenvalues(self, what: str) -> Tensor:
        """``c λ + δ``, raising :class:`NumericalError` unless all are positive."""
        lam = self.eigenvalues()
        low = lam.detach().min()
        if not bool(low > 0):
            raise NumericalError(
                f"Dense.{what}: the matrix is not positive definite (smallest eigenvalue "
                f"{float(low):.4g}), so its inverse, log determinant and Gaussian are undefined. "
                "For a Hessian (indefinite away from a minimum) use a PSD curvature "
                "(kind='ggn' or 'ef') or a prior precision larger than minus its smallest "
                "eigenvalue."
            )
        return lam

    def _nonnegative_eigenvalues(self) -> Tensor:
        """``c λ + δ`` with rounding-level negatives set to zero; raises for real ones."""
        lam = self.eigenvalues()
        tol = torch.finfo(lam.dtype).eps ** 0.5 * lam.detach().abs().max()
        if bool((lam.detach() < -tol).any()):
            raise NumericalError(
                f"Dense.sqrt_matvec: the matrix is indefinite (smallest eigenvalue "
                f"{float(lam.detach().min()):.4g}) and has no real square root."
            )
        return lam.clamp_min(0)

    def _cholesky(self) -> Tensor:
        """Cholesky factor of ``A`` (vector shift); cached only when nothing requires grad."""
        if self._chol is not None:
            return self._chol
        L = jittered_cholesky(self.to_dense())
        tensors = [x for _, x in self._mods] + [self._cache.matrix]
        if not any(t.requires_grad for t in tensors):
            self._chol = L
        return L

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        c, shift = self._affine()
        out = self._cache.matrix @ V
        if c is not None:
            out = c * out
        if shift is not None:
            out = out + shift_times(shift, V)
        return finish(out, vec)

    def solve(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        if self._has_vector_shift():
            out = torch.cholesky_solve(V, self._cholesky())
        else:
            Q = self.eigenvectors()
            out = Q @ ((Q.mT @ V) / self._positive_eigenvalues("solve").unsqueeze(-1))
        return finish(out, vec)

    def logdet(self) -> Tensor:
        if self._has_vector_shift():
            return 2 * self._cholesky().diagonal().log().sum()
        return self._positive_eigenvalues("logdet").log().sum()

    def diagonal(self) -> Tensor:
        return affine(self._cache.matrix.diagonal(), *self._affine())

    def inv_diagonal(self) -> Tensor:
        if self._has_vector_shift():
            eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
            Linv = torch.linalg.solve_triangular(self._cholesky(), eye, upper=False)
            return Linv.square().sum(0)  # diag(L⁻ᵀ L⁻¹)
        return self.eigenvectors().square() @ self._positive_eigenvalues(
            "inv_diagonal").reciprocal()

    def to_dense(self) -> Tensor:
        c, shift = self._affine()
        out = self._cache.matrix if c is None else c * self._cache.matrix
        if shift is None:
            return out
        if shift.ndim == 0:
            return out + shift * torch.eye(self.size, dtype=self.dtype, device=self.device)
        return out + torch.diag(shift)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        if self._has_vector_shift():  # R = L⁻ᵀ: R Rᵀ = (L Lᵀ)⁻¹
            out = torch.linalg.solve_triangular(self._cholesky().mT, Z, upper=True)
        else:
            lam = self._positive_eigenvalues("inv_sqrt_matvec")
            out = self.eigenvectors() @ (Z * lam.rsqrt().unsqueeze(-1))
        return finish(out, vec)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        if self._has_vector_shift():
            out = self._cholesky() @ Z
        else:
            lam = self._nonnegative_eigenvalues()
            out = self.eigenvectors() @ (Z * lam.sqrt().unsqueeze(-1))
        return finish(out, vec)

    def to_linear_operator(self) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())
