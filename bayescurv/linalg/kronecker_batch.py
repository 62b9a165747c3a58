r"""A batch of equally sized Kronecker blocks, each kept in its eigenbasis: the K-FAC / EKFAC
block of a grouped (e.g. depthwise) convolution, one block per group, without a Python loop
over the groups.

Vectors of length ``n = G p q`` are the row-major ``vec_r(V)`` of a ``(G, p, q)`` tensor
``V`` and block ``j`` acts on ``V[j]`` as :class:`~bayescurv.linalg.KroneckerEigen` does:

.. math::
    A = \mathrm{blockdiag}_j\,(Q_A^j \otimes Q_B^j)\,
        \mathrm{diag}(\mathrm{vec}_r(c\,\Lambda_j + \delta))\,(Q_A^j \otimes Q_B^j)^\top ,

so ``A V ↦ Q_A (Λ ∘ (Q_Aᵀ V Q_B)) Q_Bᵀ`` with batched matmuls. A factor of size one
(``p = 1``, the ``1 x 1`` output factor of a depthwise convolution) has the identity basis,
stored as ``None`` and never multiplied.
"""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import BlockDiagLinearOperator, DenseLinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, affine, finish
from bayescurv.linalg.kronecker_column import ColumnShift

__all__ = ["KroneckerBatch"]


