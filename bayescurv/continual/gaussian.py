r"""Predict and update steps for a diagonal-plus-low-rank precision
:math:`\Lambda = D + U S U^\top` (``D`` ``(P,)`` positive, ``U`` ``(P, k)`` orthonormal columns,
``S`` ``(k,)`` non-negative, descending), i.e. a
:class:`~bayescurv.linalg.LowRankPlusDiagonal`.

**Predict (exact).** For ``A = diag(a)``, ``Q = diag(q)`` and ``W = U S^{1/2}``, Woodbury
twice gives, with ``E = a²/d + q`` (elementwise, must be ``> 0``):

.. math::
    (A \Lambda^{-1} A + Q)^{-1} = D^- + Z M^{-1} Z^\top, \qquad
    D^- = \frac{d}{a^2 + q d}, \quad Z = \operatorname{diag}\Big(\frac{a}{a^2 + q d}\Big) W,
    \quad M = I_k + W^\top \operatorname{diag}\Big(\frac{q}{a^2 + q d}\Big) W \succeq I_k.

(Write :math:`A\Lambda^{-1}A + Q = E - V C^{-1} V^\top` with ``V = a W / d``,
``C = I + W^\top D^{-1} W`` and apply Woodbury to the difference.) The rank does not grow,
so the predict step makes **no approximation**: its diagonal-plus-rank-``k`` result is the
exact predicted precision; ``Z M^{-1} Z^\top`` is put back in canonical form by a thin SVD
of ``Z L^{-\top}`` (``M = L L^\top``), ``O(P k^2)``.

**Update (truncated).** Adding a task's curvature ``G ≈ V diag(g) Vᵀ (+ diag(r))`` gives
``D + diag(r) + B Bᵀ`` with ``B = [U S^{1/2}, V g^{1/2}]`` of rank ``k + r``. With the thin
SVD ``B = Y Σ Rᵀ`` (from the Gram matrix ``BᵀB``, :func:`canonical`), the ``k`` leading
columns are kept: ``U ← Y_{:k}``, ``S ← Σ_{:k}²``. The
discarded part ``Δ = Y_{k:} Σ_{k:}² Y_{k:}ᵀ ⪰ 0`` is

- dropped (``fold=False``): the kept precision is ``Λ − Δ ⪯ Λ`` (never over-confident) and
  ``‖Δ‖₂ = σ_{k+1}²`` (Eckart-Young: the best rank-``k`` approximation of ``B Bᵀ``);
- or its diagonal is folded into ``D`` (``fold=True``): the diagonal and the trace of the
  precision stay exact; the error ``diag(Δ) − Δ`` is indefinite with zero diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NumericalError, ShapeError
from bayescurv.linalg import LowRankPlusDiagonal, internal_dtype

__all__ = ["canonical", "predict_precision", "add_low_rank"]


def canonical(B: Tensor, d: Tensor, rank: int | None = None, fold: bool = False
              ) -> tuple[LowRankPlusDiagonal, Tensor]:
    """``diag(d) + B Bᵀ`` as ``LowRankPlusDiagonal(Y, σ², d)`` with orthonormal ``Y`` and
    descending ``σ²``, truncated to ``rank`` columns (default: keep all).

    ``σ², W`` come from the small Gram matrix ``BᵀB = W diag(σ²) Wᵀ`` (formed in ``B``'s
    dtype, decomposed in :func:`~bayescurv.linalg.internal_dtype`) and ``Y = B W σ⁻¹``:
    ``O(P k²)`` in two matrix products, several times faster than a tall SVD. Directions
    with ``σ² ≤ ε σ²_max r`` (``r`` columns; the Gram matrix's rounding) are dropped from the
    low rank (folded into ``d`` with ``fold``). ``fold`` adds
    ``diag(B Bᵀ) − diag(Y_k σ²_k Y_kᵀ)`` (``O(P k)``) to ``d``.

    Returns the operator and the discarded squared singular values ``σ_{k+1:}²``.
    """
    if B.shape[1] == 0:
        return LowRankPlusDiagonal(B, B.new_zeros(0), d), B.new_zeros(0)
    return _from_gram([B], B.mT @ B, d, rank, fold)


def _from_gram(parts: list[Tensor], gram: Tensor, d: Tensor, rank: int | None, fold: bool
               ) -> tuple[LowRankPlusDiagonal, Tensor]:
    """:func:`canonical` of ``B = [parts...]`` (concatenated columns) given ``gram = BᵀB``."""
    dt = parts[0].dtype
    lam, W = torch.linalg.eigh(gram.to(internal_dtype(dt)))
    lam, W = lam.flip(0).clamp_min(0), W.flip(1)
    k = lam.shape[0] if rank is None else min(rank, lam.shape[0])
    tiny = lam[0] * torch.finfo(dt).eps * lam.shape[0]  # below: rounding of the Gram matrix
    keep = int((lam[:k] > tiny).sum()) if k > 0 else 0
    s = lam[:keep].to(dt)
    Wk = W[:, :keep].to(dt) * s.rsqrt()
    Y, row = 0, 0
    for M in parts:  # Y = B W_k σ_k⁻¹ without forming B
        Y = Y + M @ Wk[row:row + M.shape[1]]
        row += M.shape[1]
    if not isinstance(Y, Tensor):
        Y = parts[0].new_zeros(parts[0].shape[0], 0)
    if fold and keep < lam.shape[0]:
        rest = sum(M.square().sum(-1) for M in parts) - Y.square() @ s
        d = d + rest.clamp_min(0).to(d)
    return LowRankPlusDiagonal(Y, s, d), lam[k:].to(dt)


def predict_precision(
    prec: LowRankPlusDiagonal, scale: Tensor | None = None, noise: Tensor | None = None,
    decay: float = 1.0,
) -> LowRankPlusDiagonal:
    """``γ (A Λ⁻¹ A + Q)⁻¹`` for ``Λ = prec``, ``A = diag(scale)``, ``Q = diag(noise)``; exact,
    same rank (see the module docstring)."""
    d, U, s = prec.d, prec.U, prec.s
    P = d.shape[0]
    a = torch.ones_like(d) if scale is None else scale.to(d)
    q = torch.zeros_like(d) if noise is None else noise.to(d)
    if a.shape != (P,) or q.shape != (P,):
        raise ShapeError(f"scale and noise must have shape ({P},), got {a.shape}, {q.shape}")
    if bool((q < 0).any()):
        raise InvalidArgumentError("the process noise Q must be PSD (noise >= 0)")
    denom = a.square() + q * d  # d (a²/d + q)
    if bool((denom <= 0).any()):
        raise InvalidArgumentError("scale = 0 with noise = 0 gives a degenerate prediction")
    W = U * s.clamp_min(0).sqrt()
    d_new = d / denom
    Z = W * (a / denom).unsqueeze(-1)
    eye = torch.eye(W.shape[1], dtype=d.dtype, device=d.device)
    M = eye + W.mT @ (W * (q / denom).unsqueeze(-1))
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:  # M ⪰ I in exact arithmetic
        raise NumericalError("predict: the capacitance I + Wᵀ diag(q/(a²+qd)) W is not PD")
    R = torch.linalg.solve_triangular(L, Z.mT, upper=False).mT  # Z L⁻ᵀ, (P, k)
    out, _ = canonical(R, d_new)
    return out.scale(decay) if decay != 1.0 else out


def add_low_rank(
    prec: LowRankPlusDiagonal, V: Tensor, g: Tensor, diag: Tensor | None = None, *,
    rank: int, fold: bool = True,
) -> tuple[LowRankPlusDiagonal, Tensor]:
    """``Λ + V diag(g) Vᵀ + diag(diag)`` truncated to ``rank`` (see the module docstring).

    Returns the new precision and the discarded squared singular values.
    """
    if V.shape[0] != prec.size or g.shape != (V.shape[1],):
        raise ShapeError(f"V must be ({prec.size}, r) and g (r,), got {V.shape}, {g.shape}")
    a, b = prec.s.clamp_min(0).sqrt(), g.clamp_min(0).sqrt()
    d = prec.d if diag is None else prec.d + diag
    if V.shape[1] + prec.rank == 0:
        return LowRankPlusDiagonal(prec.U, prec.s, d), g
    # U and V have orthonormal columns (canonical form, eigensolver output): only the cross
    # block UᵀV of the Gram matrix needs the P-length vectors
    cross = a.unsqueeze(-1) * (prec.U.mT @ V) * b
    gram = torch.cat([torch.cat([torch.diag(a.square()), cross], 1),
                      torch.cat([cross.mT, torch.diag(b.square())], 1)])
    return _from_gram([prec.U * a, V * b], gram, d, rank, fold)
