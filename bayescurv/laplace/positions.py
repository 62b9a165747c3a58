r"""Linearized predictive of dense (per-position) outputs without whole-output Jacobians.

For a :class:`~bayescurv.likelihoods.PerPosition` likelihood the network output is
``(B, C, *S)`` and the predictive of each position needs only the ``C x C`` diagonal block
:math:`J_s \Sigma J_s^\top` of the linearized covariance (``J_s`` the Jacobian of the position's
``C`` outputs). :func:`functional_blocks` computes them over chunks of ``k`` positions: per
chunk, the posterior's structured GLM covariance (:func:`~bayescurv.laplace.predictive.
glm_covariance`) of the ``k·C`` selected outputs, whose ``C x C`` diagonal blocks are kept.
No ``(B·|S|·C) x P`` Jacobian (nor a ``(B, |S|C, |S|C)`` covariance) is formed: the memory
of one chunk is that of a ``k·C``-output network — the backpropagated vectors
``k·C x B x (layer outputs)`` plus a ``(B, kC, kC)`` covariance — and ``k`` defaults to
:data:`POSITIONS_PER_CHUNK`. The cost is one forward and one batched backward per chunk
(``⌈|S|/k⌉`` in all), the same work as the per-gridpoint predictive of
:mod:`bayescurv.operators`, which evaluates a function-valued output the same way.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from bayescurv.curvature.engine import HookCapture
from bayescurv.errors import InvalidArgumentError
from bayescurv.laplace.predictive import glm_covariance
from bayescurv.params import select_output

POSITIONS_PER_CHUNK = 64
"""Positions whose outputs one Jacobian pass of the dense predictive takes at once."""


def functional_blocks(la, x: Tensor, positions_per_chunk: int | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Mean ``(B, |S|C)`` (position-major, channel innermost) and the per-position
    covariance blocks ``(B, |S|, C, C)`` of the linearized network of the fitted posterior
    ``la`` (whose likelihood is a :class:`~bayescurv.likelihoods.PerPosition`)."""
    k = POSITIONS_PER_CHUNK if positions_per_chunk is None else positions_per_chunk
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"positions_per_chunk must be a positive integer, got {k}")
    params, lik = la.params, la.likelihood
    with torch.no_grad():
        f = lik.check_outputs(params.forward(x))  # learns C and S
    b, c, n = f.shape[0], lik.channels, lik.size
    base_key = params.output_key
    means, blocks = [], []
    for start in range(0, n, k):
        stop = min(n, start + k)

        def key(out, inputs, start=start, stop=stop):
            o = select_output(out, base_key, inputs)
            return o.movedim(1, -1).reshape(o.shape[0], -1, c)[:, start:stop].reshape(
                o.shape[0], -1)

        sub = copy.copy(params)
        sub.output_key = key
        capture = HookCapture(sub, la.structure, la.unknown_layers, differentiable=False,
                              batch_dim=la.batch_dim)
        m, cov = glm_covariance(capture, la.posterior_precision, x, joint=False,
                                index=la.index)
        kk = stop - start
        means.append(m.reshape(b, kk, c))
        blocks.append(torch.diagonal(cov.reshape(b, kk, c, kk, c), dim1=1, dim2=3
                                     ).permute(0, 3, 1, 2))
    return torch.cat(means, 1).reshape(b, -1), torch.cat(blocks, 1)


__all__ = ["functional_blocks", "POSITIONS_PER_CHUNK"]
