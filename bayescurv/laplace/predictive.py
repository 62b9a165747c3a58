r"""The GLM (linearized) predictive: :math:`f_{lin}(x) = f(x;\theta^*) + J(x)(\theta-\theta^*)`,
so :math:`f(x) \sim N(f(x;\theta^*), J(x)\,\Sigma\,J(x)^\top)` with :math:`\Sigma` the
posterior covariance. :math:`J \Sigma J^\top` is formed from the posterior's structure,
layer by layer, never from a (batch x outputs x parameters) Jacobian of the whole net:

- a diagonal :math:`\Sigma` or a Kronecker block in its eigenbasis
  :math:`(Q_G \otimes Q_A)\,diag(w)\,(\cdot)^\top`: for a layer without weight sharing the
  Jacobian row of output ``c`` is :math:`g_c \otimes a`, so
  :math:`(J\Sigma J^\top)_{cc'} = \sum_{o,i} \tilde g_{co} \tilde g_{c'o} w_{oi} \tilde a_i^2`
  with :math:`\tilde g = Q_G^\top g`, :math:`\tilde a = Q_A^\top a` — two small matmuls;
- low rank plus diagonal, :math:`\Lambda = U S U^\top + D`: by Woodbury
  :math:`J\Sigma J^\top = J D^{-1} J^\top - (JZ) C^{-1} (JZ)^\top` with
  :math:`Z = D^{-1} U S^{1/2}`, :math:`C = I + S^{1/2} U^\top D^{-1} U S^{1/2}`; ``JZ`` is
  formed layer by layer;
- shared weights, embeddings and dense blocks: the per-sample Jacobian *of that layer
  only*;
- a full :math:`\Sigma` (small nets): the per-sample Jacobian of all parameters.

With ``joint=True`` the covariance across the inputs is returned, ``(B*C, B*C)``, ordered
input-major (index ``b * C + c``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.accumulate import _kron_index, per_sample_matrix
from bayescurv.curvature.engine import HookCapture, ModuleRecord, jacobian_pass
from bayescurv.linalg import (
    BlockDiagonal,
    Diagonal,
    KroneckerEigen,
    LowRankPlusDiagonal,
    PSDOperator,
)
from bayescurv.params import ParamSet


def _rank_one_term(g: Tensor, a: Tensor, w: Tensor, joint: bool) -> Tensor:
    r"""Covariance of :math:`\sum_{o,i} g_{cbo} a_{bi} \epsilon_{oi}` with independent
    :math:`\epsilon_{oi} \sim N(0, w_{oi})`; ``g (C, B, O)``, ``a (B, I)``, ``w (O, I)``.
    Returns ``(B, C, C)`` or, joint, ``(B, C, B, C)``."""
    if not joint:
        t = a.square() @ w.T  # (B, O)
        return torch.einsum("cbo,kbo,bo->bck", g, g, t)
    m = torch.einsum("bi,di,oi->bdo", a, a, w)  # (B, B, O)
    return torch.einsum("cbo,kdo,bdo->bcdk", g, g, m)


def _explicit_term(jac: Tensor, cov_block: PSDOperator | Tensor, joint: bool) -> Tensor:
    """``J Σ Jᵀ`` for an explicit Jacobian ``jac (C, B, p)``; ``cov_block`` is the block of
    the posterior *precision* (solved against) or a tensor of variances (diagonal)."""
    c, b, p = jac.shape
    flat = jac.permute(1, 0, 2).reshape(b * c, p)  # input-major rows
    if isinstance(cov_block, Tensor):
        sj = flat * cov_block
    else:
        sj = cov_block.solve(flat.T).T
    full = (flat @ sj.T).reshape(b, c, b, c)
    if joint:
        return full
    return torch.diagonal(full, dim1=0, dim2=2).permute(2, 0, 1)


def _record_jacobian(rec: ModuleRecord, like: Tensor) -> Tensor:
    """Per-sample Jacobian of one module's parameters ``(C, B, p)`` in flat order; zero for
    a module the forward pass did not call (``like``: any ``(C, B, ·)`` tensor)."""
    if not rec.called:
        p = sum(rec.module.get_parameter(n).numel() for n in rec.owned)
        return like.new_zeros(*like.shape[:2], p)
    ps = rec.per_sample()
    return torch.cat([ps[i] for i in sorted(ps)], -1)


def _linear_rank_one(rec: ModuleRecord) -> tuple[Tensor, Tensor] | None:
    """``(g (C, B, O), a (B, I))`` when the layer's Jacobian rows are rank one."""
    if rec.route != "linear" or not rec.called:
        return None
    v = rec.linear_view()
    if v.a.shape[1] != 1:
        return None
    return v.g[:, :, 0, :], v.a[:, 0, :]


def _record_index(rec: ModuleRecord, params: ParamSet, rank_one: bool) -> Tensor:
    """Flat positions of a record's parameters in the order of its Jacobian columns
    (``W̃ = [W | b]`` row-major for rank-one linear layers, else owned slices in order)."""
    if rank_one:
        return _kron_index(params, rec)
    return torch.cat([torch.arange(params.slice_of(i).start, params.slice_of(i).stop,
                                   device=params.device) for i in sorted(rec.owned.values())])


