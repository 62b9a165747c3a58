r"""Kronecker-factored PSD matrix kept in its eigenbasis (K-FAC, EKFAC).

Vectors of length ``n = p q`` are the row-major ``vec_r(V)`` of a ``(p, q)`` matrix ``V``,
so that ``kron(A, B) vec_r(V) = vec_r(A V Bᵀ)`` (``torch.kron`` convention).

Wide layers (:meth:`KroneckerEigen.truncate`): a factor may keep only its top-``r``
eigenpairs, ``Q_A`` ``(p, r_a)`` with orthonormal columns; the discarded part of the factor is
zero, so on the complement of ``span(Q_A ⊗ Q_B)`` in ``R^{pq}`` — which holds the mixed
products ``kept ⊗ discarded`` too — the operator ``c K + δ I`` is ``δ``. With
:math:`P = Q_A Q_A^\top \otimes Q_B Q_B^\top`,

.. math::
    cK + \delta I = Q\,diag(c\Lambda + \delta)\,Q^\top + \delta (I - P),\qquad
    (cK + \delta I)^{-1} = Q\,diag\big(\tfrac{1}{c\Lambda+\delta}\big)\,Q^\top
      + \tfrac{1}{\delta}(I - P),

:math:`\log\det = \sum \log(c\Lambda + \delta) + (pq - r_a r_b)\log\delta`. Storage is
``p r_a + q r_b + r_a r_b`` entries instead of ``p² + q² + pq``.
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

from bayescurv.errors import InvalidArgumentError, NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, affine, finish
from bayescurv.linalg.eigh import robust_eigh

__all__ = ["KroneckerEigen", "Kronecker", "kronecker", "check_factor_rank"]


class _Eig:
    """Eigendecomposition of two Kronecker factors, computed once on first use. A factor
    given as a 1-D tensor is diagonal: its eigenbasis is the identity, stored as ``None``
    (never materialised, so an embedding's ``V x V`` factor costs ``O(V)``)."""

    def __init__(self, A: Tensor | None, B: Tensor | None, name: str = "") -> None:
        self.A, self.B = A, B
        self.name = name  # for error messages: which layer the factors belong to
        self.value: tuple | None = None

    def get(self) -> tuple:
        if self.value is None:
            with torch.no_grad():
                what = "Kronecker factor" + (f" of {self.name}" if self.name else "")
                lam_a, qa = _eigh(self.A, f"first {what}")
                lam_b, qb = _eigh(self.B, f"second {what}")
            lam_a, lam_b = lam_a.clamp_min(0), lam_b.clamp_min(0)
            self.value = (qa, qb, torch.outer(lam_a, lam_b), (lam_a, lam_b))
            self.A = self.B = None
        return self.value


def _eigh(F: Tensor, what: str = "Kronecker factor") -> tuple[Tensor, Tensor | None]:
    """``(λ, Q)`` of a symmetric factor (:func:`~bayescurv.linalg.eigh.robust_eigh`: a
    rank-deficient factor never ends in a LAPACK error); ``(F, None)`` for a diagonal one
    given as ``(p,)``."""
    if F.ndim == 1:
        return F, None
    return robust_eigh(F, what)


def _left(Q: Tensor | None, X: Tensor) -> Tensor:
    """``Q X`` with ``None`` standing for the identity."""
    return X if Q is None else Q @ X


def _left_t(Q: Tensor | None, X: Tensor) -> Tensor:
    """``Qᵀ X`` with ``None`` standing for the identity."""
    return X if Q is None else Q.mT @ X


class KroneckerEigen(PSDOperator):
    """``A = (Q_A ⊗ Q_B) diag(vec_r(c Λ + δ)) (Q_A ⊗ Q_B)ᵀ + δ (I - P)``.

    ``Q_A`` ``(p, r_a)`` and ``Q_B`` ``(q, r_b)`` have orthonormal columns (orthogonal when
    ``r_a = p``, ``r_b = q``; then ``P = I``), ``Λ`` ``(r_a, r_b)`` holds the non-negative base
    eigenvalues (``outer(λ_A, λ_B)`` for K-FAC, arbitrary for EKFAC), ``c`` and ``δ`` are
    scalars (differentiable). A truncated basis (``r_a < p`` or ``r_b < q``,
    :meth:`truncate`) leaves the complement of ``span(Q_A ⊗ Q_B)`` at ``δ`` (module
    docstring). Products go through ``V ↦ Q_Aᵀ V Q_B``; the ``(pq, pq)`` matrix is never
    formed except by :meth:`to_dense`. ``Q_A = None`` (or ``Q_B = None``) stands for the
    identity: the factor was diagonal (an embedding's row counts), and its ``p x p`` basis
    is never formed.
    """

    def __init__(self, QA: Tensor | None, QB: Tensor | None, eigenvalues: Tensor,
                 factor_eigenvalues: tuple[Tensor, Tensor] | None = None) -> None:
        if eigenvalues.ndim != 2:
            raise ShapeError(f"eigenvalues must be 2-D (r_a, r_b), got "
                             f"{tuple(eigenvalues.shape)}.")
        for Q in (QA, QB):
            if Q is not None and (Q.ndim != 2 or Q.shape[1] > Q.shape[0]):
                raise ShapeError(
                    f"QA and QB must be (n, r) with r <= n (orthonormal columns), got "
                    f"{_shape(QA)} and {_shape(QB)}."
                )
        ranks = (eigenvalues.shape[0] if QA is None else QA.shape[1],
                 eigenvalues.shape[1] if QB is None else QB.shape[1])
        if eigenvalues.shape != ranks:
            raise ShapeError(
                f"eigenvalues must have shape {ranks}, got {tuple(eigenvalues.shape)}."
            )
        sizes = (ranks[0] if QA is None else QA.shape[0],
                 ranks[1] if QB is None else QB.shape[0])
        self._eig = _Eig(None, None)
        self._eig.value = (QA, QB, eigenvalues.clamp_min(0),
                           None if factor_eigenvalues is None else tuple(factor_eigenvalues))
        self._sizes = sizes
        self._meta = eigenvalues

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, name: str = "") -> KroneckerEigen:
        """``kron(A, B)`` for PSD ``A`` ``(p, p)``, ``B`` ``(q, q)``; a factor given as a 1-D
        tensor is the diagonal of a diagonal factor (kept diagonal: no ``eigh``, no dense
        matrix). The eigh (no grad) run lazily, on the first operation that needs them, and
        are shared by every scaled or shifted copy: building the curvature costs no
        decomposition until a posterior uses it."""
        for name, F in (("A", A), ("B", B)):
            if F.ndim != 1 and (F.ndim != 2 or F.shape[0] != F.shape[1]):
                raise ShapeError(
                    f"Kronecker factor {name} must be square or a 1-D diagonal, got "
                    f"{tuple(F.shape)}."
                )
        if A.dtype != B.dtype or A.device != B.device:
            raise ShapeError(
                f"Kronecker factors must share dtype and device, got {A.dtype}/{A.device} and "
                f"{B.dtype}/{B.device}."
            )
        op = cls.__new__(cls)
        op._eig = _Eig(A.detach(), B.detach(), name)
        op._sizes = (A.shape[0], B.shape[0])
        op._meta = A
        return op

    def truncate(self, rank: int) -> KroneckerEigen:
        r"""The same operator with every factor of more than ``rank`` rows cut to its top
        ``rank`` eigenpairs (the rest of the factor set to zero): ``Q_A`` ``(p, r_a)``,
        ``Λ`` ``(r_a, r_b)`` with ``r_a = min(p, rank)``; pending ``scale`` / ``add_diagonal``
        modifications are kept, so ``δ`` fills the discarded directions (module docstring).
        The kept eigenpairs are those of the largest factor eigenvalues (K-FAC), else of the
        largest marginal sums of ``Λ`` (EKFAC or a loaded operator: for ``Λ = λ_A λ_Bᵀ`` the
        same order). Diagonal factors (:attr:`diagonal_factors`; ``p`` entries already) are
        kept whole. Decomposes now (no longer lazily) and stores only the kept columns
        (copies: the full bases are freed with this operator).

        Raises:
            InvalidArgumentError: ``rank`` is not a positive integer.
        """
        check_factor_rank(rank)
        QA, QB, lam, fe = self._eig.get()
        keep = []
        for axis, (Q, n) in enumerate(zip((QA, QB), lam.shape)):
            if Q is None or n <= rank:
                keep.append(None)
                continue
            score = fe[axis] if fe is not None else lam.sum(1 - axis)
            keep.append(torch.topk(score, rank).indices.sort().values)
        if keep == [None, None]:
            return self
        ia, ib = keep
        if ia is not None:
            QA, lam = QA[:, ia].clone(), lam[ia]
        if ib is not None:
            QB, lam = QB[:, ib].clone(), lam[:, ib]
        if fe is not None:
            fe = tuple(e if i is None else e[i] for e, i in zip(fe, keep))
        op = KroneckerEigen(QA, QB, lam.clone(), fe)
        return op.with_modifications(self._mods) if self._mods else op

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
    def factor_ranks(self) -> tuple[int, int]:
        """``(r_a, r_b)``: the eigenpairs kept per factor (``(p, q)`` unless
        :meth:`truncate` cut them)."""
        if self._eig.value is None:  # lazily decomposed factors are kept whole
            return self._sizes
        return tuple(self._lam.shape)

    @property
    def truncated(self) -> bool:
        """Whether a factor keeps fewer eigenpairs than its size (:meth:`truncate`)."""
        return self.factor_ranks != self._sizes

    @property
    def QA(self) -> Tensor:
        """Eigenbasis ``(p, r_a)`` of the first factor (orthogonal ``(p, p)`` unless
        truncated). For a diagonal factor
        (:attr:`diagonal_factors`) this is an identity formed on access, ``p x p``: the
        operator itself never stores or uses it; prefer :meth:`to_eigenbasis`."""
        return self._basis(0)

    @property
    def QB(self) -> Tensor:
        """Eigenbasis ``(q, r_b)`` of the second factor (identity formed on access when
        diagonal, see :attr:`QA`)."""
        return self._basis(1)

    @property
    def eigenbases(self) -> tuple[Tensor | None, Tensor | None]:
        """``(Q_A, Q_B)`` as stored: ``None`` for a diagonal factor (identity, never formed;
        :attr:`QA` / :attr:`QB` form it)."""
        return (self._QA, self._QB)

    @property
    def factor_eigenvalues(self) -> tuple[Tensor, Tensor] | None:
        """``(λ_A, λ_B)`` of a K-FAC operator built from its factors (``Λ = outer(λ_A, λ_B)``);
        ``None`` when only ``Λ`` is known (EKFAC, or built from eigenvalues)."""
        return self._factor_eigs

    @property
    def diagonal_factors(self) -> tuple[bool, bool]:
        """Whether each factor is diagonal (eigenbasis the identity, never stored)."""
        return (self._QA is None, self._QB is None)

    def _basis(self, which: int) -> Tensor:
        Q = (self._QA, self._QB)[which]
        if Q is not None:
            return Q
        eye = torch.eye(self._sizes[which], dtype=self.dtype, device=self.device)
        # column-major like eigh's output: torch.kron fails on mixed memory layouts
        return eye.mT.contiguous().mT

    def to_eigenbasis(self, X: Tensor) -> Tensor:
        """``Q_Aᵀ X Q_B`` ``(..., r_a, r_b)`` for ``X`` ``(..., p, q)``."""
        X = _left_t(self._QA, X)
        return X if self._QB is None else X @ self._QB

    def from_eigenbasis(self, X: Tensor) -> Tensor:
        """``Q_A X Q_Bᵀ`` ``(..., p, q)`` for ``X`` ``(..., r_a, r_b)``."""
        X = _left(self._QA, X)
        return X if self._QB is None else X @ self._QB.mT

    def _squares(self) -> tuple[Tensor | None, Tensor | None]:
        return tuple(None if Q is None else Q.square() for Q in (self._QA, self._QB))

    @property
    def eigenvalues(self) -> Tensor:
        """Effective eigenvalues ``c Λ + δ`` on the kept basis, shape ``(r_a, r_b)``
        (differentiable in ``c``, ``δ``); a truncated operator is ``δ`` (:attr:`shift`) on the
        rest."""
        return affine(self._lam, *self._affine())

    @property
    def base_eigenvalues(self) -> Tensor:
        """Unscaled, unshifted ``Λ``, shape ``(r_a, r_b)``."""
        return self._lam

    # ------------------------------------------------------------------ eigenbasis maps
    def _apply(self, v: Tensor, weights: Tensor, name: str = "v",
               rest: Tensor | None = None) -> Tensor:
        """``(Q_A ⊗ Q_B) diag(vec_r(weights)) (Q_A ⊗ Q_B)ᵀ v`` (``+ rest · v`` when given)."""
        V, vec = self._as_matrix(v, name)
        p, q = self.factor_sizes
        X = V.mT.reshape(-1, p, q)  # (k, p, q)
        Y = self.from_eigenbasis(self.to_eigenbasis(X) * weights)
        if rest is not None:
            Y = Y + rest * X
        return finish(Y.reshape(-1, p * q).mT, vec)

    def complement_power(self, power: float, positive: bool = False) -> Tensor:
        """``δ^power``, the eigenvalue of a truncated operator's discarded directions
        (0-dim, differentiable).

        Raises:
            NumericalError: ``δ <= 0`` where a positive one is needed (negative ``power``,
                or ``positive``): the discarded directions have no curvature, so a
                truncated block needs a positive prior precision.
        """
        delta = self.shift
        if (power < 0 or positive) and bool(delta <= 0):
            raise NumericalError(
                "a truncated Kronecker block (factor_rank) is singular without a positive "
                f"diagonal shift (got {float(delta):.3g}): the discarded directions have no "
                "curvature. Add a positive prior precision (add_diagonal)"
            )
        return delta if power == 1 else delta.pow(power)

    def _on_kept(self, f: Tensor, power: float, name: str, v: Tensor) -> Tensor:
        """``Q diag(f) Qᵀ v + δ^power (I - P) v`` for ``f = e^power`` on the kept basis."""
        rest = self.complement_power(power)
        return self._apply(v, f - rest, name, rest)

    def _rotate_back(self, z: Tensor, weights: Tensor) -> Tensor:
        """``(Q_A ⊗ Q_B) diag(vec_r(weights)) z``."""
        Z, vec = self._as_matrix(z, "z")
        p, q = self.factor_sizes
        X = self.from_eigenbasis(Z.mT.reshape(-1, p, q) * weights)
        return finish(X.reshape(-1, p * q).mT, vec)

    def _diag_of(self, weights: Tensor) -> Tensor:
        """``diag((Q_A ⊗ Q_B) diag(vec_r(weights)) (Q_A ⊗ Q_B)ᵀ)``."""
        sa, sb = self._squares()
        out = _left(sa, weights)
        return (out if sb is None else out @ sb.mT).reshape(-1)

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        if self.truncated:
            return self._on_kept(self.eigenvalues, 1, "v", v)
        return self._apply(v, self.eigenvalues)

    def solve(self, v: Tensor) -> Tensor:
        if self.truncated:
            return self._on_kept(self.eigenvalues.reciprocal(), -1, "v", v)
        return self._apply(v, self.eigenvalues.reciprocal())

    def logdet(self) -> Tensor:
        out = self.eigenvalues.log().sum()
        if self.truncated:
            (p, q), (ra, rb) = self._sizes, self.factor_ranks
            out = out + (p * q - ra * rb) * self.complement_power(1, positive=True).log()
        return out

    def diagonal(self) -> Tensor:
        if self.truncated:  # diag(Q diag(e - δ) Qᵀ) + δ
            rest = self.complement_power(1)
            return self._diag_of(self.eigenvalues - rest) + rest
        return self._diag_of(self.eigenvalues)

    def inv_diagonal(self) -> Tensor:
        if self.truncated:
            rest = self.complement_power(-1)
            return self._diag_of(self.eigenvalues.reciprocal() - rest) + rest
        return self._diag_of(self.eigenvalues.reciprocal())

    def to_dense(self) -> Tensor:
        p, q = self.factor_sizes
        eye = [torch.eye(n, dtype=self.dtype, device=self.device) for n in (p, q)]
        K = torch.kron((eye[0] if self._QA is None else self._QA).contiguous(),
                       (eye[1] if self._QB is None else self._QB).contiguous())
        if self.truncated:
            rest = self.complement_power(1)
            return ((K * (self.eigenvalues - rest).reshape(-1)) @ K.mT
                    + rest * torch.eye(p * q, dtype=self.dtype, device=self.device))
        return (K * self.eigenvalues.reshape(-1)) @ K.mT

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        # truncated: the symmetric root Q diag(e^-1/2) Qᵀ + δ^-1/2 (I - P)
        if self.truncated:
            return self._on_kept(self.eigenvalues.rsqrt(), -0.5, "z", z)
        return self._rotate_back(z, self.eigenvalues.rsqrt())

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        if self.truncated:
            return self._on_kept(self.eigenvalues.sqrt(), 0.5, "z", z)
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
        def factor(Q: Tensor | None, lam: Tensor) -> LinearOperator | Tensor:
            return DiagLinearOperator(lam) if Q is None else (Q * lam) @ Q.mT

        def basis(Q: Tensor | None, n: int) -> LinearOperator | Tensor:
            return DiagLinearOperator(torch.ones(n, dtype=self.dtype, device=self.device)) \
                if Q is None else Q

        if self._factor_eigs is not None:
            lam_a, lam_b = self._factor_eigs
            A = factor(self._QA, lam_a * self.scale_factor)
            B = factor(self._QB, lam_b)
            return KroneckerProductLinearOperator(A, B).add_diagonal(self.shift)
        K = KroneckerProductLinearOperator(basis(self._QA, self._sizes[0]),
                                           basis(self._QB, self._sizes[1]))
        if self.truncated:  # Q diag(cΛ) Qᵀ + δ I
            rest = self.complement_power(1)
            lam = (self.eigenvalues - rest).clamp_min(0).reshape(-1).sqrt()
            return RootLinearOperator(MatmulLinearOperator(K, DiagLinearOperator(lam))
                                      ).add_diagonal(rest)
        root = MatmulLinearOperator(K, DiagLinearOperator(self.eigenvalues.reshape(-1).sqrt()))
        return RootLinearOperator(root)


Kronecker = KroneckerEigen


def _shape(Q: Tensor | None) -> tuple | None:
    return None if Q is None else tuple(Q.shape)


def check_factor_rank(factor_rank: int | None) -> None:
    """Validate ``factor_rank``: ``None`` or a positive integer.

    Raises:
        InvalidArgumentError: anything else.
    """
    if factor_rank is None:
        return
    if isinstance(factor_rank, bool) or not isinstance(factor_rank, int) or factor_rank < 1:
        raise InvalidArgumentError(
            f"factor_rank must be a positive integer or None, got {factor_rank!r}")


def kronecker(A: Tensor, B: Tensor) -> KroneckerEigen:
    """``kron(A, B)`` in eigenbasis form; see :meth:`KroneckerEigen.from_factors`."""
    return KroneckerEigen.from_factors(A, B)
