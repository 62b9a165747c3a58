"""The loss columns of the streaming pass: the square-root columns of the loss Hessian
(:func:`loss_sqrt`), their backward passes to the layer outputs one column after the other
(:func:`column_by_column`, on :data:`SEQUENTIAL_DEVICES`), and the Gaussian residuals'
sufficient statistic taken in the same pass (:func:`residual_squares`)."""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError
from bayescurv.likelihoods import Likelihood
from bayescurv.linalg import internal_dtype

KINDS = ("ggn", "mc", "ef")
"""Curvature kinds the hook engine computes: the exact GGN (= Fisher for the likelihoods
here), its Monte-Carlo estimate with sampled targets, and the empirical Fisher. The Hessian
is matrix-free (:mod:`bayescurv.curvature.matfree`) or dense for small nets."""


def loss_sqrt(
    likelihood: Likelihood,
    f: Tensor,
    y: Tensor,
    kind: str,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Columns ``(K, B, C)`` whose outer products sum to the curvature of the loss in ``f``."""
    fd = f.detach()
    if kind == "ggn":
        s = likelihood.hessian_sqrt(fd)
    elif kind == "mc":
        s = likelihood.sampled_hessian_sqrt(fd, num_samples, generator)
    elif kind == "ef":
        s = likelihood.gradient(fd, y).unsqueeze(-1)
    else:
        raise InvalidArgumentError(f"unknown curvature kind {kind!r}; use one of {KINDS}")
    return s.permute(2, 0, 1)


def residual_squares(f: Tensor, y: Tensor) -> Tensor:
    """Per-output sums of squared residuals ``Σ_n (f_n - y_n)²`` ``(C,)`` of one batch, in
    :func:`~bayescurv.linalg.internal_dtype` (float64 for float32/bf16/fp16 models)."""
    return (f.detach() - y).to(internal_dtype(f.dtype)).square().sum(0)


SEQUENTIAL_DEVICES = ("cpu",)
"""Devices on which the ``K`` columns go back one backward pass after the other instead of
one vmapped pass (``is_grads_batched``): on CPU the vmapped pass measured 2.6x slower on the
narrow ResNet-18 and 1.7x on the ViT of ``benchmarks/scale.py`` (issue 30)."""


def column_by_column(f: Tensor, outs: list[Tensor], cols: Tensor, create: bool,
                     keep: bool) -> list[Tensor | None]:
    """Gradients ``(K, ...)`` of ``f`` w.r.t. ``outs`` for each of the ``K`` columns, one
    backward pass per column, written into preallocated tensors (no stacking copy)."""
    k = cols.shape[0]
    grads: list[Tensor | None] = []
    if create:  # keep the graph through the results (gradients w.r.t. the inputs)
        per = [torch.autograd.grad(f, outs, cols[i], allow_unused=True, create_graph=True,
                                   retain_graph=True) for i in range(k)]
        return [None if p[0] is None else torch.stack(p) for p in zip(*per)]
    for i in range(k):
        gi = torch.autograd.grad(f, outs, cols[i], allow_unused=True,
                                 retain_graph=keep or i < k - 1)
        if i == 0:
            grads = [None if g is None else g.new_empty(k, *g.shape) for g in gi]
        for out, g in zip(grads, gi):
            if out is not None:
                out[i] = g
    return grads
