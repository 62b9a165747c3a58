r"""A Kronecker block plus a different shift on one column of its second factor: the exact
posterior precision of a K-FAC/EKFAC layer with a bias when weight and bias have their own
prior precisions (``granularity="tensor"``).

With the row-major layout of :mod:`bayescurv.linalg.kronecker` (``W̃ = [W | b]`` of shape
``(p, q)``, the bias in column ``j``),

.. math::
    A = K + \Delta\,(I_p \otimes e_j e_j^\top),\qquad
    K = (Q_A \otimes Q_B)\,diag(\mathrm{vec}_r E)\,(Q_A \otimes Q_B)^\top .

In the eigenbasis, :math:`I_p \otimes e_j e_j^\top` becomes :math:`I_p \otimes u u^\top` with
:math:`u = Q_B^\top e_j` (row ``j`` of ``Q_B``), so ``A`` is block diagonal over the ``p``
rows with blocks :math:`diag(E_o) + \Delta u u^\top` — a rank-one update of a diagonal. Every
operation is then closed form in ``O(pq)`` after the rotation (matrix determinant lemma,
Sherman–Morrison), differentiable in ``Δ`` and in the scale and shift of ``K``; no
decomposition is recomputed when the priors change.
"""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, finish
from bayescurv.linalg.kronecker import KroneckerEigen

__all__ = ["KroneckerColumnShift"]


