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

A truncated ``K`` (:meth:`~bayescurv.linalg.KroneckerEigen.truncate`: ``Q_A`` ``(p, r_a)``,
``Q_B`` ``(q, r_b)``, ``δ`` on the discarded directions) stays exact: ``A`` commutes with
:math:`Q_A Q_A^\top \otimes I`, so it splits into the ``p - r_a`` discarded rows, where it is
:math:`I \otimes D` with the diagonal :math:`D = \delta I + \Delta e_j e_j^\top`, and the
``r_a`` kept rows, where row ``o`` is :math:`M_o + \Delta e_j e_j^\top` with
:math:`M_o = Q_B\,diag(E_o)\,Q_B^\top + \delta (I - Q_B Q_B^\top)`; Sherman–Morrison on
:math:`M_o` with :math:`m_o = M_o^{-1} e_j`, :math:`s_o = e_j^\top m_o
= \sum_i u_i^2 / E_{oi} + (1 - \lVert u \rVert^2)/\delta` as above.
"""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NumericalError, ShapeError
from bayescurv.linalg.base import Layout, PSDOperator, Scalar, finish
from bayescurv.linalg.kronecker import KroneckerEigen

__all__ = ["KroneckerColumnShift", "ColumnShift"]


class ColumnShift(PSDOperator):
    """What every ``K + Δ (I ⊗ e_j e_jᵀ)`` operator holds: the Kronecker ``base`` (one block,
    or a batch of groups), the ``column`` ``j`` of the second factor (the bias column of
    ``[W | b]``) and the shift ``Δ``; metadata is the base's."""

    def __init__(self, base: PSDOperator, column: int, delta: Tensor) -> None:
        p, q = base.factor_sizes
        if not 0 <= column < q:
            raise ShapeError(f"column must lie in [0, {q}), got {column}.")
        self.base = base
        self.column = int(column)
        self.delta = torch.as_tensor(delta, dtype=base.dtype, device=base.device).reshape(())

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


