r"""Closed-form predictive moments of an output-layer posterior, for many classes.

When the posterior covers only the network's output layer :math:`f = W \tilde a`
(:math:`\tilde a = [a, 1]` with a bias), its Jacobian rows are :math:`e_c \otimes \tilde a`:
no backward pass is needed, and the probit and bridge links need only the diagonal of
:math:`J \Sigma J^\top` and its row sums :math:`\Sigma 1`, not the ``C x C`` matrix per
input. For a Kronecker posterior in its eigenbasis,
:math:`\Sigma = (Q_G \otimes Q_A)\,\mathrm{diag}(1/w)\,(Q_G \otimes Q_A)^\top`,

.. math:: J \Sigma J^\top = Q_G\, \mathrm{diag}(t)\, Q_G^\top, \qquad
    t_o = \sum_i (Q_A^\top \tilde a)_i^2 / w_{oi},

so :math:`\mathrm{diag} = (Q_G \odot Q_G)\, t` and :math:`\Sigma 1 = Q_G (t \odot Q_G^\top 1)`:
:math:`O(I^2 + O I + O^2)` per input instead of the :math:`O(O^2 I)` of the general path. A
diagonal posterior gives :math:`\mathrm{diag}_c = \sum_i \tilde a_i^2 \sigma^2_{ci}` and
:math:`\Sigma 1 = \mathrm{diag}` (the rows' weights are independent).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.accumulate import kron_index
from bayescurv.curvature.engine import HookCapture, _output_layer
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


def output_moments(capture: HookCapture, precision: PSDOperator, x
                   ) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""``(f, diag, rowsum)``: the mean ``f(x; θ*)`` ``(B, C)`` and the diagonal and row
    sums ``(B, C)`` of :math:`J \Sigma J^\top` (in the precision's dtype) when the posterior
    is the network's output layer alone (a linear layer whose output is the network output,
    unshared, with a non-truncated Kronecker or a diagonal precision; module docstring);
    ``None`` otherwise (then :func:`~bayescurv.laplace.predictive.glm_covariance` applies).
    """
    if capture.differentiable or len(capture.records) != 1:
        return None
    rec = capture.records[0]
    if rec.route != "linear" or getattr(rec.module, "groups", 1) != 1:
        return None
    dt = precision.dtype
    with capture, torch.no_grad():
        capture.clear()
        raw = capture.call(x)
        f = raw.unsqueeze(-1) if raw.dim() == 1 else raw
        if _output_layer(capture, raw, f) is None:
            return None
        block = _head_block(capture, precision)
        if block is None:
            return None
        a = rec.linear_inputs()[:, 0, :].to(dt)  # (B, I), with the bias' column of ones
        if isinstance(block, Tensor):  # variances (O, I) of a diagonal precision
            diag = a.square() @ block.mT
            return f.detach(), diag, diag
        qg, qa = block.QA.to(dt), block.QB.to(dt)
        t = (a @ qa).square() @ block.eigenvalues.reciprocal().mT  # (B, O)
        diag = t @ qg.square().mT
        rowsum = (t * qg.sum(0)) @ qg.mT
        return f.detach(), diag, rowsum