def _ref(capture: HookCapture) -> Tensor:
    """Some ``(C, B, ...)`` output gradient of the pass (for shapes, dtype, device)."""
    return next(r.grads[0] for r in capture.records if r.called)


def _full_jacobian(capture: HookCapture) -> Tensor:
    """Whole-net per-sample Jacobian ``(C, B, P)`` (dense posteriors, tied parameters)."""
    c, b = _ref(capture).shape[:2]
    return per_sample_matrix(capture.records, capture.params).reshape(c, b, -1)


def _diag_term(capture: HookCapture, var: Tensor, joint: bool) -> Tensor:
    """``J diag(var) Jᵀ``, layer by layer."""
    if capture.tied:  # tied parameters: exact, through the whole per-sample matrix
        return _explicit_term(_full_jacobian(capture), var, joint)
    cov, ref = 0, _ref(capture)
    for rec in capture.records:
        r1 = _linear_rank_one(rec)
        idx = _record_index(rec, capture.params, r1 is not None)
        if r1 is not None:
            g, a = r1
            cov = cov + _rank_one_term(g, a, var[idx].reshape(g.shape[-1], a.shape[-1]), joint)
        else:
            cov = cov + _explicit_term(_record_jacobian(rec, ref), var[idx], joint)
    return cov


def _jacobian_times(capture: HookCapture, z: Tensor) -> Tensor:
    """``J Z`` for ``Z`` ``(P, k)``: ``(C, B, k)``, layer by layer."""
    if capture.tied:
        return _full_jacobian(capture) @ z
    out, ref = 0, _ref(capture)
    for rec in capture.records:
        r1 = _linear_rank_one(rec)
        zi = z[_record_index(rec, capture.params, r1 is not None)]
        if r1 is not None:
            g, a = r1
            zi = zi.reshape(g.shape[-1], a.shape[-1], -1)
            out = out + torch.einsum("cbo,bi,oik->cbk", g, a, zi)
        else:
            out = out + _record_jacobian(rec, ref) @ zi
    return out


def _lowrank_term(capture: HookCapture, precision: LowRankPlusDiagonal, joint: bool) -> Tensor:
    d = precision.d
    root = precision.U * precision.s.clamp_min(0).sqrt()
    z = root / d.unsqueeze(-1)
    cap = torch.eye(root.shape[1], dtype=d.dtype, device=d.device) + root.T @ z
    chol = torch.linalg.cholesky(cap)
    jz = _jacobian_times(capture, z)  # (C, B, k)
    y = torch.linalg.solve_triangular(chol, jz.reshape(-1, jz.shape[-1]).T, upper=False)
    y = y.T.reshape(jz.shape)
    correction = (torch.einsum("cbk,dek->bced", y, y) if joint
                  else torch.einsum("cbk,dbk->bcd", y, y))
    return _diag_term(capture, 1.0 / d, joint) - correction


def _blocks_term(capture: HookCapture, precision: BlockDiagonal, joint: bool) -> Tensor:
    cov, ref = 0, _ref(capture)
    for rec, block in zip(capture.records, precision.blocks):
        r1 = _linear_rank_one(rec)
        if isinstance(block, KroneckerEigen) and r1 is not None:
            g, a = r1
            cov = cov + _rank_one_term(g @ block.QA, a @ block.QB, 1.0 / block.eigenvalues,
                                       joint)
        else:
            cov = cov + _explicit_term(_record_jacobian(rec, ref), block, joint)
    return cov


def glm_covariance(
    capture: HookCapture,
    precision: PSDOperator,
    x,
    joint: bool = False,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean ``f(x; θ*)`` ``(B, C)`` and covariance ``J Σ Jᵀ`` (``(B, C, C)`` or joint
    ``(B*C, B*C)``) for the posterior precision ``precision`` over ``capture.params`` (or over
    the entries ``index`` of it: a masked subnetwork, all other entries fixed)."""
    with capture:
        f = jacobian_pass(capture, x)
        b, c = f.shape
        if index is not None:
            if isinstance(precision, Diagonal):
                var = torch.zeros(capture.params.numel, dtype=f.dtype, device=f.device)
                var[index] = precision.inv_diagonal()
                cov = _diag_term(capture, var, joint)
            else:
                cov = _explicit_term(_full_jacobian(capture)[..., index], precision, joint)
        elif isinstance(precision, Diagonal):
            cov = _diag_term(capture, precision.inv_diagonal(), joint)
        elif isinstance(precision, LowRankPlusDiagonal):
            cov = _lowrank_term(capture, precision, joint)
        elif isinstance(precision, BlockDiagonal) and precision.num_blocks == len(
            capture.records
        ) and not capture.tied:
            cov = _blocks_term(capture, precision, joint)
        else:  # dense: whole-net per-sample Jacobian (small nets)
            cov = _explicit_term(_full_jacobian(capture), precision, joint)
    if joint:
        cov = cov.reshape(b * c, b * c)
        return f, 0.5 * (cov + cov.T)
    return f, 0.5 * (cov + cov.transpose(-1, -2))


__all__ = ["glm_covariance"]
