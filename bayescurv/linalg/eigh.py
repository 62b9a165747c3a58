r"""Symmetric eigendecomposition of curvature factors and blocks that does not end in a
LAPACK traceback.

``torch.linalg.eigh`` (``syevd``) can fail to converge on large, exactly rank-deficient
matrices such as the input factor of a 3x3 convolution applied to a 1x1 feature map (4608 x
4608, 4096 rows and columns exactly zero). :func:`robust_eigh` tries it first and then:

1. **deflation** (exact): with :math:`Z` the indices of exactly-zero rows (= columns) of a
   symmetric :math:`F` and :math:`N` the others,
   :math:`F = P^\top \mathrm{diag}(F_{NN}, 0_{ZZ}) P`, so
   :math:`F = Q\,\mathrm{diag}(\lambda)\,Q^\top` with :math:`(\lambda_N, Q_N)` the
   eigendecomposition of the principal submatrix :math:`F_{NN}` (scattered into rows
   :math:`N`) and :math:`\lambda_Z = 0` with unit vectors :math:`e_i, i \in Z`;
2. **scipy** ``eigh(driver="evr")`` (MRRR) on CPU in float64 for what deflation leaves,
   moved back to the input's device and dtype, with a :class:`RuntimeWarning`;
3. a :class:`~bayescurv.errors.NumericalError` naming the matrix and its size.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from bayescurv.errors import NonFiniteError, NumericalError, ShapeError

__all__ = ["robust_eigh", "DEFLATE_MIN"]

DEFLATE_MIN = 256
"""Matrices of at least this size are checked for exactly-zero rows before any
decomposition and deflated when they have some (exact; measured on the 4608 x 4608 factor
with 4096 zero rows of a ResNet-18's ``layer4.1.conv1`` on 32x32 inputs: torch's ``eigh``
of the whole matrix took 69 s on one core, the deflated 512 x 512 block well under one)."""


def _torch_eigh(F: Tensor) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh(F)``, or ``None`` when it raises or returns non-finite values."""
    try:
        lam, Q = torch.linalg.eigh(F)
    except torch.linalg.LinAlgError:
        return None
    if not bool(torch.isfinite(lam).all()) or not bool(torch.isfinite(Q).all()):
        return None
    return lam, Q


def _scipy_eigh(F: Tensor, what: str, n: int) -> tuple[Tensor, Tensor]:
    """``scipy.linalg.eigh(F, driver="evr")`` in float64 (complex128 for complex ``F``) on
    CPU, returned on ``F``'s device in its dtype; :class:`NumericalError` when it fails.
    ``n``: the size of the matrix before deflation (``F`` may be its nonzero block)."""
    import scipy.linalg

    k = F.shape[0]
    deflated = f", of which {n - k} exactly-zero rows/columns deflated" if k < n else ""
    wide = torch.complex128 if F.is_complex() else torch.float64
    try:
        lam, Q = scipy.linalg.eigh(F.detach().to("cpu", wide).numpy(), driver="evr")
    except (ValueError, scipy.linalg.LinAlgError):
        lam = Q = None
    if lam is not None:
        lam_t, Q_t = torch.from_numpy(lam), torch.from_numpy(Q)
        if bool(torch.isfinite(lam_t).all()) and bool(torch.isfinite(Q_t).all()):
            warnings.warn(
                f"torch.linalg.eigh failed to converge on the {what} ({n} x {n}{deflated}); "
                "used scipy's eigh(driver='evr') on CPU in float64 instead",
                RuntimeWarning, stacklevel=3)
            real = F.real.dtype if F.is_complex() else F.dtype
            return (lam_t.to(device=F.device, dtype=real),
                    Q_t.to(device=F.device, dtype=F.dtype))
    raise NumericalError(
        f"the symmetric eigendecomposition of the {what} ({n} x {n}{deflated}) failed in "
        "torch (LAPACK) and in scipy's eigh(driver='evr'): the matrix is too ill-conditioned to "
        "decompose. Add damping (a larger prior precision), compute it in float64, or use a "
        "diagonal structure for this layer"
    )