class KroneckerColumnShift(ColumnShift):
    """``A = K + Δ (I ⊗ e_j e_jᵀ)`` for a :class:`KroneckerEigen` ``K`` (module docstring);
    ``A`` must be positive definite (``E > 0`` and ``E + Δ uuᵀ`` positive rowwise)."""

    base: KroneckerEigen

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

    # ------------------------------------------------------------------ truncated base
    def _kept_rows(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Truncated base (module docstring): ``E`` ``(r_a, r_b)``, ``δ``, ``m``
        ``(r_a, q)`` (rows :math:`M_o^{-1} e_j`), ``s`` ``(r_a,)`` and ``d`` ``(q,)``, the
        diagonal of ``D``."""
        e, delta = self.base.eigenvalues, self.base.complement_power(1, positive=True)
        QB = self.base.eigenbases[1]
        q = self.factor_sizes[1]
        ej = torch.zeros(q, dtype=e.dtype, device=e.device)
        ej[self.column] = 1
        if QB is None:
            m = ej / e
        else:
            m = (QB[self.column] * (e.reciprocal() - 1 / delta)) @ QB.mT + ej / delta
        return e, delta, m, m[:, self.column], delta + self.delta * ej

    def _m_power(self, X: Tensor, e: Tensor, delta: Tensor, power: float) -> Tensor:
        """``M_o^power x_o`` for the rows ``X`` ``(k, r_a, q)``."""
        QB = self.base.eigenbases[1]
        if QB is None:
            return X * e.pow(power)
        return ((X @ QB) * (e.pow(power) - delta.pow(power))) @ QB.mT + delta.pow(power) * X

    def _split_rows(self, v: Tensor) -> tuple[Tensor, Tensor, Layout]:
        """``(Q_Aᵀ V, (I - Q_A Q_Aᵀ) V)`` of ``v`` as ``(k, ·, q)`` matrices."""
        V, vec = self._as_matrix(v)
        p, q = self.factor_sizes
        X = V.mT.reshape(-1, p, q)
        QA = self.base.eigenbases[0]
        if QA is None:
            return X, torch.zeros_like(X), vec
        kept = QA.mT @ X
        return kept, X - QA @ kept, vec

    def _join_rows(self, kept: Tensor, rest: Tensor, vec: Layout) -> Tensor:
        QA = self.base.eigenbases[0]
        p, q = self.factor_sizes
        out = (kept if QA is None else QA @ kept) + rest
        return finish(out.reshape(-1, p * q).mT, vec)

    def _truncated_solve(self, v: Tensor) -> Tensor:
        e, delta, m, s, d = self._kept_rows()
        X, R, vec = self._split_rows(v)
        beta = self.delta / (1 + self.delta * s)  # (r_a,)
        Y = self._m_power(X, e, delta, -1)
        Y = Y - (beta * (m * X).sum(-1)).unsqueeze(-1) * m
        return self._join_rows(Y, R / d, vec)

    def _truncated_logdet(self) -> Tensor:
        _, delta, _, s, _ = self._kept_rows()
        lift = 1 + self.delta * s
        if bool((lift <= 0).any()) or bool(delta + self.delta <= 0):
            raise NumericalError("KroneckerColumnShift is not positive definite "
                                 "(a column shift larger than the block allows).")
        p, ra = self.factor_sizes[0], self.base.factor_ranks[0]
        return (self.base.logdet() + lift.log().sum()
                + (p - ra) * torch.log1p(self.delta / delta))

    def _truncated_inv_diagonal(self) -> Tensor:
        e, delta, m, s, d = self._kept_rows()
        beta = self.delta / (1 + self.delta * s)
        QA, QB = self.base.eigenbases
        mdiag = ((e.reciprocal() - 1 / delta) @ QB.square().mT + 1 / delta
                 if QB is not None else e.reciprocal())  # diag(M_o⁻¹), (r_a, q)
        kept = mdiag - beta[:, None] * m.square()
        if QA is None:
            return kept.reshape(-1)
        out = QA.square() @ kept + (1 - QA.square().sum(1, keepdim=True)) / d
        return out.reshape(-1)

    def _truncated_root(self, z: Tensor, power: float) -> Tensor:
        """The symmetric-on-rows root of the module docstring: ``M_o^{power}
        (I + γ w_o w_oᵀ)`` on the kept rows (``w_o = M_o^{-1/2} e_j``), ``D^{power}`` on the
        discarded ones; ``power = ±1/2``."""
        e, delta, _, s, d = self._kept_rows()
        X, R, vec = self._split_rows(z)
        q = self.factor_sizes[1]
        ej = torch.zeros(1, 1, q, dtype=e.dtype, device=e.device)
        ej[..., self.column] = 1
        w = self._m_power(ej, e, delta, -0.5)[0]  # (r_a, q), |w_o|² = s_o
        lift = 1 + self.delta * s
        gamma = ((lift.rsqrt() if power < 0 else lift.sqrt()) - 1) / s
        X = X + (gamma * (X * w).sum(-1)).unsqueeze(-1) * w
        return self._join_rows(self._m_power(X, e, delta, power), R * d.pow(power), vec)

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        out = self.base.matvec(V)
        p, q = self.factor_sizes
        extra = torch.zeros_like(out).reshape(p, q, -1)
        extra[:, self.column] = self.delta * V.reshape(p, q, -1)[:, self.column]
        return finish(out + extra.reshape(p * q, -1), vec)

    def solve(self, v: Tensor) -> Tensor:
        if self.base.truncated:
            return self._truncated_solve(v)
        e, u, s = self._pieces()
        X, vec = self._rotate(v)
        Y = X / e  # (k, p, q)
        beta = self.delta / (1 + self.delta * s)  # (p,)
        proj = (Y * u).sum(-1, keepdim=True)  # (k, p, 1): uᵀ E⁻¹ x per row
        Y = Y - beta[:, None] * proj * (u / e)
        return self._unrotate(Y, vec)

    def logdet(self) -> Tensor:
        if self.base.truncated:
            return self._truncated_logdet()
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
        if self.base.truncated:
            return self._truncated_inv_diagonal()
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
        if self.base.truncated:
            return self._truncated_root(z, -0.5)
        return self._root_matvec(z, -0.5)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        if self.base.truncated:
            return self._truncated_root(z, 0.5)
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
