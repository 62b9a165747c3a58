"""Low-rank plus diagonal PSD matrices ``A = U diag(s) Uᵀ + diag(d)``.

With ``W = D^{-1/2} U diag(s)^{1/2}`` (``n x k``), ``A = D^{1/2} (I + W Wᵀ) D^{1/2}`` and the
capacitance ``C = I_k + Wᵀ W = L Lᵀ`` (always ``⪰ I``) give, in ``O(n k²)``:
``A⁻¹ = D^{-1/2} (I − W C⁻¹ Wᵀ) D^{-1/2}`` (Woodbury) and
``log det A = Σ log d + log det C`` (matrix determinant lemma).
"""

from __future__ import annotations

import torch
from linear_operator import LinearOperator
from linear_operator.operators import (
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
)
from torch import Tensor

from bayescurv.errors import NumericalError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, affine, finish

__all__ = ["LowRankPlusDiagonal", "LowRank"]


def _safe_sqrt(s: Tensor) -> Tensor:
    """``√s`` with zero (not infinite) gradient at ``s = 0``, so ``d/dc √(c s)`` stays finite."""
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


class LowRankPlusDiagonal(PSDOperator):
    """``A = U diag(s) Uᵀ + diag(d)``, ``U`` ``(n, k)``, ``s ≥ 0`` ``(k,)``, ``d > 0`` ``(n,)``.

    ``d`` may also be a float or 0-dim tensor (constant diagonal). Values are not checked
    (no device sync); a non-positive ``d`` gives NaN/Inf results.
    """

    def __init__(self, U: Tensor, s: Tensor, d: Scalar) -> None:
        if not isinstance(U, Tensor) or U.ndim != 2:
            raise ShapeError(f"U must be a 2-D tensor (n, k), got {getattr(U, 'shape', U)}.")
        if not isinstance(s, Tensor) or s.shape != (U.shape[1],):
            raise ShapeError(f"s must have shape ({U.shape[1]},), got {getattr(s, 'shape', s)}.")
        self._U, self._s = U, s.to(dtype=U.dtype, device=U.device)
        d = self._diag_arg(d, "d")
        self._d = d.expand(U.shape[0]) if d.ndim == 0 else d

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        return self._U.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._U.dtype

    @property
    def device(self) -> torch.device:
        return self._U.device

    @property
    def U(self) -> Tensor:
        """``(n, k)`` factor."""
        return self._U

    @property
    def s(self) -> Tensor:
        """Effective ``(k,)`` low-rank weights (``c · s``)."""
        c, _ = self._affine()
        return self._s if c is None else c * self._s

    @property
    def d(self) -> Tensor:
        """Effective ``(n,)`` diagonal (``c · d + δ``)."""
        return affine(self._d, *self._affine())

    @property
    def rank(self) -> int:
        return self._U.shape[1]

    # ------------------------------------------------------------------ internals
    def _W(self) -> tuple[Tensor, Tensor]:
        """``(W, d^{-1/2})`` with ``W = D^{-1/2} U diag(s)^{1/2}``."""
        d_isqrt = self.d.rsqrt()
        return d_isqrt.unsqueeze(-1) * self._U * _safe_sqrt(self.s), d_isqrt

    def _capacitance_chol(self, W: Tensor) -> Tensor:
        C = W.mT @ W + torch.eye(self.rank, dtype=self.dtype, device=self.device)
        return torch.linalg.cholesky(C)

    def _svd_sqrt(self, z: Tensor, power: float) -> Tensor:
        """``D^{±1/2} (I + V ((1 + Σ²)^{power} − 1) Vᵀ) z`` with ``W = V Σ Rᵀ`` (thin SVD)."""
        Z, vec = self._as_matrix(z, "z")
        W, d_isqrt = self._W()
        V, S, _ = torch.linalg.svd(W, full_matrices=False)
        f = (1 + S.square()).pow(power) - 1
        out = Z + V @ (f.unsqueeze(-1) * (V.mT @ Z))
        outer = d_isqrt if power < 0 else d_isqrt.reciprocal()
        return finish(outer.unsqueeze(-1) * out, vec)

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        out = self._U @ (self.s.unsqueeze(-1) * (self._U.mT @ V)) + self.d.unsqueeze(-1) * V
        return finish(out, vec)

    def solve(self, v: Tensor) -> Tensor:
        V, vec = self._as_matrix(v)
        W, d_isqrt = self._W()
        X = d_isqrt.unsqueeze(-1) * V
        X = X - W @ torch.cholesky_solve(W.mT @ X, self._capacitance_chol(W))
        return finish(d_isqrt.unsqueeze(-1) * X, vec)

    def logdet(self) -> Tensor:
        W, _ = self._W()
        L = self._capacitance_chol(W)
        return self.d.log().sum() + 2 * L.diagonal().log().sum()

    def diagonal(self) -> Tensor:
        return self._U.square() @ self.s + self.d

    def inv_diagonal(self) -> Tensor:
        W, _ = self._W()
        L = self._capacitance_chol(W)
        G = torch.linalg.solve_triangular(L, W.mT, upper=False)  # (k, n): rows of W L⁻ᵀ
        return (1 - G.square().sum(0)) / self.d

    def to_dense(self) -> Tensor:
        return (self._U * self.s) @ self._U.mT + torch.diag(self.d)

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._svd_sqrt(z, -0.5)

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._svd_sqrt(z, 0.5)

    def to_linear_operator(self) -> LinearOperator:
        root = LowRankRootLinearOperator(self._U * _safe_sqrt(self.s))
        return LowRankRootAddedDiagLinearOperator(root, DiagLinearOperator(self.d))


class LowRank(LowRankPlusDiagonal):
    """Singular ``A = U diag(s) Uᵀ`` (``d = 0``).

    ``matvec``, ``diagonal``, ``to_dense`` and ``sqrt_matvec`` work; inverse quantities raise
    :class:`~bayescurv.errors.NumericalError` until a positive diagonal is added
    (``add_diagonal`` returns a :class:`LowRankPlusDiagonal`).
    """

    def __init__(self, U: Tensor, s: Tensor) -> None:
        super().__init__(U, s, 0.0)

    def _singular(self, what: str) -> NumericalError:
        return NumericalError(
            f"LowRank.{what}: U diag(s) Uᵀ is singular (rank <= {self.rank} < {self.size}); "
            "add a positive diagonal first, e.g. op.add_diagonal(prior_precision)."
        )

    def solve(self, v: Tensor) -> Tensor:
        raise self._singular("solve")

    def logdet(self) -> Tensor:
        raise self._singular("logdet")

    def inv_diagonal(self) -> Tensor:
        raise self._singular("inv_diagonal")

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        raise self._singular("inv_sqrt_matvec")

    def sample_inverse(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        raise self._singular("sample_inverse")

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        """Symmetric root ``V Σ Vᵀ z`` with ``U diag(s)^{1/2} = V Σ Rᵀ``."""
        Z, vec = self._as_matrix(z, "z")
        V, S, _ = torch.linalg.svd(self._U * _safe_sqrt(self.s), full_matrices=False)
        return finish(V @ (S.unsqueeze(-1) * (V.mT @ Z)), vec)

    def add_diagonal(self, d: Scalar) -> LowRankPlusDiagonal:
        out = LowRankPlusDiagonal(self._U, self._s, 0.0).with_modifications(self.modifications)
        return out.add_diagonal(d)

    def to_linear_operator(self) -> LinearOperator:
        return LowRankRootLinearOperator(self._U * _safe_sqrt(self.s))
