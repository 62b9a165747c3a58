r"""The GLM (linearized) predictive: :math:`f_{lin}(x) = f(x;\theta^*) + J(x)(\theta-\theta^*)`,
so :math:`f(x) \sim N(f(x;\theta^*), J(x)\,\Sigma\,J(x)^\top)` with :math:`\Sigma` the
posterior covariance. :math:`J \Sigma J^\top` is formed from the posterior's structure,
layer by layer, never from a (batch x outputs x parameters) Jacobian of the whole net:

- a diagonal :math:`\Sigma` or a Kronecker block in its eigenbasis
  :math:`(Q_G \otimes Q_A)\,diag(w)\,(\cdot)^\top`: for a layer without weight sharing the
  Jacobian row of output ``c`` is :math:`g_c \otimes a`, so
  :math:`(J\Sigma J^\top)_{cc'} = \sum_{o,i} \tilde g_{co} \tilde g_{c'o} w_{oi} \tilde a_i^2`
  with :math:`\tilde g = Q_G^\top g`, :math:`\tilde a = Q_A^\top a` — two small matmuls;
- shared weights, embeddings and dense blocks: the per-sample Jacobian *of that layer
  only*;
- a full :math:`\Sigma` (small nets): the per-sample Jacobian of all parameters.

With ``joint=True`` the covariance across the inputs is returned, ``(B*C, B*C)``, ordered
input-major (index ``b * C + c``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature import layers
from bayescurv.curvature.accumulate import per_sample_matrix
from bayescurv.curvature.engine import HookCapture, ModuleRecord, jacobian_pass
from bayescurv.linalg import BlockDiagonal, Diagonal, KroneckerEigen, PSDOperator


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
    full = flat @ sj.T  # (B*C, B*C)
    full = full.reshape(b, c, b, c)
    if joint:
        return full
    return torch.diagonal(full, dim1=0, dim2=2).permute(2, 0, 1)


def _record_jacobian(rec: ModuleRecord) -> Tensor:
    """Per-sample Jacobian of one module's parameters ``(C, B, p)`` in flat order."""
    ps = rec.per_sample()
    return torch.cat([ps[i] for i in sorted(ps)], -1)


def _linear_rank_one(rec: ModuleRecord) -> tuple[Tensor, Tensor] | None:
    """``(g (C, B, O), a (B, I))`` when the layer's Jacobian rows are rank one."""
    if rec.route != "linear":
        return None
    v = rec.linear_view()
    if v.a.shape[1] != 1:
        return None
    return v.g[:, :, 0, :], v.a[:, 0, :]


def _diag_layer_variances(rec: ModuleRecord, var: Tensor, params) -> Tensor:
    """Variances of ``W̃ = [W | b]`` as ``(O, I)``."""
    w = var[params.slice_of(rec.owned["weight"])].reshape(params.params[rec.owned["weight"]]
                                                          .shape[0], -1)
    if rec.with_bias:
        w = torch.cat([w, var[params.slice_of(rec.owned["bias"])][:, None]], 1)
    return w


def glm_covariance(
    capture: HookCapture, precision: PSDOperator, x, joint: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean ``f(x; θ*)`` ``(B, C)`` and covariance ``J Σ Jᵀ`` (``(B, C, C)`` or joint
    ``(B*C, B*C)``) for the posterior precision ``precision`` over ``capture.params``."""
    params = capture.params
    with capture:
        f = jacobian_pass(capture, x)
        b, c = f.shape
        shape = (b, c, b, c) if joint else (b, c, c)
        cov = f.new_zeros(shape)
        if isinstance(precision, Diagonal):
            var = precision.inv_diagonal()
            for rec in capture.records:
                r1 = _linear_rank_one(rec) if not (set(rec.owned.values()) & capture.tied) \
                    else None
                if r1 is not None:
                    cov = cov + _rank_one_term(*r1, _diag_layer_variances(rec, var, params), joint)
                else:
                    idx = torch.cat([torch.arange(params.slice_of(i).start,
                                                  params.slice_of(i).stop, device=f.device)
                                     for i in sorted(rec.owned.values())])
                    cov = cov + _explicit_term(_record_jacobian(rec), var[idx], joint)
            if capture.tied:  # tied parameters: exact, through the whole per-sample matrix
                cov = _explicit_term(_full_jacobian(capture, c, b), var, joint)
        elif isinstance(precision, BlockDiagonal) and len(precision.blocks) == len(
            capture.records
        ):
            for rec, block in zip(capture.records, precision.blocks):
                r1 = _linear_rank_one(rec)
                if isinstance(block, KroneckerEigen) and r1 is not None:
                    g, a = r1
                    g = g @ block.QA
                    a = a @ block.QB
                    cov = cov + _rank_one_term(g, a, 1.0 / block.eigenvalues, joint)
                else:
                    cov = cov + _explicit_term(_record_jacobian(rec), block, joint)
        else:  # dense or unknown structure: whole-net per-sample Jacobian (small nets)
            cov = _explicit_term(_full_jacobian(capture, c, b), precision, joint)
    if joint:
        cov = cov.reshape(b * c, b * c)
        cov = 0.5 * (cov + cov.T)
    else:
        cov = 0.5 * (cov + cov.transpose(-1, -2))
    return f, cov


def _full_jacobian(capture: HookCapture, c: int, b: int) -> Tensor:
    return per_sample_matrix(capture.records, capture.params).reshape(c, b, -1)


__all__ = ["glm_covariance", "layers"]
