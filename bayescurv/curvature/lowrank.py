r"""Low-rank curvature: the top-``k`` eigenpairs :math:`G \approx U \operatorname{diag}(s) U^\top`.

Two routes:

- ``method="sqrt"`` (ViViT-style, Dangel et al. 2022): the curvature is a Gram matrix
  :math:`G = \sum_{b,k} v_{bk} v_{bk}^\top = V^\top V` of the per-datum, per-column
  gradients :math:`v_{bk} = J_b^\top s_{bk}` (``V``: ``(N K, P)``), which the hook engine
  produces batch by batch. We keep a running root :math:`R = U \operatorname{diag}(\sqrt s)`
  (``(P, r)``) and fold each batch in: with :math:`M = [R \mid V_b^\top]`,
  :math:`M^\top M = W \Lambda W^\top` (small, ``(r + KB)^2``) gives
  :math:`M M^\top = (M W \Lambda^{-1/2}) \Lambda (\cdot)^\top`, truncated to the ``r`` largest
  eigenvalues. **Exact** (all non-zero eigenpairs) while the data has ``N K <= rank``
  (a small batch, the ViViT use case); beyond that it is a streamed truncated
  eigendecomposition, exact in the span it keeps but not the optimal rank-``r``
  approximation of the whole sum. Memory ``O(P (r + K B))``: use small batches.
- ``method="lanczos"`` / ``"randomized"``: top-``k`` eigenpairs from matrix-free
  curvature-matrix products (:class:`~bayescurv.curvature.matfree.CurvatureLinearOperator`,
  kinds ``"ggn"``, ``"ef"``, ``"hessian"``) by :func:`~bayescurv.curvature.eigen.lanczos_topk`
  or :func:`~bayescurv.curvature.eigen.randomized_eigh`; one data pass per product.

Precision: the per-batch gradients are formed in the model's dtype, but the running root,
its Gram matrix and eigendecomposition (``sqrt``) and the Lanczos / subspace recursions
(matrix-free) run in :func:`~bayescurv.linalg.internal_dtype` (float64 for float32/bf16/fp16
models). A float32 Gram squares the root's rounding into an absolute error of about
``1e-7 λ_max`` on every eigenvalue, which for an ill-conditioned curvature swamps the prior.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.accumulate import per_sample_matrix
from bayescurv.curvature.engine import HookCapture
from bayescurv.curvature.records import ModuleRecord
from bayescurv.linalg import internal_dtype

METHODS = ("sqrt", "lanczos", "randomized")


def truncate_root(m: Tensor, rank: int) -> Tensor:
    r"""A root ``R`` ``(P, min(rank, ·))`` of the best rank-``rank`` part of :math:`M M^\top`,
    with orthogonal columns sorted by decreasing norm (``R = U diag(√s)``)."""
    gram = m.T @ m
    lam, w = torch.linalg.eigh(0.5 * (gram + gram.T))
    lam, w = lam.flip(0)[:rank], w.flip(1)[:, :rank]
    keep = lam > lam.max().clamp_min(0) * torch.finfo(m.dtype).eps * max(m.shape)
    lam, w = lam[keep], w[:, keep]
    return m @ w  # columns U_j √λ_j, since ‖M w_j‖² = λ_j


def root_to_eigen(root: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, s)`` with orthonormal ``U`` from a root with orthogonal columns."""
    s = root.square().sum(0)
    return root * s.clamp_min(torch.finfo(root.dtype).tiny).rsqrt(), s


class LowRankAccumulator:
    """Streams ``R`` with :math:`R R^\\top \\approx \\sum_{b,k} v_{bk} v_{bk}^\\top` (see the
    module docstring, ``method="sqrt"``)."""

    def __init__(self, capture: HookCapture, rank: int) -> None:
        self.params = capture.params
        self.rank = rank
        self.root = torch.zeros(self.params.numel, 0, dtype=internal_dtype(self.params.dtype),
                                device=self.params.device)

    def update(self, records: list[ModuleRecord], first: bool = True) -> None:
        v = per_sample_matrix(records, self.params, self.root.dtype)  # (K B, P)
        self.root = truncate_root(torch.cat([self.root, v.T], 1), self.rank)

    def finalize(self) -> tuple[Tensor, Tensor]:
        """``(U, s)``, combined across ``torch.distributed`` ranks (all-gather of roots)."""
        import torch.distributed as dist

        root = self.root
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            padded = torch.zeros(self.params.numel, self.rank, dtype=root.dtype,
                                 device=root.device)
            padded[:, : root.shape[1]] = root
            parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, padded)
            root = truncate_root(torch.cat(parts, 1), self.rank)
        return root_to_eigen(root)


def matfree_eigen(operator, rank: int, method: str, generator: torch.Generator | None,
                  **kwargs) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs ``(U, s)`` of a matrix-free operator; negative eigenvalues
    (possible for the Hessian) are clipped to zero so the result stays PSD."""
    from bayescurv.curvature import eigen

    fn = eigen.lanczos_topk if method == "lanczos" else eigen.randomized_eigh
    kwargs.setdefault("dtype", internal_dtype(operator.dtype))
    s, u = fn(operator, None, rank, generator=generator, **kwargs)
    return u, s.clamp_min(0)
