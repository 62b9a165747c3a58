r"""Closed-form predictive moments of an output-layer posterior, for many classes.

When the posterior covers only the network's output layer :math:`f = W \tilde a`
(:math:`\tilde a = [a, 1]` with a bias), its Jacobian rows are :math:`e_c \otimes \tilde a`:
no backward pass is needed, and the probit and bridge links need only the diagonal of
:math:`J \Sigma J^\top` and its row sums :math:`\Sigma 1`, not the ``C x C`` matrix per
input. For a Kronecker posterior in its eigenbasis,
:math:`\Sigma = (Q_G \otimes Q_A)\,\mathrm{diag}(1/w)\,(Q_G \otimes Q_A)^\top`,

.. math:: J \Sigma J^\top = Q_G\, \mathrm{diag}(t)\, Q_G^\top, \qquad
    t_o = \sum_i (Q_A^\top \tilde a)_i^2 / w_{oi},

so the probit's projected variances are :math:`\mathrm{diag}(P J\Sigma J^\top P) =
((P Q_G) \odot (P Q_G))\, t` (:math:`P = I - 11^\top/C`) and the bridge's moments
:math:`\mathrm{diag} = (Q_G \odot Q_G)\, t`, :math:`\Sigma 1 = Q_G (t \odot Q_G^\top 1)`:
:math:`O(I^2 + O I + O C)` per input instead of the :math:`O(C^2 O I)`-sized work of the
general path (``C`` backpropagated columns, a ``C x C`` matrix per input). A diagonal
posterior gives :math:`\mathrm{diag}_c = \sum_i \tilde a_i^2 \sigma^2_{ci}` and
:math:`\Sigma 1 = \mathrm{diag}` (the rows' weights are independent).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.accumulate import kron_index
from bayescurv.curvature.engine import HookCapture, output_layer
from bayescurv.linalg import BlockDiagonal, Diagonal, KroneckerEigen, PSDOperator


def _head_block(capture: HookCapture, precision: PSDOperator) -> PSDOperator | None:
    """The precision of the single record's ``W̃`` in row-major order: a
    :class:`KroneckerEigen` (not truncated) or the variances ``(O, I)`` of a diagonal
    precision; ``None`` for other structures."""
    rec = capture.records[0]
    idx = kron_index(capture.params, rec)
    if isinstance(precision, Diagonal):
        return precision.inv_diagonal()[idx].reshape(rec.module.weight.shape[0], -1)
    if isinstance(precision, BlockDiagonal) and precision.num_blocks == 1:
        block = precision.blocks[0]
        if (isinstance(block, KroneckerEigen) and not block.truncated
                and block.QA is not None and block.QB is not None
                and torch.equal(precision.indices[0], idx)):
            return block
    return None


def _head_record(capture: HookCapture):
    """The single record when the posterior is one ungrouped linear layer, else ``None``."""
    if capture.differentiable or len(capture.records) != 1:
        return None
    rec = capture.records[0]
    if rec.route != "linear" or getattr(rec.module, "groups", 1) != 1:
        return None
    return rec


def _columns(block: PSDOperator | Tensor, link: str, c: int) -> Tensor | None:
    """The ``(O, k)`` matrix ``M`` with ``t M`` the moments the link reads: for a Kronecker
    block, probit's projected variances ``((P Q_G)^{⊙2})ᵀ`` (``P = I - 11ᵀ/C``: the centred
    eigenvectors, so the common shift of the logits, a large variance along ``1`` that the
    prior alone bounds, never enters the sums to cancel) and the bridge's diagonal and row
    sums ``[(Q_G^{⊙2})ᵀ | diag(Q_Gᵀ 1) Q_Gᵀ]``; ``None`` for a diagonal block."""
    if isinstance(block, Tensor):
        return None
    qg = block.QA
    if link == "probit":
        return (qg - qg.mean(0, keepdim=True)).square().mT
    return torch.cat([qg.square().mT, qg.sum(0)[:, None] * qg.mT], 1)


def head_predictive(capture: HookCapture, precision: PSDOperator, parts: list, link: str
                    ) -> Tensor | None:
    r"""Class probabilities ``(B, C)`` of the ``"probit"`` or ``"bridge"`` link over the input
    chunks ``parts`` when the posterior is the network's output layer alone (a linear layer
    whose output is the network output, unshared, with a non-truncated Kronecker or a
    diagonal precision; module docstring), from the moments those links read, never the
    ``C x C`` covariance; ``None`` otherwise (then
    :func:`~bayescurv.laplace.predictive.glm_covariance` applies). The moments are formed in
    the precision's dtype (float64 for a float32 model)."""
    from bayescurv import links

    rec = _head_record(capture)
    if rec is None:
        return None
    dt = precision.dtype
    cache: dict = {}
    out = []
    with capture, torch.no_grad():
        for x in parts:
            capture.clear()
            raw = capture.call(x)
            if raw.dim() != 2 or raw.shape[-1] < 2 or output_layer(capture, raw, raw) is None:
                return None
            if not cache:  # the block's quantities once per call, shared by the chunks
                block = _head_block(capture, precision)
                if block is None:
                    return None
                cache["block"] = block
                cache["cols"] = _columns(block, link, raw.shape[-1])
                if not isinstance(block, Tensor):
                    cache["qa"] = block.QB.to(dt)
                    cache["winv"] = block.eigenvalues.reciprocal().mT.contiguous()
            block, cols = cache["block"], cache["cols"]
            a = rec.linear_inputs()[:, 0, :].to(dt)  # (B, I), with the bias' column of ones
            m = raw.detach().to(dt)
            if isinstance(block, Tensor):  # variances (O, I) of a diagonal precision
                diag = a.square() @ block.mT
                if link == "probit":  # diag(P D P) = d (1 - 2/C) + Σd / C²
                    c = m.shape[-1]
                    var = diag * (1 - 2 / c) + diag.sum(-1, keepdim=True) / c**2
                    out.append(links.probit_softmax(m - m.mean(-1, keepdim=True), var))
                else:
                    out.append(links.laplace_bridge_moments(m, diag, diag))
                continue
            t = (a @ cache["qa"]).square() @ cache["winv"]  # (B, O): J Σ Jᵀ = Q_G diag(t) Q_Gᵀ
            mom = t @ cols
            if link == "probit":  # centred mean, projected variances: probit_softmax's terms
                out.append(links.probit_softmax(m - m.mean(-1, keepdim=True), mom))
            else:
                diag, rowsum = mom.chunk(2, -1)
                out.append(links.laplace_bridge_moments(m, diag, rowsum))
    return torch.cat(out).to(capture.params.dtype)

