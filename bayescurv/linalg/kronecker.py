"""Kronecker-factored PSD matrix kept in its eigenbasis (K-FAC, EKFAC).

Vectors of length ``n = p q`` are the row-major ``vec_r(V)`` of a ``(p, q)`` matrix ``V``,
so that ``kron(A, B) vec_r(V) = vec_r(A V Bᵀ)`` (``torch.kron`` convention).
"""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import (
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
)
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, affine, finish

__all__ = ["KroneckerEigen", "Kronecker", "kronecker"]


class _Eig:
    """Eigendecomposition of two Kronecker factors, computed once on first use."""

    def __init__(self, A: Tensor | None, B: Tensor | None) -> None:
        self.A, self.B = A, B
        self.value: tuple | None = None

    def get(self) -> tuple:
        if self.value is None:
            with torch.no_grad():
                lam_a, qa = torch.linalg.eigh(self.A)
                lam_b, qb = torch.linalg.eigh(self.B)
            lam_a, lam_b = lam_a.clamp_min(0), lam_b.clamp_min(0)
            self.value = (qa, qb, torch.outer(lam_a, lam_b), (lam_a, lam_b))
            self.A = self.B = None
        return self.value


class KroneckerEigen(PSDOperator):
    """``A = (Q_A ⊗ Q_B) diag(vec_r(c Λ + δ)) (Q_A ⊗ Q_B)ᵀ``.

    ``Q_A`` ``(p, p)`` and ``Q_B`` ``(q, q)`` are orthogonal, ``Λ`` ``(p, q)`` holds the
    non-negative base eigenvalues (``outer(λ_A, λ_B)`` for K-FAC, arbitrary for EKFAC), ``c``
    and ``δ`` are scalars (differentiable). Products go through ``V ↦ Q_Aᵀ V Q_B``; the
    ``(pq, pq)`` matrix is never formed except by :meth:`to_dense`.
    """

    def __init__(self, QA: Tensor, QB: Tensor, eigenvalues: Tensor) -> None:
        if QA.ndim != 2 or QA.shape[0] != QA.shape[1] or QB.ndim != 2 or QB.shape[0] != QB.shape[1]:
            raise ShapeError(
                f"QA and QB must be square, got {tuple(QA.shape)} and {tuple(QB.shape)}."
            )
        if eigenvalues.shape != (QA.shape[0], QB.shape[0]):
            raise ShapeError(
                f"eigenvalues must have shape {(QA.shape[0], QB.shape[0])}, "
                f"got {tuple(eigenvalues.shape)}."
            )
        self._eig = _Eig(None, None)
        self._eig.value = (QA, QB, eigenvalues.clamp_min(0), None)
        self._sizes = (QA.shape[0], QB.shape[0])
        self._meta = QA

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor) -> KroneckerEigen:
        """``kron(A, B)`` for PSD ``A`` ``(p, p)``, ``B`` ``(q, q)``. The two eigh (no grad)
        run lazily, on the first operation that needs them, and are shared by every scaled
        or shifted copy: building the curvature costs no decomposition until a posterior
        uses it."""
        for name, F in (("A", A), ("B", B)):
            if F.ndim != 2 or F.shape[0] != F.shape[1]:
                raise ShapeError(f"Kronecker factor {name} must be square, got {tuple(F.shape)}.")
        op = cls.__new__(cls)
        op._eig = _Eig(A.detach(), B.detach())
        op._sizes = (A.shape[0], B.shape[0])
        op._meta = A
        return op

    # lazily decomposed state ---------------------------------------------------------
    @property
    def _QA(self) -> Tensor:
        return self._eig.get()[0]

    @property
    def _QB(self) -> Tensor:
        return self._eig.get()[1]

    @property
    def _lam(self) -> Tensor:
        return self._eig.get()[2]

    @property
    def _factor_eigs(self) -> tuple[Tensor, Tensor] | None:
        return self._eig.get()[3]

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        return self._sizes[0] * self._sizes[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._meta.dtype

    @property
    def device(self) -> torch.device:
        return self._meta.device

    @property
    def factor_sizes(self) -> tuple[int, int]:
        """``(p, q)``."""
        return self._sizes

    @property
    def QA(self) -> Tensor:
        """Orthogonal ``(p, p)`` eigenbasis of the first factor."""
        return self._QA

    @property
    def QB(self) -> Tensor:
        """Orthogonal ``(q, q)`` eigenbasis of the second factor."""
        return self._QB

    @property
    def eigenvalues(self) -> Tensor:
        """Effective eigenvalues ``c Λ + δ``, shape ``(p, q)`` (differentiable in ``c``, ``δ``)."""
        return affine(self._lam, *self._affine())

    @property
    def base_eigenvalues(self) -> Tensor:
        """Unscaled, unshifted ``Λ``, shape ``(p, q)``."""
        return self._lam

    # ------------------------------------------------------------------ eigenbasis maps
    def _apply(self, v: Tensor, weights: Tensor, name: str = "v") -> Tensor:
        """``(Q_A ⊗ Q_B) diag(vec_r(weights)) (Q_A ⊗ Q_B)ᵀ v``."""
        V, vec = self._as_matrix(v, name)
        p, q = self.factor_sizes
        X = V.mT.reshape(-1, p, q)  # (k, p, q)
        X = self._QA @ ((self._QA.mT @ X @ self._QB) * weights) @ self._QB.mT
        return finish(X.reshape(-1, p * q).mT, vec)

    def _rotate_back(self, z: Tensor, weights: Tensor) -> Tensor:
        """``(Q_A ⊗ Q_B) diag(vec_r(weights)) z``."""
        Z, vec = self._as_matrix(z, "z")
        p, q = self.factor_sizes
        X = self._QA @ (Z.mT.reshape(-1, p, q) * weights) @ self._QB.mT
        return finish(X.reshape(-1, p * q).mT, vec)

    def _diag_of(self, weights: Tensor) -> Tensor:
        """``diag((Q_A ⊗ Q_B) diag(vec_r(weights)) (Q_A ⊗ Q_B)ᵀ)``."""
        return (self._QA.square() @ weights @ self._QB.square().mT).reshape(-1)

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        return self._apply(v, self.eigenvalues)

    def solve(self, v: Tensor) -> Tensor:
        return self._apply(v, self.eigenvalues.reciprocal())

    def logdet(self) -> Tensor:
        return self.eigenvalues.log().sum()

    def diagonal(self) -> Tensor:
        return self._diag_of(self.eigenvalues)

    def inv_diagonal(self) -> Tensor:
        return self._diag_of(self.eigenvalues.reciprocal())

    def to_dense(self) -> Tensor:
        K = torch.kron(self._QA, self._QB)
        return (K * self.eigenvalues.reshape(-1)) @ K.mT

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._rotate_back(z, self.eigenvalues.rsqrt())

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._rotate_back(z, self.eigenvalues.sqrt())

    def add_diagonal(self, d: Scalar) -> PSDOperator:
        """``A + diag(d)``: a scalar ``d`` keeps the eigenbasis; a vector that is constant
        except on one column of the second factor (a bias with its own prior precision)
        gives the exact :class:`~bayescurv.linalg.kronecker_column.KroneckerColumnShift`."""
        d = self._diag_arg(d)
        if d.ndim != 0:
            from bayescurv.linalg.kronecker_column import KroneckerColumnShift, column_shift

            split = column_shift(d, self.factor_sizes)
            if split is not None:
                const, column, delta = split
                shifted = self._modified("shift", const)
                return shifted if column is None else KroneckerColumnShift(shifted, column, delta)
            raise InvalidArgumentError(
                "A per-parameter (non-constant) diagonal added to a Kronecker-factored block has "
                "no exact Kronecker eigendecomposition unless it is constant except on one column "
                "(a bias). Use a scalar, per-layer or per-tensor prior precision "
                "(BlockDiagonal.add_diagonal_per_block), or the 'diag' or 'full' structure."
            )
        return self._modified("shift", d)

    def to_linear_operator(self) -> LinearOperator:
        if self._factor_eigs is not None:
            lam_a, lam_b = self._factor_eigs
            A = (self._QA * lam_a) @ self._QA.mT
            B = (self._QB * lam_b) @ self._QB.mT
            return KroneckerProductLinearOperator(self.scale_factor * A, B).add_diagonal(self.shift)
        K = KroneckerProductLinearOperator(self._QA, self._QB)
        root = MatmulLinearOperator(K, DiagLinearOperator(self.eigenvalues.reshape(-1).sqrt()))
        return RootLinearOperator(root)


Kronecker = KroneckerEigen


def kronecker(A: Tensor, B: Tensor) -> KroneckerEigen:
    """``kron(A, B)`` in eigenbasis form; see :meth:`KroneckerEigen.from_factors`."""
    return KroneckerEigen.from_factors(A, B)