def _batched_eigh(F: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(λ (G, p), Q (G, p, p))`` of symmetric factors ``(G, p, p)``; ``Q = None`` for
    ``p = 1``. One batched ``eigh``; groups where it fails go through
    :func:`~bayescurv.linalg.eigh.robust_eigh` one by one."""
    if F.shape[-1] == 1:
        return F[..., 0], None
    try:
        lam, Q = torch.linalg.eigh(F)
        if bool(torch.isfinite(lam).all()) and bool(torch.isfinite(Q).all()):
            return lam, Q
    except torch.linalg.LinAlgError:
        pass
    from bayescurv.linalg.eigh import robust_eigh

    pairs = [robust_eigh(f, f"Kronecker factor of group {j}") for j, f in enumerate(F)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _left(Q: Tensor | None, X: Tensor) -> Tensor:
    return X if Q is None else Q @ X


def _left_t(Q: Tensor | None, X: Tensor) -> Tensor:
    return X if Q is None else Q.mT @ X


class _BatchEig:
    """The batched eigendecompositions of the two factors, computed once on first use and
    shared by every scaled or shifted copy of the operator."""

    def __init__(self, A: Tensor | None, B: Tensor | None) -> None:
        self.A, self.B = A, B
        self.value: tuple | None = None

    def get(self) -> tuple:
        if self.value is None:
            with torch.no_grad():
                lam_a, qa = _batched_eigh(self.A)
                lam_b, qb = _batched_eigh(self.B)
            lam_a, lam_b = lam_a.clamp_min(0), lam_b.clamp_min(0)
            self.value = (qa, qb, lam_a[:, :, None] * lam_b[:, None, :], (lam_a, lam_b))
            self.A = self.B = None
        return self.value


class KroneckerBatch(PSDOperator):
    """``blockdiag_j (Q_A^j ⊗ Q_B^j) diag(vec_r(c Λ_j + δ)) (·)ᵀ`` (module docstring).

    ``QA`` ``(G, p, p)`` and ``QB`` ``(G, q, q)`` orthogonal per group (``None``: identity),
    ``eigenvalues`` ``Λ`` ``(G, p, q)`` non-negative; ``c`` and ``δ`` scalars
    (differentiable). Build from factors with :meth:`from_factors` (eigendecomposed lazily,
    once, shared by every scaled or shifted copy).
    """

    def __init__(self, QA: Tensor | None, QB: Tensor | None, eigenvalues: Tensor,
                 factor_eigenvalues: tuple[Tensor, Tensor] | None = None) -> None:
        if eigenvalues.ndim != 3:
            raise ShapeError(
                f"eigenvalues must be 3-D (G, p, q), got {tuple(eigenvalues.shape)}.")
        g, p, q = eigenvalues.shape
        for name, Q, n in (("QA", QA, p), ("QB", QB, q)):
            if Q is not None and tuple(Q.shape) != (g, n, n):
                raise ShapeError(f"{name} must have shape {(g, n, n)}, got {tuple(Q.shape)}.")
        self._eig = _BatchEig(None, None)
        self._eig.value = (QA, QB, eigenvalues.clamp_min(0),
                           None if factor_eigenvalues is None else tuple(factor_eigenvalues))
        self._dims = (g, p, q)
        self._meta = eigenvalues

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor) -> KroneckerBatch:
        """Block ``j`` is ``kron(A[j], B[j])`` for PSD ``A`` ``(G, p, p)``, ``B`` ``(G, q, q)``;
        the batched ``eigh`` runs on the first operation that needs it."""
        if (A.ndim != 3 or B.ndim != 3 or A.shape[-1] != A.shape[-2]
                or B.shape[-1] != B.shape[-2] or A.shape[0] != B.shape[0]):
            raise ShapeError(
                "KroneckerBatch factors must be (G, p, p) and (G, q, q), got "
                f"{tuple(A.shape)} and {tuple(B.shape)}.")
        if A.dtype != B.dtype or A.device != B.device:
            raise ShapeError(
                f"Kronecker factors must share dtype and device, got {A.dtype}/{A.device} and "
                f"{B.dtype}/{B.device}.")
        op = cls.__new__(cls)
        op._eig = _BatchEig(A.detach(), B.detach())
        op._dims = (A.shape[0], A.shape[-1], B.shape[-1])
        op._meta = A
        return op

    def _get(self) -> tuple:
        return self._eig.get()

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        g, p, q = self._dims
        return g * p * q

    @property
    def dtype(self) -> torch.dtype:
        return self._meta.dtype

    @property
    def device(self) -> torch.device:
        return self._meta.device

    @property
    def num_groups(self) -> int:
        """``G``."""
        return self._dims[0]

    @property
    def factor_sizes(self) -> tuple[int, int]:
        """``(p, q)`` of every block."""
        return self._dims[1], self._dims[2]

    @property
    def eigenbases(self) -> tuple[Tensor | None, Tensor | None]:
        """``(Q_A, Q_B)`` as stored, ``(G, p, p)`` and ``(G, q, q)``; ``None`` for a factor
        of size one (identity)."""
        v = self._get()
        return v[0], v[1]

    @property
    def diagonal_factors(self) -> tuple[bool, bool]:
        """Whether each factor's basis is the identity (size one; never stored)."""
        QA, QB = self.eigenbases
        return (QA is None, QB is None)

    @property
    def QA(self) -> Tensor:
        """``Q_A`` ``(G, p, p)`` (an identity formed on access when stored as ``None``)."""
        return self._basis(0)

    @property
    def QB(self) -> Tensor:
        """``Q_B`` ``(G, q, q)`` (identity formed on access when stored as ``None``)."""
        return self._basis(1)

    def _basis(self, which: int) -> Tensor:
        Q = self.eigenbases[which]
        if Q is not None:
            return Q
        n = self._dims[1 + which]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return eye.expand(self._dims[0], n, n)

    @property
    def factor_eigenvalues(self) -> tuple[Tensor, Tensor] | None:
        """``(λ_A (G, p), λ_B (G, q))`` of a K-FAC operator built from its factors; ``None``
        when only ``Λ`` is known (EKFAC)."""
        return self._get()[3]

    @property
    def base_eigenvalues(self) -> Tensor:
        """Unscaled, unshifted ``Λ``, ``(G, p, q)``."""
        return self._get()[2]

    @property
    def eigenvalues(self) -> Tensor:
        """Effective eigenvalues ``c Λ + δ``, ``(G, p, q)`` (differentiable in ``c``, ``δ``)."""
        return affine(self.base_eigenvalues, *self._affine())

    # ------------------------------------------------------------------ eigenbasis maps
    def to_eigenbasis(self, X: Tensor) -> Tensor:
        """``Q_Aᵀ X Q_B`` per group for ``X`` ``(..., G, p, q)``."""
        QA, QB = self.eigenbases
        X = _left_t(QA, X)
        return X if QB is None else X @ QB

    def from_eigenbasis(self, X: Tensor) -> Tensor:
        """``Q_A X Q_Bᵀ`` per group for ``X`` ``(..., G, p, q)``."""
        QA, QB = self.eigenbases
        X = _left(QA, X)
        return X if QB is None else X @ QB.mT

    def _apply(self, v: Tensor, weights: Tensor, name: str = "v") -> Tensor:
        V, vec = self._as_matrix(v, name)
        X = V.mT.reshape(-1, *self._dims)
        X = self.from_eigenbasis(self.to_eigenbasis(X) * weights)
        return finish(X.reshape(-1, self.size).mT, vec)

    def _rotate_back(self, z: Tensor, weights: Tensor) -> Tensor:
        Z, vec = self._as_matrix(z, "z")
        X = self.from_eigenbasis(Z.mT.reshape(-1, *self._dims) * weights)
        return finish(X.reshape(-1, self.size).mT, vec)

    def _diag_of(self, weights: Tensor) -> Tensor:
        """``diag`` of ``blockdiag_j (Q_A^j ⊗ Q_B^j) diag(weights_j) (·)ᵀ``."""
        QA, QB = self.eigenbases
        out = _left(None if QA is None else QA.square(), weights)
        return (out if QB is None else out @ QB.square().mT).reshape(-1)

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

    def dense_blocks(self) -> Tensor:
        """The ``G`` dense blocks ``(G, p q, p q)``."""
        g, p, q = self._dims
        QA, QB = self.QA, self.QB
        K = torch.einsum("gab,gcd->gacbd", QA, QB).reshape(g, p * q, p * q)
        return (K * self.eigenvalues.reshape(g, 1, -1)) @ K.mT

    def to_dense(self) -> Tensor:
        g, p, q = self._dims
        m = p * q
        out = torch.zeros(g, m, g, m, dtype=self.dtype, device=self.device)
        out.diagonal(dim1=0, dim2=2).copy_(self.dense_blocks().permute(1, 2, 0))
        return out.reshape(g * m, g * m)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._rotate_back(z, self.eigenvalues.rsqrt())

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._rotate_back(z, self.eigenvalues.sqrt())

    def add_diagonal(self, d: Scalar) -> PSDOperator:
        """``A + diag(d)``: a scalar keeps the eigenbases; a vector constant except on one
        column of the second factor (the bias of every group, with its own prior precision)
        gives the exact :class:`KroneckerBatchColumnShift`."""
        d = self._diag_arg(d)
        if d.ndim == 0:
            return self._modified("shift", d)
        from bayescurv.linalg.kronecker_column import column_shift

        g, p, q = self._dims
        split = column_shift(d, (g * p, q))
        if split is None:
            raise InvalidArgumentError(
                "A per-parameter (non-constant) diagonal added to a Kronecker-factored block has "
                "no exact Kronecker eigendecomposition unless it is constant except on one column "
                "(a bias). Use a scalar, per-layer or per-tensor prior precision "
                "(BlockDiagonal.add_diagonal_per_block), or the 'diag' or 'full' structure."
            )
        const, column, delta = split
        shifted = self._modified("shift", const)
        return shifted if column is None else KroneckerBatchColumnShift(shifted, column, delta)

    def to_linear_operator(self) -> LinearOperator:
        return BlockDiagLinearOperator(DenseLinearOperator(self.dense_blocks()))


class KroneckerBatchColumnShift(ColumnShift):
    r""":math:`A = K + \Delta\,(I_{G p} \otimes e_j e_j^\top)` for a :class:`KroneckerBatch`
    ``K``: the batched form of :class:`~bayescurv.linalg.kronecker_column.KroneckerColumnShift`
    (see its docstring for the algebra). In the eigenbasis every row ``(g, o)`` is
    :math:`\mathrm{diag}(E_{go}) + \Delta u_g u_g^\top` with :math:`u_g = Q_B^{g\top} e_j`,
    so every operation is closed form (Sherman–Morrison, the determinant lemma)."""

    base: KroneckerBatch

    def _dims(self) -> tuple[int, int, int]:
        return (self.base.num_groups, *self.base.factor_sizes)

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """``E`` ``(G, p, q)``, ``u`` ``(G, 1, q)`` and ``s = Σ_i u_i² / E_i`` ``(G, p)``."""
        e = self.base.eigenvalues
        QB = self.base.eigenbases[1]
        if QB is None:
            u = torch.zeros(e.shape[0], 1, e.shape[2], dtype=e.dtype, device=e.device)
            u[..., self.column] = 1
        else:
            u = QB[:, self.column, None, :]
        return e, u, (u.square() / e).sum(-1)

    def _rotate(self, v: Tensor) -> tuple[Tensor, object]:
        V, vec = self._as_matrix(v)
        return self.base.to_eigenbasis(V.mT.reshape(-1, *self._dims())), vec

    def _unrotate(self, X: Tensor, vec: object) -> Tensor:
        return finish(self.base.from_eigenbasis(X).reshape(-1, self.size).mT, vec)

    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        out = self.base.matvec(V)
        extra = torch.zeros_like(out).reshape(*self._dims(), -1)
        extra[:, :, self.column] = self.delta * V.reshape(*self._dims(), -1)[:, :, self.column]
        return finish(out + extra.reshape(self.size, -1), vec)

    def solve(self, v: Tensor) -> Tensor:
        e, u, s = self._pieces()
        X, vec = self._rotate(v)
        Y = X / e
        beta = self.delta / (1 + self.delta * s)  # (G, p)
        proj = (Y * u).sum(-1, keepdim=True)
        return self._unrotate(Y - beta[..., None] * proj * (u / e), vec)

    def logdet(self) -> Tensor:
        e, _, s = self._pieces()
        lift = 1 + self.delta * s
        if bool((lift <= 0).any()):
            raise NumericalError("KroneckerBatchColumnShift is not positive definite "
                                 "(a column shift larger than the block allows).")
        return e.log().sum() + lift.log().sum()

    def _bump(self) -> Tensor:
        bump = torch.zeros(self._dims(), dtype=self.dtype, device=self.device)
        bump[..., self.column] = 1
        return self.delta * bump.reshape(-1)

    def diagonal(self) -> Tensor:
        return self.base.diagonal() + self._bump()

    def inv_diagonal(self) -> Tensor:
        e, u, s = self._pieces()
        beta = self.delta / (1 + self.delta * s)
        QA, QB = self.base.eigenbases
        r = (u / e) if QB is None else (u / e) @ QB.mT  # (G, p, q)
        corr = beta[..., None] * r.square()
        corr = corr if QA is None else QA.square() @ corr
        return self.base.inv_diagonal() - corr.reshape(-1)

    def to_dense(self) -> Tensor:
        return self.base.to_dense() + torch.diag(self._bump())

    def _root_matvec(self, z: Tensor, power: float) -> Tensor:
        e, u, _ = self._pieces()
        Z, vec = self._as_matrix(z)
        X = Z.mT.reshape(-1, *self._dims())
        w = u * e.rsqrt()  # (G, p, q)
        n2 = w.square().sum(-1)  # (G, p)
        lift = (1 + self.delta * n2).rsqrt() if power < 0 else (1 + self.delta * n2).sqrt()
        gamma = (lift - 1) / n2
        X = X + gamma[..., None] * (X * w).sum(-1, keepdim=True) * w
        return self._unrotate(X * e.pow(power), vec)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._root_matvec(z, -0.5)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._root_matvec(z, 0.5)

    def scale(self, c: Scalar) -> KroneckerBatchColumnShift:
        c = self._scalar(c, "c", nonnegative=True)
        return KroneckerBatchColumnShift(self.base.scale(c), self.column, self.delta * c)

    def add_diagonal(self, d: Scalar) -> KroneckerBatchColumnShift:
        from bayescurv.linalg.kronecker_column import column_shift

        d = self._diag_arg(d)
        if d.ndim == 0:
            return KroneckerBatchColumnShift(self.base.add_diagonal(d), self.column, self.delta)
        g, p, q = self._dims()
        split = column_shift(d, (g * p, q))
        if split is None or split[1] not in (None, self.column):
            raise InvalidArgumentError(
                "a diagonal added to a Kronecker block must be constant except on one column "
                "of its second factor (the bias); use structure='diag' or 'full'"
            )
        const, column, delta = split
        return KroneckerBatchColumnShift(self.base.add_diagonal(const), self.column,
                                         self.delta + (0 if column is None else delta))

    def to_linear_operator(self) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())
