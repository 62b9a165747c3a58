r"""The curvature one task adds to the filter: the top-``k`` eigenpairs of its GGN and the
diagonal of the rest, ``G ≈ V diag(g) Vᵀ + diag(r)``.

Routes (``eigensolver``):

- ``"kfac"`` — **one data pass**. The K-FAC GGN :math:`K = \bigoplus_l A_l \otimes B_l`
  (:func:`~bayescurv.curvature.compute`, ``structure="kfac"``, the pass
  :class:`~bayescurv.continual.KFACFilter` makes) has the eigenpairs
  :math:`(\lambda^A_{l,i}\lambda^B_{l,j},\ q^A_{l,i} \otimes q^B_{l,j})`; the ``k`` largest
  over all layers give ``V``, ``g`` and ``r = diag(K) − diag(V g Vᵀ)`` (``diag(K) =
  diag(A) ⊗ diag(B)``) at ``O(Σ_l p_l³ + q_l³ + P k)``. Approximate (K-FAC's factorisation)
  but the whole update costs about one K-FAC pass. Layers without a Kronecker block (a
  dense block, e.g. a normalisation layer's affine parameters) are eigendecomposed densely.
- ``"randomized"`` (block subspace iteration, ``power_iters + 2`` passes of a
  ``k + oversample``-column GGN product), ``"lanczos"`` (``≈ 2k + 20`` passes) — both on the
  matrix-free :class:`~bayescurv.curvature.matfree.CurvatureLinearOperator` and, with
  ``diagonal=True``, one more pass for the exact ``diag(G)`` — or ``"dense"`` (the full
  ``P x P`` GGN and ``eigh``; small nets only, exact).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.curvature import compute
from bayescurv.curvature.eigen import lanczos_topk, randomized_eigh
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.errors import UnsupportedLayerError
from bayescurv.likelihoods import Likelihood
from bayescurv.linalg import BlockDiagonal, KroneckerEigen, robust_eigh
from bayescurv.params import ParamSet

EIGENSOLVERS = ("kfac", "randomized", "lanczos", "dense")
DENSE_BLOCK_LIMIT = 4096  # a non-Kronecker block up to this size is eigendecomposed densely

__all__ = ["EIGENSOLVERS", "task_curvature", "kfac_topk"]


def kfac_topk(K: BlockDiagonal, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The ``rank`` largest eigenpairs ``(V, g)`` of a block-diagonal K-FAC operator and its
    diagonal: ``(V (P, k), g (k,) descending, diag(K) (P,))``.

    Per Kronecker block the eigenvalues are ``Λ = outer(λ_A, λ_B)`` on the basis
    ``Q_A ⊗ Q_B`` (row-major ``vec``, as the block's products use it), so eigenvector
    ``(i, j)`` is ``vec(q^A_i q^{B\top}_j)``: only the ``k`` chosen columns are formed.
    """
    blocks, index = K.blocks, K.indices
    vals: list[Tensor] = []
    owner: list[Tensor] = []
    dense: dict[int, tuple[Tensor, Tensor]] = {}
    for b, block in enumerate(blocks):
        if isinstance(block, KroneckerEigen) and not block.truncated:
            lam = block.eigenvalues.reshape(-1)
        elif block.size <= DENSE_BLOCK_LIMIT:
            M = block.to_dense()
            lam, Q = robust_eigh(0.5 * (M + M.mT), "K-FAC block")
            dense[b] = (lam, Q)
        else:
            raise UnsupportedLayerError(
                f"eigensolver='kfac': block {b} ({type(block).__name__}, size {block.size}) "
                "has no Kronecker eigenbasis; use eigensolver='randomized'"
            )
        m = min(rank, lam.shape[0])
        top = torch.topk(lam, m)
        vals.append(top.values)
        owner.append(torch.stack([torch.full_like(top.indices, b), top.indices]))
    allv = torch.cat(vals)
    sel = torch.topk(allv, min(rank, allv.shape[0])).indices
    which = torch.cat(owner, dim=1)[:, sel]  # (2, k): block, flat index in the block
    g = allv[sel].clamp_min(0)
    V = torch.zeros(K.size, sel.shape[0], dtype=K.dtype, device=K.device)
    for b in which[0].unique().tolist():  # one host sync per block, not per column
        cols = torch.nonzero(which[0] == b).squeeze(-1)
        flat = which[1, cols]
        block = blocks[b]
        if b in dense:
            vecs = dense[b][1][:, flat]
        else:
            rb = block.eigenvalues.shape[1]
            left = _columns(block.eigenbases[0], flat // rb, block.factor_sizes[0], K.dtype)
            right = _columns(block.eigenbases[1], flat % rb, block.factor_sizes[1], K.dtype)
            vecs = (left.unsqueeze(1) * right.unsqueeze(0)).reshape(-1, cols.shape[0])
        V[index[b].unsqueeze(-1), cols.unsqueeze(0)] = vecs
    return V, g, K.diagonal()


def _columns(Q: Tensor | None, idx: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Columns ``idx`` of an eigenbasis; ``None`` (a diagonal factor, e.g. an embedding's row
    counts) is the identity, whose columns are one-hot (never the ``size x size`` matrix)."""
    if Q is not None:
        return Q[:, idx]
    return torch.nn.functional.one_hot(idx, size).mT.to(dtype)


def task_curvature(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable[Any],
    params: ParamSet,
    *,
    rank: int,
    diagonal: bool = True,
    eigensolver: str = "randomized",
    kind: str = "ggn",
    generator: torch.Generator | None = None,
    oversample: int = 10,
    power_iters: int = 3,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Top-``rank`` eigenpairs ``(V, g)`` of the task curvature ``G`` (summed over ``data``)
    and, with ``diagonal=True``, the residual diagonal ``max(diag(G) − diag(V g Vᵀ), 0)``, so
    that ``V diag(g) Vᵀ + diag(r)`` has the diagonal of ``G`` (exact for the matrix-free and
    dense routes, K-FAC's for ``"kfac"``). ``eigensolver``: see the module docstring."""
    P = params.numel
    dt, dev = params.dtype, params.device
    V = torch.zeros(P, 0, dtype=dt, device=dev)
    g = torch.zeros(0, dtype=dt, device=dev)
    diag = None
    if eigensolver == "kfac":
        K = compute(model, likelihood, data, structure="kfac", kind=kind,
                    subset=params).matrix
        V, g, diag = kfac_topk(K, rank)
    elif rank > 0:
        if eigensolver == "dense":
            dense = compute(model, likelihood, data, structure="full", kind=kind,
                            subset=params).matrix.to_dense()
            evals, evecs = robust_eigh(0.5 * (dense + dense.mT), "task GGN")
            g, V = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
            diag = dense.diagonal()
        else:
            op = CurvatureLinearOperator(model, likelihood, data, params, kind=kind)
            if eigensolver == "lanczos":
                g, V = lanczos_topk(op, P, rank, generator=generator)
            else:
                g, V = randomized_eigh(op, P, rank, oversample=oversample,
                                       power_iters=power_iters, generator=generator)
        g = g.clamp_min(0)
    resid = None
    if diagonal:
        if diag is None:
            diag = compute(model, likelihood, data, structure="diag", kind=kind,
                           subset=params).matrix.diagonal()
        resid = (diag - V.square() @ g).clamp_min(0)
    V, g = V.detach().to(dt), g.detach().to(dt)
    return V, g, None if resid is None else resid.detach().to(dt)