class KroneckerColumnShift(PSDOperator):
    """``A = K + Δ (I ⊗ e_j e_jᵀ)`` for a :class:`KroneckerEigen` ``K`` (module docstring);
    ``A`` must be positive definite (``E > 0`` and ``E + Δ uuᵀ`` positive rowwise)."""

    def __init__(self, base: KroneckerEigen, column: int, delta: Tensor) -> None:
        p, q = base.factor_sizes
        if not 0 <= column < q:
            raise ShapeError(f"column must lie in [0, {q}), got {column}.")
        self.base = base
        self.column = int(column)
        self.delta = torch.as_tensor(delta, dtype=base.dtype, device=base.device).reshape(())

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        return self.base.size

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def factor_sizes(self) -> tuple[int, int]:
        return self.base.factor_sizes

    # ------------------------------------------------------------------ eigenbasis pieces
    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """``E`` ``(p, q)``, ``u`` ``(q,)`` and ``s_o = Σ_i u_i² / E_oi`` ``(p,)``."""
        e = self.base.eigenvalues
        QB = self.base.eigenbases[1]
        if QB is None:  # diagonal second factor: u = e_j
            u = torch.zeros(e.shape[1], dtype=e.dtype, device=e.device)
            u[self.column] = 1
        else:
            u = QB[self.column]
        return e, u, (u.square() / e).sum(-1)

    def _rotate(self, v: Tensor) -> tuple[Tensor, bool]:
        V, vec = self._as_matrix(v)
        p, q = self.factor_sizes
        X = self.base.to_eigenbasis(V.mT.reshape(-1, p, q))  # (k, p, q)
        return X, vec

    def _unrotate(self, X: Tensor, vec: bool) -> Tensor:
        p, q = self.factor_sizes
        Y = self.base.from_eigenbasis(X)
        return finish(Y.reshape(-1, p * q).mT, vec)

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        out = self.base.matvec(V)
        p, q = self.factor_sizes
        extra = torch.zeros_like(out).reshape(p, q, -1)
        extra[:, self.column] = self.delta * V.reshape(p, q, -1)[:, self.column]
        return finish(out + extra.reshape(p * q, -1), vec)

    def solve(self, v: Tensor) -> Tensor:
        e, u, s = self._pieces()
        X, vec = self._rotate(v)
        Y = X / e  # (k, p, q)
        beta = self.delta / (1 + self.delta * s)  # (p,)
        proj = (Y * u).sum(-1, keepdim=True)  # (k, p, 1): uᵀ E⁻¹ x per row
        Y = Y - beta[:, None] * proj * (u / e)
        return self._unrotate(Y, vec)

    def logdet(self) -> Tensor:
        e, _, s = self._pieces()
        lift = 1 + self.delta * s
        if bool((lift <= 0).any()):
            raise NumericalError("KroneckerColumnShift is not positive definite "
                                 "(a column shift larger than the block allows).")
        return e.log().sum() + lift.log().sum()

    def diagonal(self) -> Tensor:
        p, q = self.factor_sizes
        d = self.base.diagonal().reshape(p, q)
        bump = torch.zeros_like(d)
        bump[:, self.column] = 1
        return (d + self.delta * bump).reshape(-1)

    def inv_diagonal(self) -> Tensor:
        e, u, s = self._pieces()
        beta = self.delta / (1 + self.delta * s)
        QA, QB = self.base.eigenbases
        r = (u / e) if QB is None else (u / e) @ QB.mT  # (p, q): Q_B E_o⁻¹ u per row o
        corr = beta[:, None] * r.square()
        corr = corr if QA is None else QA.square() @ corr
        return self.base.inv_diagonal() - corr.reshape(-1)

    def to_dense(self) -> Tensor:
        return self.base.to_dense() + torch.diag(self.diagonal() - self.base.diagonal())

    def _root_matvec(self, z: Tensor, power: float) -> Tensor:
        r"""``(Q_A ⊗ Q_B) E^{p} (I + γ w wᵀ)`` rowwise, with ``w = E^{-1/2} u`` and ``γ`` such
        that the product with its transpose is ``A`` (``power = 1/2``) or ``A⁻¹``
        (``power = -1/2``): :math:`(I + \Delta w w^\top)^{\pm 1/2} = I + \gamma w w^\top`."""
        e, u, _ = self._pieces()
        Z, vec = self._as_matrix(z)
        p, q = self.factor_sizes
        X = Z.mT.reshape(-1, p, q)
        w = u * e.rsqrt()  # (p, q)
        n2 = w.square().sum(-1)  # (p,)
        if power < 0:
            gamma = ((1 + self.delta * n2).rsqrt() - 1) / n2
        else:
            gamma = ((1 + self.delta * n2).sqrt() - 1) / n2
        X = X + gamma[:, None] * (X * w).sum(-1, keepdim=True) * w
        X = X * e.pow(power)
        return self._unrotate(X, vec)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._root_matvec(z, -0.5)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._root_matvec(z, 0.5)

    def scale(self, c: Scalar) -> KroneckerColumnShift:
        c = self._scalar(c, "c", nonnegative=True)
        return KroneckerColumnShift(self.base.scale(c), self.column, self.delta * c)

    def add_diagonal(self, d: Scalar) -> KroneckerColumnShift:
        d = self._diag_arg(d)
        if d.ndim == 0:
            return KroneckerColumnShift(self.base.add_diagonal(d), self.column, self.delta)
        split = column_shift(d, self.factor_sizes)
        if split is None or split[1] not in (None, self.column):
            raise InvalidArgumentError(
                "a diagonal added to a Kronecker block must be constant except on one column "
                "of its second factor (the bias); use structure='diag' or 'full'"
            )
        const, column, delta = split
        return KroneckerColumnShift(self.base.add_diagonal(const), self.column,
                                    self.delta + (0 if column is None else delta))

    def to_linear_operator(self) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())


def column_shift(d: Tensor, sizes: tuple[int, int]) -> tuple[Tensor, int | None, Tensor] | None:
    """Split a diagonal ``d`` ``(p q,)`` on the row-major ``(p, q)`` layout into a constant and
    a shift of one column: ``(const, column, delta)`` (``column`` ``None`` when ``d`` is
    constant); ``None`` when ``d`` has no such form. Keeps the autograd graph of ``d``."""
    p, q = sizes
    m = d.reshape(p, q)
    if not bool((m == m[:1]).all()):
        return None
    row = m[0]
    const = row[0] if q == 1 or bool(row[0] == row[1]) else row[-1]
    odd = (row != const).nonzero().reshape(-1)
    if odd.numel() == 0:
        return const, None, torch.zeros_like(const)
    if odd.numel() > 1:
        return None
    j = int(odd[0])
    return const, j, row[j] - const
