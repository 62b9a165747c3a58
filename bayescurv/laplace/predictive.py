r"""The GLM (linearized) predictive: :math:`f_{lin}(x) = f(x;\theta^*) + J(x)(\theta-\theta^*)`,
so :math:`f(x) \sim N(f(x;\theta^*), J(x)\,\Sigma\,J(x)^\top)` with :math:`\Sigma` the
posterior covariance. :math:`J \Sigma J^\top` is formed from the posterior's structure,
layer by layer, never from a (batch x outputs x parameters) Jacobian of the whole net:

- a diagonal :math:`\Sigma` or a Kronecker block in its eigenbasis
  :math:`(Q_G \otimes Q_A)\,diag(w)\,(\cdot)^\top`: for a layer without weight sharing the
  Jacobian row of output ``c`` is :math:`g_c \otimes a`, so
  :math:`(J\Sigma J^\top)_{cc'} = \sum_{o,i} \tilde g_{co} \tilde g_{c'o} w_{oi} \tilde a_i^2`
  with :math:`\tilde g = Q_G^\top g`, :math:`\tilde a = Q_A^\top a` — two small matmuls;
  a truncated block (``factor_rank``: bases ``(O, r_G)``, ``(I, r_A)``, prior precision
  :math:`\delta` on the rest) adds :math:`J (I - P) J^\top / \delta`,
  :math:`P = Q_G Q_G^\top \otimes Q_A Q_A^\top`, from the explicit residual
  :math:`(I - P)(g \otimes a) = (g - P_G g) \otimes a + P_G g \otimes (a - P_A a)` (no
  cancellation of two large terms; per-input residual Jacobians with weight sharing);
- low rank plus diagonal, :math:`\Lambda = U S U^\top + D`: by Woodbury
  :math:`J\Sigma J^\top = J D^{-1} J^\top - (JZ) C^{-1} (JZ)^\top` with
  :math:`Z = D^{-1} U S^{1/2}`, :math:`C = I + S^{1/2} U^\top D^{-1} U S^{1/2}`; ``JZ`` is
  formed layer by layer;
- weight-sharing linear-like layers (convolutions, ``nn.Linear`` on sequences, attention
  projections; ``T`` positions): the per-input Jacobian of that layer only,
  :math:`\sum_t \tilde g_{ct} \tilde a_t^\top`, rotated into the block's eigenbasis and formed
  in chunks of inputs — no solve; embeddings and dense blocks: the per-sample Jacobian *of
  that layer only*, in the block's own column order (blocks are matched to layers by their
  index sets, so a layout mismatch can never pair the wrong columns);
- a full :math:`\Sigma` (small nets): the per-sample Jacobian of all parameters.

With ``joint=True`` the covariance across the inputs is returned, ``(B*C, B*C)``, ordered
input-major (index ``b * C + c``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature import layers
from bayescurv.curvature.accumulate import kron_index, per_sample_matrix
from bayescurv.curvature.engine import HookCapture, jacobian_pass
from bayescurv.curvature.records import ModuleRecord
from bayescurv.linalg import (
    BlockDiagonal,
    Diagonal,
    KroneckerBatch,
    KroneckerEigen,
    LowRankPlusDiagonal,
    PSDOperator,
    product_dtype,
)
from bayescurv.params import ParamSet


def _linear_term(g: Tensor, a: Tensor, w: Tensor, joint: bool) -> Tensor:
    r"""Covariance of :math:`\sum_{t,o,i} g_{cbto} a_{bti} \epsilon_{oi}` with independent
    :math:`\epsilon_{oi} \sim N(0, w_{oi})`, for the factors ``g (C, B, T, O)``,
    ``a (B, T, I)`` of a linear-like layer (``T`` weight-sharing positions), possibly rotated
    into a Kronecker eigenbasis. Returns ``(B, C, C)`` or, joint, ``(B, C, B, C)``.

    Without sharing (``T = 1``) the Jacobian row is rank one, :math:`g_{cb} \otimes a_b`,
    and two small matmuls suffice; with sharing the per-input layer Jacobian
    :math:`\sum_t g_{cbt} a_{bt}^\top` is formed in chunks of inputs (never the Jacobian
    of the whole net, never a solve). A grouped convolution's factors carry a leading group
    dimension (``g (G, C, B, T, O)``, ``a (G, B, T, I)``, ``w (G, O, I)``); the groups'
    independent terms are summed."""
    if a.shape[-2] == 1:
        g1, a1 = g[..., 0, :], a[..., 0, :]
        if not joint:
            t = a1.square() @ w.mT  # (..., B, O)
            out = torch.einsum("...cbo,...kbo,...bo->...bck", g1, g1, t)
        else:
            m = torch.einsum("...bi,...di,...oi->...bdo", a1, a1, w)  # (..., B, B, O)
            out = torch.einsum("...cbo,...kdo,...bdo->...bcdk", g1, g1, m)
        return out if a.dim() == 3 else out.sum(0)
    c, b = g.shape[-4:-2]
    if not joint:
        out = g.new_empty(b, c, c)
        root = w.reshape(-1).sqrt()
        for sl, jac in layers.linear_jacobian_chunks(g, a):  # (b, C, O·I), a fresh tensor
            jac.mul_(root)
            out[sl] = torch.bmm(jac, jac.transpose(1, 2))
        return out
    jac = layers.linear_per_sample(layers.LinearView(a, g)).transpose(0, 1).reshape(b * c, -1)
    return ((jac * w.reshape(-1)) @ jac.T).reshape(b, c, b, c)


def _complement_term(g: Tensor, a: Tensor, qg: Tensor, qa: Tensor, joint: bool) -> Tensor:
    r""":math:`J (I - P) J^\top` for a linear-like layer's factors ``g (C, B, T, O)``,
    ``a (B, T, I)`` and the kept bases ``qg (O, r_G)``, ``qa (I, r_A)`` of a truncated
    Kronecker block, :math:`P = Q_G Q_G^\top \otimes Q_A Q_A^\top` (module docstring).
    Returns ``(B, C, C)`` or, joint, ``(B, C, B, C)``."""
    if a.shape[-2] == 1:  # J rows g ⊗ a: residual (g - P g) ⊗ a + P g ⊗ (a - P a)
        g1, a1 = g[..., 0, :], a[..., 0, :]
        gk, ak = g1 @ qg, a1 @ qa
        gr, ar = g1 - gk @ qg.mT, a1 - ak @ qa.mT
        if not joint:
            return (torch.einsum("cbo,kbo->bck", gr, gr) * a1.square().sum(-1)[:, None, None]
                    + torch.einsum("cbo,kbo->bck", gk, gk) * ar.square().sum(-1)[:, None, None])
        return (torch.einsum("cbo,kdo,bd->bcdk", gr, gr, a1 @ a1.mT)
                + torch.einsum("cbo,kdo,bd->bcdk", gk, gk, ar @ ar.mT))
    o, i = g.shape[-1], a.shape[-1]

    def residual(jac: Tensor) -> Tensor:  # (b, C, O·I) -> (b, C, O·I), (I - P) per row
        m = jac.reshape(*jac.shape[:2], o, i)
        return (m - qg @ (qg.mT @ m @ qa) @ qa.mT).flatten(2)

    c, b = g.shape[-4:-2]
    if not joint:
        out = g.new_empty(b, c, c)
        for sl, jac in layers.linear_jacobian_chunks(g, a):
            r = residual(jac)
            out[sl] = torch.bmm(r, r.transpose(1, 2))
        return out
    jac = layers.linear_per_sample(layers.LinearView(a, g)).transpose(0, 1).flatten(2)
    r = residual(jac).reshape(b * c, -1)
    return (r @ r.T).reshape(b, c, b, c)


def _explicit_term(jac: Tensor, cov_block: PSDOperator | Tensor, joint: bool) -> Tensor:
    """``J Σ Jᵀ`` for an explicit Jacobian ``jac (C, B, p)``; ``cov_block`` is the block of
    the posterior *precision* (solved against) or a tensor of variances (diagonal). Without
    ``joint`` only the per-input ``(B, C, C)`` blocks are formed (a batched contraction)."""
    c, b, p = jac.shape
    flat = jac.permute(1, 0, 2).reshape(b * c, p)  # input-major rows
    if isinstance(cov_block, Tensor):
        sj = flat * cov_block
    else:
        sj = cov_block.solve(flat.T).T
    if joint:
        return (flat @ sj.T).reshape(b, c, b, c)
    return torch.einsum("bcp,bkp->bck", flat.reshape(b, c, p), sj.reshape(b, c, p))


def _embedding_variances(rec: ModuleRecord, block: PSDOperator
                         ) -> tuple[Tensor, Tensor | None] | None:
    """``(w (V, D), Q (D, D) or None)`` when ``block`` (the posterior precision of an
    embedding table) is diagonal in the basis ``I_V ⊗ Q`` — K-FAC's diagonal row-count factor
    ⊗ ``G`` (untruncated), or a diagonal posterior — with ``w`` its inverse eigenvalues;
    ``None`` otherwise (the explicit route)."""
    v, d = rec.module.num_embeddings, rec.module.embedding_dim
    if isinstance(block, KroneckerEigen) and block.eigenbases[0] is None and (
            not block.truncated) and block.factor_sizes == (v, d):
        return block.eigenvalues.reciprocal(), block.eigenbases[1]
    if isinstance(block, Diagonal):
        return block.diagonal().reciprocal().reshape(v, d), None
    return None


def _embedding_term(rec: ModuleRecord, w: Tensor, q: Tensor | None, dtype: torch.dtype,
                    joint: bool) -> Tensor:
    r"""``J Σ Jᵀ`` of an embedding table ``(V, D)`` with ``Σ = (I ⊗ Q) diag(w) (I ⊗ Q)ᵀ``,
    without its ``(C, B, V·D)`` Jacobian (15 GB for BERT-base's 30,522-token table at
    ``C = 10``, 8 inputs). Row ``v`` of :math:`J_{bc}` is :math:`\sum_t [x_{bt} = v]\,g_{cbt}`:
    only the tokens of input ``b`` are nonzero, so the rotated gradients ``g Q`` are summed
    into one slot per distinct token (per input; over the chunk for ``joint``) and
    :math:`J_{bc} Σ J_{b'k}^\top = \sum_{u,d} s_{cbud}\, s_{kb'ud}\, w_{x_u d}`."""
    x = torch.cat([xi.reshape(xi.shape[0], -1) for xi in rec.inputs], 1)  # (B, T)
    g = torch.cat([gi.reshape(gi.shape[0], gi.shape[1], -1, gi.shape[-1])
                   for gi in rec.grads], 2).to(dtype)  # (C, B, T, D)
    if rec.module.padding_idx is not None:  # the padding row gets no gradient
        g = g * (x != rec.module.padding_idx).to(dtype)[None, :, :, None]
    if q is not None:
        g = g @ q.to(dtype)
    c, b, t, d = g.shape
    w = w.to(dtype)
    if joint:
        uniq, slot = torch.unique(x, return_inverse=True)  # slots shared by the chunk
        s = g.new_zeros(c, b, uniq.numel(), d).scatter_add_(
            2, slot[None, :, :, None].expand(c, b, t, d), g)
        return torch.einsum("cbud,keud,ud->bcek", s, s, w[uniq])
    slot = (x[:, :, None] == x[:, None, :]).to(torch.uint8).argmax(-1)  # first occurrence
    s = torch.zeros_like(g).scatter_add_(2, slot[None, :, :, None].expand(c, b, t, d), g)
    return torch.einsum("cbtd,kbtd,btd->bck", s, s, w[x])


def _record_jacobian(rec: ModuleRecord, like: Tensor) -> Tensor:
    """Per-sample Jacobian of one module's parameters ``(C, B, p)``, columns in the order of
    :func:`_record_index` with ``kron=False`` (owned parameters in flat order); zero for a
    module the forward pass did not call (``like``: any ``(C, B, ·)`` tensor)."""
    if not rec.called:
        p = sum(rec.module.get_parameter(n).numel() for n in rec.owned)
        return like.new_zeros(*like.shape[:2], p)
    ps = rec.per_sample()
    return torch.cat([ps[i] for i in sorted(ps)], -1)


def _linear_factors(rec: ModuleRecord) -> tuple[Tensor, Tensor] | None:
    """``(g (C, B, T, O), a (B, T, I))`` of a called linear-like layer (``a`` augmented by
    ones when the bias is in the posterior), in the model's dtype; ``None`` for other
    layers."""
    if rec.route != "linear" or not rec.called:
        return None
    v = rec.linear_view()
    return v.g, v.a


def _record_index(rec: ModuleRecord, params: ParamSet, kron: bool) -> Tensor:
    """Flat positions of a record's parameters in the order of its Jacobian columns:
    ``W̃ = [W | b]`` row-major (``kron=True``, linear-like layers: the Kronecker layout of
    :mod:`bayescurv.curvature.accumulate`), else the owned tensors in flat order."""
    if kron:
        return kron_index(params, rec)
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
        return _explicit_term(_full_jacobian(capture).to(var.dtype), var, joint)
    cov, ref = 0, _ref(capture)
    for rec in capture.records:
        lin = _linear_factors(rec)
        idx = _record_index(rec, capture.params, lin is not None)
        if lin is not None:
            g, a = lin  # grouped: w (G, O, I)
            w = var[idx].reshape(*a.shape[:-3], g.shape[-1], a.shape[-1])
            work = _work_dtype(capture.params.dtype, g.shape[-2], w)
            term = _linear_term(g.to(work), a.to(work), w.to(work), joint)
            cov = cov + term.to(var.dtype)
        elif rec.route == "embedding" and rec.called:  # no (C, B, V·D) Jacobian
            w = var[idx].reshape(rec.module.num_embeddings, rec.module.embedding_dim)
            cov = cov + _embedding_term(rec, w, None, var.dtype, joint)
        else:
            jac = _record_jacobian(rec, ref).to(var.dtype)
            cov = cov + _explicit_term(jac, var[idx], joint)
    return cov


def _jacobian_times(capture: HookCapture, z: Tensor) -> Tensor:
    """``J Z`` for ``Z`` ``(P, k)``: ``(C, B, k)``, layer by layer."""
    if capture.tied:
        return _full_jacobian(capture).to(z.dtype) @ z
    out, ref = 0, _ref(capture)
    for rec in capture.records:
        lin = _linear_factors(rec)
        zi = z[_record_index(rec, capture.params, lin is not None)]
        if lin is not None:  # float64 kept: Woodbury subtracts these products
            g, a = lin[0].to(z.dtype), lin[1].to(z.dtype)
            zi = zi.reshape(*a.shape[:-3], g.shape[-1], a.shape[-1], -1)  # grouped: G first
            az = torch.einsum("...bti,...oik->...btok", a, zi)
            jz = torch.einsum("...cbto,...btok->...cbk", g, az)
            out = out + (jz if a.dim() == 3 else jz.sum(0))
        elif rec.route == "embedding" and rec.called:  # rows of the tokens used: Z[x]
            zi = zi.reshape(rec.module.num_embeddings, rec.module.embedding_dim, -1)
            for x, g in zip(rec.inputs, rec.grads):
                x = x.reshape(x.shape[0], -1)
                g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).to(z.dtype)
                if rec.module.padding_idx is not None:
                    g = g * (x != rec.module.padding_idx).to(z.dtype)[None, :, :, None]
                out = out + torch.einsum("cbtd,btdk->cbk", g, zi[x])
        else:
            out = out + _record_jacobian(rec, ref).to(z.dtype) @ zi
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


def _block_records(capture: HookCapture, precision: BlockDiagonal) -> list | None:
    """Pair each block with the record that owns exactly its parameters, and say in which
    layout the block orders them: ``[(record, block, kron)]``; ``None`` when the blocks do
    not map onto the records one to one (then the dense route is taken)."""
    if capture.tied or precision.num_blocks != len(capture.records):
        return None
    out = []
    for rec, block, bidx in zip(capture.records, precision.blocks, precision.indices):
        for kron in (rec.route == "linear" and "weight" in rec.owned, False):
            if torch.equal(_record_index(rec, capture.params, kron), bidx):
                out.append((rec, block, kron))
                break
        else:
            return None
    return out


def _work_dtype(model_dtype: torch.dtype, positions: int, w: Tensor) -> torch.dtype:
    r"""Dtype of a layer's per-input Jacobian term :math:`\sum_{oi} J_{c,oi} J_{k,oi} w_{oi}`:
    :func:`~bayescurv.linalg.product_dtype` for weight-sharing layers (a sum of non-negative
    terms on the diagonal, bounded by them off it, from the model's own low-precision
    factors); the variances' dtype without sharing (``T = 1``: two small matmuls) and when
    the variances overflow float32."""
    work = product_dtype(model_dtype)
    if positions == 1 or work == w.dtype or float(w.max()) > 1e30:  # one sync per layer
        return w.dtype
    return work


def _blocks_term(capture: HookCapture, pairs: list, dtype: torch.dtype, joint: bool) -> Tensor:
    cov, ref = 0, _ref(capture)
    for rec, block, kron in pairs:
        lin = _linear_factors(rec) if kron else None
        if isinstance(block, (KroneckerEigen, KroneckerBatch)) and lin is not None:
            g, a = lin
            w = block.eigenvalues.reciprocal()
            work = _work_dtype(capture.params.dtype, g.shape[-2], w)
            g, a = g.to(work), a.to(work)
            if isinstance(block, KroneckerEigen):  # (a diagonal factor: identity formed)
                qa, qb = block.QA.to(work), block.QB.to(work)
            else:  # grouped convolution: bases (G, n, n), None for a factor of size one
                qa, qb = (None if q is None else q.to(work) for q in block.eigenbases)
            term = _linear_term(layers.group_matmul(g, qa), layers.group_matmul(a, qb),
                                w.to(work), joint)
            if isinstance(block, KroneckerEigen) and block.truncated:  # δ⁻¹ J (I - P) Jᵀ
                rest = block.shift.reciprocal()
                term = term + rest.to(work) * _complement_term(g, a, qa, qb, joint)
            cov = cov + term.to(dtype)
            continue
        emb = _embedding_variances(rec, block) if rec.route == "embedding" else None
        if emb is not None and rec.called:
            cov = cov + _embedding_term(rec, *emb, dtype, joint).to(dtype)
            continue
        if kron and rec.called:
            lv = rec.linear_view()
            jac = layers.linear_per_sample(lv).flatten(2)  # (C, B, O*I): row-major [W | b]
        else:
            jac = _record_jacobian(rec, ref)
        cov = cov + _explicit_term(jac.to(dtype), block, joint)
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
    dt = precision.dtype  # the posterior's (internal) dtype; results in the model's
    with capture:
        f = jacobian_pass(capture, x)
        b, c = f.shape
        if index is not None:
            if isinstance(precision, Diagonal):
                var = torch.zeros(capture.params.numel, dtype=dt, device=f.device)
                var[index] = precision.inv_diagonal()
                cov = _diag_term(capture, var, joint)
            else:
                jac = _full_jacobian(capture)[..., index].to(dt)
                cov = _explicit_term(jac, precision, joint)
        elif isinstance(precision, Diagonal):
            cov = _diag_term(capture, precision.inv_diagonal(), joint)
        elif isinstance(precision, LowRankPlusDiagonal):
            cov = _lowrank_term(capture, precision, joint)
        elif isinstance(precision, BlockDiagonal) and (
            pairs := _block_records(capture, precision)
        ) is not None:
            cov = _blocks_term(capture, pairs, dt, joint)
        else:  # dense: whole-net per-sample Jacobian (small nets)
            cov = _explicit_term(_full_jacobian(capture).to(dt), precision, joint)
    cov = cov.to(f.dtype)
    if joint:
        cov = cov.reshape(b * c, b * c)
        return f, 0.5 * (cov + cov.T)
    return f, 0.5 * (cov + cov.transpose(-1, -2))


__all__ = ["glm_covariance"]
