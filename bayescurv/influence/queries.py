r"""Preconditioned query gradients :math:`\tilde q = (G + \delta I)^{-1} \nabla \ell(z_q)`,
held exactly or, per weight matrix, at low rank.

Low rank (``rank=r``): the block of :math:`\tilde q` of every parameter with two or more
dimensions, seen as a matrix ``(m, n) = (shape[0], rest)``, is replaced by its truncated SVD
:math:`U_r S_r V_r^\top` (the best rank-``r`` approximation in Frobenius norm; kronfluence's
``query_gradient_low_rank``). A score is then
:math:`\sum_{\text{layers}} \langle U_r S_r V_r^\top, \nabla_W \ell(z_n) \rangle
= \sum \operatorname{tr}(V_r^\top \nabla_W \ell(z_n)^\top U_r S_r)` plus the exact dot product
over the remaining entries (biases, norms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.errors import ShapeError
from bayescurv.params import ParamSet


class QueryGradients:
    """Preconditioned query gradients ``(Q, P)``, exact or low rank per weight matrix.

    Args:
        pre: the preconditioned gradients ``(Q, P)``.
        params: the parameter set (its tensor shapes define the weight matrices); may be
            ``None`` when ``rank`` is ``None``.
        rank: low rank per weight matrix, or ``None`` (exact).
    """

    def __init__(self, pre: Tensor, params: ParamSet | None, rank: int | None) -> None:
        self.size = pre.shape[1]
        self.num_queries = pre.shape[0]
        self.rank = rank
        self.factors: list[tuple[slice, int, int, Tensor, Tensor]] = []
        if rank is None or params is None:
            self.dense, self.dense_index = pre, None
            return
        keep = torch.ones(self.size, dtype=torch.bool, device=pre.device)
        for i, p in enumerate(params.params):
            m, n = p.shape[0], p.numel() // max(1, p.shape[0])
            if p.dim() < 2 or rank >= min(m, n):
                continue  # exact: a vector, or a matrix of rank <= r anyway
            sl = params.slice_of(i)
            u, s, vh = torch.linalg.svd(pre[:, sl].reshape(-1, m, n), full_matrices=False)
            self.factors.append((sl, m, n, u[..., :rank] * s[:, None, :rank],
                                 vh[:, :rank].transpose(1, 2)))
            keep[sl] = False
        self.dense_index = keep.nonzero().squeeze(1)
        self.dense = pre[:, self.dense_index]

    def numel(self) -> int:
        """Numbers stored (the memory the queries take, in entries)."""
        return self.dense.numel() + sum(us.numel() + v.numel()
                                        for _, _, _, us, v in self.factors)

    def scores(self, grads: Tensor) -> Tensor:
        """``(Q, B)`` scores of the training gradients ``grads`` ``(B, P)``."""
        if grads.dim() != 2 or grads.shape[1] != self.size:
            raise ShapeError(f"training gradients must be (batch, {self.size}), got "
                             f"{tuple(grads.shape)}")
        g = grads.to(self.dense.dtype)
        dense = g if self.dense_index is None else g[:, self.dense_index]
        out = self.dense @ dense.T
        for sl, m, n, us, v in self.factors:
            w = g[:, sl].reshape(-1, m, n)  # (B, m, n)
            # <U S Vᵀ, W_b> = Σ_r (U S)_{:, r}ᵀ W_b V_{:, r}
            out = out + torch.einsum("qmr,bmn,qnr->qb", us, w, v)
        return out
