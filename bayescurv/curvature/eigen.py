r"""Spectral tools for any symmetric ``n x n`` operator given by its products.

Every function takes ``matmat``: a callable ``V (n, k) -> A V (n, k)``, an object with
``.matmat`` (or only ``.matvec``) such as
:class:`~bayescurv.curvature.matfree.CurvatureLinearOperator`, or a dense ``(n, n)`` tensor.
``size``, ``dtype`` and ``device`` default to the operator's ``shape``/``dtype``/``device``
when it has them (``torch.get_default_dtype()`` and CPU otherwise). Random probes come from
``generator`` (drawn on the generator's device, then moved), so results are reproducible
given a seed.

- :func:`lanczos_topk`: largest eigenpairs, Lanczos with full reorthogonalisation;
- :func:`randomized_eigh`: randomized subspace iteration (Halko, Martinsson & Tropp 2011);
- :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
  Ghorbani, Krishnan & Xiao 2019) smoothed with a Gaussian kernel;
- :func:`hutchinson_trace`, :func:`hutchpp_trace` (Meyer, Musco, Musco & Woodruff 2021),
  :func:`hutchinson_diagonal`: Rademacher estimators of ``tr(A)`` and ``diag(A)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError

MatMat = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------
# operator plumbing
# ------------------------------------------------------------------------------------------
def _resolve(
    op: Any, size: int | None, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[MatMat, int, torch.dtype, torch.device]:
    """``(matmat, n, dtype, device)`` of an operator, a matvec object or a dense tensor."""
    fn: MatMat
    if torch.is_tensor(op):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ShapeError(f"a dense operator must be square (n, n); got {tuple(op.shape)}")

        def fn(V: Tensor) -> Tensor:
            return op @ V.to(op.dtype)

    elif hasattr(op, "matmat"):
        fn = op.matmat
    elif hasattr(op, "matvec"):

        def fn(V: Tensor) -> Tensor:
            return torch.stack([op.matvec(c) for c in V.T], dim=1)

    elif callable(op):
        fn = op
    else:
        raise InvalidArgumentError(
            f"expected a matmat callable, an object with .matmat/.matvec or a tensor; got "
            f"{type(op).__name__}"
        )
    if size is None:
        shape = getattr(op, "shape", None)
        if shape is None:
            raise InvalidArgumentError("size is required for an operator without .shape")
        size = int(shape[0])
    if not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(f"size must be a positive int, got {size!r}")
    dtype = dtype if dtype is not None else getattr(op, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.get_default_dtype()
    device = torch.device(device) if device is not None else getattr(op, "device", None)
    if not isinstance(device, torch.device):
        device = torch.device("cpu")
    return fn, size, dtype, device


def _apply(fn: MatMat, V: Tensor) -> Tensor:
    out = fn(V)
    if out.shape != V.shape:
        raise ShapeError(f"matmat returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
    return out.to(V.dtype)


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _randn(shape, generator, dtype, device) -> Tensor:
    d = _gen_device(generator, device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=d).to(device)


def _rademacher(shape, generator, dtype, device) -> Tensor:
    d = _gen_device(generator, device)
    bits = torch.randint(0, 2, shape, generator=generator, device=d)
    return (2.0 * bits - 1.0).to(device=device, dtype=dtype)


def _positive_int(value: int, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------------------
# Lanczos
# ------------------------------------------------------------------------------------------
def _lanczos(
    fn: MatMat,
    Q0: Tensor,
    num_iter: int,
    generator: torch.Generator | None,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``b`` independent Lanczos recursions, started at the columns of ``Q0`` (``(n, b)``),
    run together (one ``matmat`` of ``b`` columns per step) with full reorthogonalisation.

    Returns ``alpha (b, m)``, ``beta (b, m - 1)`` (the tridiagonal :math:`T = Q^\top A Q`)
    and ``Q (m, n, b)``. On breakdown (an invariant subspace) the recursion continues from
    a fresh random vector orthogonal to the basis, with a zero off-diagonal, so ``T``
    stays exact and its extra block has zero weight on the start vector.
    """
    n, b = Q0.shape
    dtype, device = Q0.dtype, Q0.device
    Q = torch.zeros(num_iter, n, b, dtype=dtype, device=device)
    alpha = torch.zeros(b, num_iter, dtype=dtype, device=device)
    beta = torch.zeros(b, num_iter, dtype=dtype, device=device)
    Q[0] = Q0 / torch.linalg.vector_norm(Q0, dim=0)
    scale = torch.zeros(b, dtype=dtype, device=device)

    def orthogonalize(w: Tensor, j: int) -> Tensor:
        for _ in range(2):  # "twice is enough"
            basis = Q[: j + 1]
            w = w - torch.einsum("jnb,jb->nb", basis, torch.einsum("jnb,nb->jb", basis, w))
        return w

    for j in range(num_iter):
        w = _apply(fn, Q[j])
        alpha[:, j] = (Q[j] * w).sum(0)
        w = w - alpha[:, j] * Q[j]
        if j > 0:
            w = w - beta[:, j - 1] * Q[j - 1]
        w = orthogonalize(w, j)
        if j == num_iter - 1:
            break
        b_j = torch.linalg.vector_norm(w, dim=0)
        scale = torch.maximum(scale, alpha[:, j].abs() + b_j)
        broken = b_j <= tol * torch.clamp(scale, min=torch.finfo(dtype).tiny)
        if broken.any():
            fresh = orthogonalize(_randn((n, b), generator, dtype, device), j)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=0)
            b_j = torch.where(broken, torch.zeros_like(b_j), b_j)
            w = torch.where(broken, fresh, w / torch.where(broken, torch.ones_like(b_j), b_j))
        else:
            w = w / b_j
        beta[:, j] = b_j
        Q[j + 1] = w
    return alpha, beta[:, : num_iter - 1], Q


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    """Batched symmetric tridiagonal matrices ``(b, m, m)``."""
    T = torch.diag_embed(alpha)
    return T + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)


