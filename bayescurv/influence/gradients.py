r"""Per-example gradients of the loss, streamed batch by batch from the curvature engine.

The hook engine with the empirical-Fisher column (:func:`bayescurv.curvature.engine.stream`,
``kind="ef"``: the one column :math:`\partial \ell_n / \partial f_n`) leaves in every layer
record the inputs ``a`` and the output gradients ``g`` of each data point;
:func:`~bayescurv.curvature.accumulate.per_sample_matrix` turns them into the per-example
gradients :math:`\nabla_\theta \ell_n` ``(B, P)`` in the flat order of the
:class:`~bayescurv.params.ParamSet` — the same rows whose Gram matrix is the empirical Fisher,
on every layer type the engine knows (BatchNorm, LayerNorm, embeddings, attention, loose
parameters). No whole-network ``vmap`` and no parameter ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from bayescurv import batches
from bayescurv.curvature.accumulate import per_sample_matrix
from bayescurv.curvature.engine import HookCapture, stream
from bayescurv.likelihoods import Likelihood
from bayescurv.params import ParamSet


def loss_gradients(
    params: ParamSet,
    likelihood: Likelihood,
    data: Iterable,
    *,
    dtype: torch.dtype | None = None,
    index: Tensor | None = None,
    unknown_layers: str = "auto",
    batch_dim: int = 0,
    x_key: str = "x",
    y_key: str = "y",
    progress: bool = False,
) -> Iterator[Tensor]:
    r"""Yield, per batch of ``data``, the gradients
    :math:`\nabla_\theta\, \ell_n = \nabla_\theta -\log p(y_n | f(x_n; \theta))` ``(B, P)`` over
    ``params`` (restricted to the flat positions ``index`` when given), in ``dtype`` (default
    the model's)."""
    capture = HookCapture(params, "full", unknown_layers, batch_dim=batch_dim)
    for res in stream(capture, likelihood, data, kind="ef", x_key=x_key, y_key=y_key,
                      progress=progress):
        v = per_sample_matrix(res.records, params, dtype)
        yield v if index is None else v[:, index]


@torch.no_grad()
def example_losses(
    params: ParamSet, likelihood: Likelihood, data: Iterable, *, x_key: str = "x",
    y_key: str = "y", batch_dim: int = 0,
) -> Tensor:
    """Per-example negative log-likelihoods ``(N,)`` of ``data`` (one forward pass)."""
    out = [-likelihood.log_prob(likelihood.check_outputs(params.forward(x)), y).reshape(-1)
           for x, y in batches.iterate(data, device=params.device, dtype=params.dtype,
                                       x_key=x_key, y_key=y_key, batch_dim=batch_dim)]
    return torch.cat(out)
