"""Abstract interface of the structured symmetric PSD matrices, and shared helpers.

Every operator represents an ``n x n`` symmetric positive (semi-)definite matrix ``A``.
Right-hand sides are vectors ``(n,)`` or matrices ``(n, k)``; results have the same shape.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from linear_operator import LinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError, NumericalError, ShapeError

Scalar = float | int | Tensor
Mod = tuple[str, Tensor]  # ("scale", c) or ("shift", δ)

__all__ = ["PSDOperator", "Scalar", "internal_dtype", "jittered_cholesky"]

#: floating dtypes whose curvature sums and decompositions are carried out in float64
_WIDENED = (torch.float16, torch.bfloat16, torch.float32)

#: the widened dtype of :func:`internal_dtype` (float64). ``benchmarks/scale.py --internal
#: float32`` sets it to float32 to measure what the float64 algebra costs on a device (a GPU
#: is slow in float64) and what accuracy it buys; not a user setting.
WIDE = torch.float64


def internal_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which curvature reductions and posterior decompositions run for a model
    of ``dtype``: ``float64`` for ``float16``/``bfloat16``/``float32`` (their rounding, about
    ``1e-7`` of the largest eigenvalue for float32, is far above the prior precisions that
    decide the evidence of an ill-conditioned curvature), the dtype itself otherwise
    (``float64``, complex). The one place this policy is decided."""
    return WIDE if dtype in _WIDENED else dtype


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The dtype in which per-input products of a model's own factors are formed (weight-
    sharing Jacobians :math:`\sum_t g_t a_t^\top`, their squares and Gram chunks) before
    their sums enter the :func:`internal_dtype` state: ``float32`` for
    ``float16``/``bfloat16``/``float32`` models — the factors carry float32 rounding already,
    so a float64 product adds no accuracy, only time — the dtype itself otherwise."""
    return torch.float32 if dtype in _WIDENED else dtype


class Layout(NamedTuple):
    """How :meth:`PSDOperator._as_matrix` reshaped and cast a right-hand side."""

    vector: bool
    dtype: torch.dtype | None  # the caller's dtype when it differs from the operator's


def jittered_cholesky(M: Tensor, *, initial_jitter: float = 1e-10, max_tries: int = 5) -> Tensor:
    """Lower Cholesky factor ``L`` with ``L Lᵀ = M + j I``, ``j`` as small as possible.

    Tries ``j = 0`` first, then ``j = initial_jitter · mean|diag(M)|``, multiplied by 10 on each
    of ``max_tries`` attempts; warns when jitter was needed. Batched ``M`` is supported.

    Raises:
        NonFiniteError: ``M`` holds NaN or Inf.
        NumericalError: ``M`` is not positive definite even after the largest jitter.
    """
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ShapeError(f"jittered_cholesky needs square matrices, got shape {tuple(M.shape)}.")
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info != 0).any()):
        return L
    if not bool(torch.isfinite(M).all()):
        raise NonFiniteError("jittered_cholesky: the matrix holds NaN or Inf values.")
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    base = M.detach().diagonal(dim1=-2, dim2=-1).abs().mean()
    base = torch.where(base > 0, base, torch.ones_like(base))
    jitter = initial_jitter * base
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(M + jitter * eye)
        if not bool((info != 0).any()):
            warnings.warn(
                f"Matrix was not numerically positive definite; added jitter {float(jitter):.3g} "
                "to its diagonal for the Cholesky factorization.",
                RuntimeWarning,
                stacklevel=2,
            )
            return L
        jitter = jitter * 10
    raise NumericalError(
        f"Cholesky factorization failed even with jitter {float(jitter / 10):.3g} added to the "
        "diagonal: the matrix is not positive definite. Add a larger positive diagonal "
        "(e.g. a stronger prior precision) or check the curvature for negative eigenvalues."
    )


class PSDOperator(ABC):
    """Symmetric PSD matrix ``A`` of size ``n x n`` with structure-exploiting linear algebra.

    ``scale`` and ``add_diagonal`` return shallow copies that share the base data (and its
    cached decomposition) and record the modification; the effective ``c`` and ``δ`` of
    ``A = c · A_base + diag(δ)`` are recomputed from the user's tensors on every call, so each
    result has a fresh autograd graph (calling ``backward`` on several results is fine).
    """

    _mods: tuple[Mod, ...] = ()

    # ------------------------------------------------------------------ metadata
    @property
    @abstractmethod
    def size(self) -> int:
        """Number of rows ``n``."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the stored tensors."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the stored tensors."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.size, self.size)

    # ------------------------------------------------------------------ algebra
    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""

    @abstractmethod
    def solve(self, v: Tensor) -> Tensor:
        """``A⁻¹ v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""

    @abstractmethod
    def logdet(self) -> Tensor:
        """``log det A`` as a 0-dim tensor."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        """``diag(A)``, shape ``(n,)``."""

    @abstractmethod
    def inv_diagonal(self) -> Tensor:
        """``diag(A⁻¹)``, shape ``(n,)`` (posterior marginal variances)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense ``(n, n)`` matrix."""

    @abstractmethod
    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        """``R z`` for a fixed ``R`` with ``R Rᵀ = A⁻¹`` (``z ~ N(0, I)`` ⇒ ``R z ~ N(0, A⁻¹)``)."""

    @abstractmethod
    def sqrt_matvec(self, z: Tensor) -> Tensor:
        """``S z`` for a fixed ``S`` with ``S Sᵀ = A``; ``z ~ N(0, I)`` gives ``S z ~ N(0, A)``."""

    def scale(self, c: Scalar) -> PSDOperator:
        """New operator ``c · A`` (``c ≥ 0`` a float or 0-dim tensor, may require grad)."""
        return self._modified("scale", self._scalar(c, "c", nonnegative=True))

    def add_diagonal(self, d: Scalar) -> PSDOperator:
        """New operator ``A + diag(d)``; ``d`` a float, 0-dim or ``(n,)`` tensor (may need grad)."""
        return self._modified("shift", self._diag_arg(d))

    @abstractmethod
    def to_linear_operator(self) -> LinearOperator:
        """The same matrix as a ``linear_operator.LinearOperator``."""

    # ------------------------------------------------------------------ derived
    def sample_inverse(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` draws from ``N(0, A⁻¹)``, shape ``(num_samples, n)``."""
        if int(num_samples) < 0:
            raise InvalidArgumentError(f"num_samples must be >= 0, got {num_samples}.")
        z = torch.randn(
            int(num_samples), self.size, generator=generator, dtype=self.dtype, device=self.device
        )
        return self.inv_sqrt_matvec(z.mT).mT

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ helpers
    def _modified(self, kind: str, x: Tensor) -> PSDOperator:
        """Shallow copy with ``(kind, x)`` appended to the modification chain."""
        return self.with_modifications(((kind, x),))

    @property
    def modifications(self) -> tuple[Mod, ...]:
        """The pending ``scale`` / ``add_diagonal`` modifications, oldest first, as
        ``("scale", c)`` / ``("shift", δ)`` pairs (empty for an unmodified operator)."""
        return self._mods

    def with_modifications(self, mods: tuple[Mod, ...]) -> PSDOperator:
        """Shallow copy with ``mods`` (e.g. another operator's :attr:`modifications`)
        appended to the modification chain; values are taken as already validated."""
        new = copy.copy(self)
        new._mods = self._mods + tuple(mods)
        new._reset_caches()
        return new

    def _reset_caches(self) -> None:  # noqa: B027 - optional hook
        """Drop per-instance caches that depend on the modification chain (hook)."""

    @property
    def scale_factor(self) -> Tensor:
        """``c`` of the pending ``scale`` modifications (0-dim; 1 when none)."""
        c, _ = self._affine()
        return torch.ones((), dtype=self.dtype, device=self.device) if c is None else c

    @property
    def shift(self) -> Tensor:
        """``δ`` of the pending ``add_diagonal`` modifications: 0-dim or ``(n,)`` (0 when
        none)."""
        _, shift = self._affine()
        return torch.zeros((), dtype=self.dtype, device=self.device) if shift is None else shift

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        """Effective ``(c, δ)`` of ``A = c · A_base + diag(δ)``; ``None`` stands for 1 / 0."""
        c: Tensor | None = None
        shift: Tensor | None = None
        for kind, x in self._mods:
            if kind == "scale":
                c = x if c is None else c * x
                shift = None if shift is None else shift * x
            else:
                shift = x if shift is None else shift + x
        return c, shift

    def _has_vector_shift(self) -> bool:
        return any(kind == "shift" and x.ndim == 1 for kind, x in self._mods)

    def _as_matrix(self, v: Tensor, name: str = "v") -> tuple[Tensor, Layout]:
        """Return ``(V, layout)`` with ``V`` of shape ``(n, k)`` in the operator's dtype;
        :func:`finish` undoes both (a right-hand side of another floating dtype, e.g. a
        float32 vector against a float64 posterior, is solved in the operator's precision and
        returned in its own dtype)."""
        if not isinstance(v, Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(v).__name__}.")
        cast = None
        if v.dtype != self.dtype and (v.is_floating_point() or v.is_complex()):
            cast, v = v.dtype, v.to(self.dtype)
        if v.ndim == 1 and v.shape[0] == self.size:
            return v.unsqueeze(-1), Layout(True, cast)
        if v.ndim == 2 and v.shape[0] == self.size:
            return v, Layout(False, cast)
        raise ShapeError(
            f"{name} must have shape ({self.size},) or ({self.size}, k), got {tuple(v.shape)}."
        )

    def _scalar(self, c: Scalar, name: str, nonnegative: bool = False) -> Tensor:
        """``c`` as a 0-dim tensor of this operator's dtype and device (keeps autograd)."""
        if isinstance(c, Tensor):
            if c.numel() != 1:
                raise ShapeError(f"{name} must be a scalar, got shape {tuple(c.shape)}.")
            c = c if c.ndim == 0 else c.reshape(())
            return c.to(dtype=self.dtype, device=self.device)
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise InvalidArgumentError(
                f"{name} must be a float or a tensor, got {type(c).__name__}."
            )
        if not math.isfinite(c):
            raise NonFiniteError(f"{name} must be finite, got {c}.")
        if nonnegative and c < 0:
            raise InvalidArgumentError(f"{name} must be >= 0 to keep the matrix PSD, got {c}.")
        return torch.tensor(float(c), dtype=self.dtype, device=self.device)

    def _diag_arg(self, d: Scalar, name: str = "d") -> Tensor:
        """``d`` as a 0-dim tensor (constant shift) or an ``(n,)`` tensor."""
        if isinstance(d, Tensor) and d.ndim >= 1 and d.numel() != 1:
            if d.ndim != 1 or d.shape[0] != self.size:
                raise ShapeError(
                    f"{name} must be a scalar or have shape ({self.size},), got {tuple(d.shape)}."
                )
            return d.to(dtype=self.dtype, device=self.device)
        return self._scalar(d, name)


def affine(x: Tensor, c: Tensor | None, shift: Tensor | None) -> Tensor:
    """``c · x + shift`` with ``None`` meaning 1 / 0 (broadcasting)."""
    if c is not None:
        x = c * x
    return x if shift is None else x + shift


def shift_times(shift: Tensor, V: Tensor) -> Tensor:
    """``diag(shift) V`` for a 0-dim or ``(n,)`` ``shift`` and ``V`` of shape ``(n, k)``."""
    return shift * V if shift.ndim == 0 else shift.unsqueeze(-1) * V


def finish(out: Tensor, layout: Layout | bool) -> Tensor:
    """Undo :meth:`PSDOperator._as_matrix` (shape and, where it cast, dtype)."""
    if isinstance(layout, Layout):
        out = out.squeeze(-1) if layout.vector else out
        return out if layout.dtype is None else out.to(layout.dtype)
    return out.squeeze(-1) if layout else out