def lanczos_topk(
    matmat: Any,
    size: int | None,
    k: int,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` algebraically largest eigenpairs of a symmetric operator by Lanczos.

    ``num_iter`` steps (default ``min(n, max(2k + 20, 3k))``) of the Lanczos recursion
    :math:`A q_j = \beta_{j-1} q_{j-1} + \alpha_j q_j + \beta_j q_{j+1}` from a Gaussian
    start vector, with full reorthogonalisation against all previous :math:`q_i` (one
    ``matmat`` of one column per step); the Ritz pairs of :math:`T = Q^\top A Q` approximate
    the extreme eigenpairs. ``num_iter = n`` is exact up to rounding.

    Returns:
        ``eigvals`` ``(k,)`` in descending order and ``eigvecs`` ``(n, k)`` (orthonormal).
    """
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(k, "k")
    if k > n:
        raise InvalidArgumentError(f"k={k} exceeds the operator size n={n}")
    m = min(n, max(2 * k + 20, 3 * k)) if num_iter is None else num_iter
    _positive_int(m, "num_iter")
    if m < k:
        raise InvalidArgumentError(f"num_iter={m} must be at least k={k}")
    m = min(m, n)
    tol = math.sqrt(torch.finfo(dtype).eps) if tol is None else tol
    q0 = _randn((n, 1), generator, dtype, device)
    alpha, beta, Q = _lanczos(fn, q0, m, generator, tol)
    T = _tridiag(alpha, beta)[0]
    evals, S = torch.linalg.eigh(T.to(torch.float64))
    top = torch.argsort(evals, descending=True)[:k]
    vecs = Q[:, :, 0].T @ S[:, top].to(dtype)
    return evals[top].to(dtype), vecs


def randomized_eigh(
    matmat: Any,
    size: int | None,
    k: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Approximate top-``k`` eigenpairs by randomized subspace iteration (Halko et al.).

    With :math:`\Omega \in R^{n \times l}` Gaussian, :math:`l = k + oversample`:
    :math:`Q = \mathrm{orth}(A^{q+1}\Omega)` (re-orthonormalised between the ``q =
    power_iters`` powers), then the Rayleigh-Ritz step :math:`Q^\top A Q = U \Lambda U^\top`
    gives :math:`A \approx (QU)\Lambda(QU)^\top`. Costs ``power_iters + 2`` block products of
    ``l`` columns. Eigenvalues are those of largest magnitude of the projected matrix,
    meant for PSD operators (curvature matrices).

    Returns:
        ``eigvals`` ``(k,)`` descending and ``eigvecs`` ``(n, k)``.
    """
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(k, "k")
    _positive_int(oversample, "oversample", 0)
    _positive_int(power_iters, "power_iters", 0)
    if k > n:
        raise InvalidArgumentError(f"k={k} exceeds the operator size n={n}")
    l = min(n, k + oversample)
    Y = _apply(fn, _randn((n, l), generator, dtype, device))
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(Y)
        Y = _apply(fn, Q)
    Q, _ = torch.linalg.qr(Y)
    B = Q.T @ _apply(fn, Q)
    evals, U = torch.linalg.eigh(0.5 * (B + B.T))
    top = torch.argsort(evals, descending=True)[:k]
    return evals[top], Q @ U[:, top]


def spectral_density(
    matmat: Any,
    size: int | None,
    num_iter: int = 30,
    num_probes: int = 5,
    grid: Tensor | int | None = None,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Eigenvalue density by stochastic Lanczos quadrature.

    For each of ``num_probes`` normalised Rademacher probes :math:`v`, ``num_iter`` Lanczos
    steps give nodes :math:`\theta_i` (Ritz values) and weights :math:`\tau_i = (e_1^\top
    s_i)^2` (:math:`\sum_i \tau_i = 1`) of the Gauss quadrature of
    :math:`v^\top g(A) v \approx \frac1n\sum_j g(\lambda_j)`. The density is

    .. math:: \rho(t) = \frac{1}{\#probes} \sum_{probes} \sum_i \tau_i\,
              \mathcal N(t; \theta_i, \sigma^2),

    which integrates to one over the real line. All probes run together (one ``matmat``
    of ``num_probes`` columns per step).

    Args:
        grid: evaluation points ``(g,)``; an int for that many equispaced points (default
            1000) over ``[min θ - 6σ, max θ + 6σ]``.
        sigma: kernel width; default 1% of the Ritz-value range (or of ``max(|θ|, 1)``
            when the range is zero).

    Returns:
        ``(grid, density)``, both ``(g,)``.
    """
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(num_iter, "num_iter")
    _positive_int(num_probes, "num_probes")
    m = min(num_iter, n)
    V = _rademacher((n, num_probes), generator, dtype, device)
    tol = math.sqrt(torch.finfo(dtype).eps)
    alpha, beta, _ = _lanczos(fn, V, m, generator, tol)
    nodes, S = torch.linalg.eigh(_tridiag(alpha, beta))  # (b, m), (b, m, m)
    weights = S[:, 0, :] ** 2  # (b, m)
    lo, hi = nodes.min(), nodes.max()
    if sigma is None:
        span = float(hi - lo)
        sigma = 0.01 * (span if span > 0 else max(float(hi.abs()), 1.0))
    if not sigma > 0:
        raise InvalidArgumentError(f"sigma must be positive, got {sigma}")
    if grid is None or isinstance(grid, int):
        points = 1000 if grid is None else grid
        _positive_int(points, "grid", 2)
        grid_t = torch.linspace(
            float(lo) - 6 * sigma, float(hi) + 6 * sigma, points, dtype=dtype, device=device
        )
    else:
        grid_t = torch.as_tensor(grid, dtype=dtype, device=device)
        if grid_t.dim() != 1:
            raise ShapeError(f"grid must be 1-D, got shape {tuple(grid_t.shape)}")
    z = (grid_t[:, None, None] - nodes[None]) / sigma  # (g, b, m)
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum(-1).mean(-1)
    return grid_t, density


# ------------------------------------------------------------------------------------------
# trace and diagonal estimators
# ------------------------------------------------------------------------------------------
def hutchinson_trace(
    matmat: Any,
    size: int | None,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r""":math:`\mathrm{tr}(A) \approx \frac1s \sum_{i=1}^s z_i^\top A z_i` with ``s``
    Rademacher probes (unbiased; variance :math:`\frac2s(\|A\|_F^2 - \sum_i A_{ii}^2)`).
    Returns a 0-dim tensor."""
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(num_samples, "num_samples")
    Z = _rademacher((n, num_samples), generator, dtype, device)
    return (Z * _apply(fn, Z)).sum() / num_samples


def hutchpp_trace(
    matmat: Any,
    size: int | None,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Hutch++ (Meyer et al. 2021): with ``m = num_matvecs`` products, ``s = m // 3``
    sketch columns :math:`Q = \mathrm{orth}(A S)` and ``g = m - 2s`` Rademacher probes,

    .. math:: \mathrm{tr}(A) \approx \mathrm{tr}(Q^\top A Q) + \frac1g
              \mathrm{tr}(G^\top (I-QQ^\top) A (I-QQ^\top) G).

    Unbiased, with error :math:`O(1/m)` instead of :math:`O(1/\sqrt m)`; exact when
    ``rank(A) <= s``. Returns a 0-dim tensor."""
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(num_matvecs, "num_matvecs", 3)
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = _rademacher((n, s), generator, dtype, device)
    G = _rademacher((n, g), generator, dtype, device)
    Q, _ = torch.linalg.qr(_apply(fn, S))
    G = G - Q @ (Q.T @ G)
    AQG = _apply(fn, torch.cat([Q, G], dim=1))
    top = (Q * AQG[:, :s]).sum()
    rest = (G * AQG[:, s:]).sum()  # Gᵀ(I-QQᵀ)A(I-QQᵀ)G with G already projected
    return top + rest / g


def hutchinson_diagonal(
    matmat: Any,
    size: int | None,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r""":math:`\mathrm{diag}(A) \approx \frac1s \sum_i z_i \odot A z_i` with Rademacher
    :math:`z_i` (unbiased; entry ``j`` has variance :math:`\frac1s\sum_{l\ne j} A_{jl}^2`).
    Returns ``(n,)``."""
    fn, n, dtype, device = _resolve(matmat, size, dtype, device)
    _positive_int(num_samples, "num_samples")
    Z = _rademacher((n, num_samples), generator, dtype, device)
    return (Z * _apply(fn, Z)).sum(1) / num_samples


__all__ = [
    "lanczos_topk",
    "randomized_eigh",
    "spectral_density",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
]