def robust_eigh(F: Tensor, what: str = "matrix") -> tuple[Tensor, Tensor]:
    r"""``(λ, Q)`` with :math:`F = Q\,\mathrm{diag}(\lambda)\,Q^\top`, ``λ`` ascending, for a
    symmetric (Hermitian) ``(n, n)`` matrix ``F`` (or a batch ``(..., n, n)``, members
    decomposed one by one when the batched call fails), like ``torch.linalg.eigh`` but robust
    (module docstring): torch first; on a LAPACK failure or non-finite output the exactly-zero
    rows/columns are deflated (exact: zero eigenvalues with unit eigenvectors) and the rest
    decomposed by torch again, then by scipy's ``eigh(driver="evr")`` (with a warning).

    Args:
        F: the symmetric matrix (not differentiated through; call under ``no_grad``).
        what: how error and warning messages name the matrix (e.g. ``"Kronecker factor of
            layer 'conv1'"``).

    Raises:
        ShapeError: ``F`` is not a (batch of) square matrices.
        NonFiniteError: ``F`` holds NaN or Inf.
        NumericalError: every route failed.
    """
    if F.ndim < 2 or F.shape[-1] != F.shape[-2]:
        raise ShapeError(f"robust_eigh needs square matrices (..., n, n), got "
                         f"{tuple(F.shape)} for the {what}")
    n = F.shape[-1]
    if F.ndim == 2 and n >= DEFLATE_MIN:  # zero rows first: exact, and far cheaper
        keep = (F != 0).any(0) | (F != 0).any(1)
        if not bool(keep.all()):
            return _deflated(F, keep, what)
    out = _torch_eigh(F)
    if out is not None:
        return out
    if F.ndim > 2:  # a batch (grouped factors): the failing members one by one
        flat = F.reshape(-1, n, n)
        parts = [robust_eigh(f, f"{what} [{i}]") for i, f in enumerate(flat)]
        return (torch.stack([lam for lam, _ in parts]).reshape(F.shape[:-1]),
                torch.stack([Q for _, Q in parts]).reshape(F.shape))
    if not bool(torch.isfinite(F).all()):
        raise NonFiniteError(
            f"the {what} ({n} x {n}) holds NaN or Inf, so it has no eigendecomposition; check "
            "the data and the network outputs for non-finite values")
    keep = (F != 0).any(0) | (F != 0).any(1)
    if bool(keep.all()):  # nothing to deflate
        return _scipy_eigh(F, what, n)
    return _deflated(F, keep, what)


def _deflated(F: Tensor, keep: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Step 1 of the module docstring: decompose the principal submatrix of the rows in
    ``keep`` (torch, then scipy), zero eigenvalues with unit vectors for the others."""
    n, k = F.shape[-1], int(keep.sum())
    idx = keep.nonzero().squeeze(-1)
    sub = F[idx][:, idx]
    out = _torch_eigh(sub) if k else None
    if out is None and k:
        if not bool(torch.isfinite(sub).all()):
            raise NonFiniteError(
                f"the {what} ({n} x {n}) holds NaN or Inf, so it has no eigendecomposition; "
                "check the data and the network outputs for non-finite values")
        out = _scipy_eigh(sub, what, n)
    real = F.real.dtype if F.is_complex() else F.dtype
    lam = torch.zeros(n, dtype=real, device=F.device)
    Q = torch.zeros(n, n, dtype=F.dtype, device=F.device)
    zero = (~keep).nonzero().squeeze(-1)
    Q[zero, torch.arange(k, n, device=F.device)] = 1
    if k:
        lam_k, Q_k = out
        lam[:k] = lam_k
        Q[idx.unsqueeze(-1), torch.arange(k, device=F.device)] = Q_k
    order = torch.argsort(lam, stable=True)  # ascending, as torch.linalg.eigh
    return lam[order], Q[:, order]
