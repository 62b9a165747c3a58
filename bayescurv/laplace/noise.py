r"""Observation noise of Gaussian regression: scalar or one value per output.

With per-output noise :math:`\sigma_c` the curvature is
:math:`H(\sigma) = \sum_c H_c / \sigma_c^2`, :math:`H_c = \sum_n J_{nc}^\top J_{nc}` (the
GGN of output ``c`` at unit noise). The pieces :math:`H_c` are computed once (one pass per
output, each backpropagating the unit column :math:`e_c`), so the evidence stays
differentiable in every :math:`\sigma_c` without refitting. Kronecker structures do not
keep a single Kronecker product under a per-output weighting and are not offered.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bayescurv import batches
from bayescurv.curvature import compute
from bayescurv.curvature.columns import residual_squares
from bayescurv.likelihoods import Gaussian
from bayescurv.linalg import Dense, Diagonal, PSDOperator
from bayescurv.params import ParamSet

PER_OUTPUT_STRUCTURES = ("full", "diag")


class _OutputColumn(Gaussian):
    """Unit-noise Gaussian whose loss-Hessian square root is the unit column ``e_c``."""

    def __init__(self, column: int) -> None:
        super().__init__(1.0)
        self.column = column

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        f = self.check_outputs(f)
        s = torch.zeros(*f.shape, 1, dtype=f.dtype, device=f.device)
        s[:, self.column, 0] = 1.0
        return s


@torch.no_grad()
def sum_of_squares(params: ParamSet, data: Iterable, x_key: str, y_key: str,
                   batch_dim: int = 0) -> Tensor:
    """Per-output sums of squared residuals ``(C,)`` at the current weights (summed over
    ``torch.distributed`` ranks), summed in float64 for float32/bf16/fp16 models: a pass of
    its own, for the fits whose curvature pass does not return them
    (:attr:`bayescurv.curvature.Curvature.sum_of_squares`)."""
    lik = Gaussian(1.0)
    sse = None
    for x, y in batches.iterate(data, device=params.device, dtype=params.dtype, x_key=x_key,
                                y_key=y_key, batch_dim=batch_dim):  # inputs' batch dim
        part = residual_squares(*lik.check(params.forward(x), y))  # the set's output_key
        sse = part if sse is None else sse + part
    batches.all_reduce_([sse])
    return sse


def per_output_curvatures(
    params: ParamSet, data: Iterable, structure: str, num_outputs: int, **options
) -> list[PSDOperator]:
    """``[H_c]`` for each output ``c`` (unit noise)."""
    return [
        compute(params.model, _OutputColumn(c), data, structure=structure, subset=params,
                **options).matrix
        for c in range(num_outputs)
    ]


def combine(pieces: list[PSDOperator], sigma: Tensor) -> PSDOperator:
    r""":math:`\sum_c H_c / \sigma_c^2`, differentiable in :math:`\sigma`."""
    w = 1.0 / sigma.expand(len(pieces)) ** 2
    if isinstance(pieces[0], Diagonal):
        return Diagonal(sum(wc * h.diagonal() for wc, h in zip(w, pieces)))
    return Dense(sum(wc * h.to_dense() for wc, h in zip(w, pieces)))
