"""``compute``: a curvature matrix of the summed loss in a requested structure, from one
streaming pass over the data (two for EKFAC)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import accumulate
from bayescurv.curvature.engine import KINDS, HookCapture, stream
from bayescurv.errors import InvalidArgumentError
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.linalg import Dense, Diagonal, PSDOperator
from bayescurv.params import ParamSet, select

STRUCTURES = ("full", "diag", "kfac", "kfac-reduce", "ekfac")
ALL_KINDS = (*KINDS, "hessian")


@dataclass
class Curvature:
    """A curvature matrix and what was learned in the same pass.

    Attributes:
        matrix: the ``P x P`` PSD matrix over ``params`` (flat order), a
            :class:`bayescurv.linalg.PSDOperator` of the requested structure.
        loss: the negative log-likelihood of the data at the current parameters (sum, or
            mean when ``reduction="mean"``).
        num_data: number of data points seen (over all ranks).
        params, structure, kind: what was computed.
    """

    matrix: PSDOperator
    loss: Tensor
    num_data: int
    params: ParamSet
    structure: str
    kind: str


def _check_options(structure: str, kind: str, num_samples: int) -> None:
    if structure not in STRUCTURES:
        raise InvalidArgumentError(f"unknown structure {structure!r}; use one of {STRUCTURES}")
    if kind not in ALL_KINDS:
        raise InvalidArgumentError(f"unknown curvature kind {kind!r}; use one of {ALL_KINDS}")
    if kind == "hessian" and structure not in ("full", "diag"):
        raise InvalidArgumentError(
            f"the Hessian has no {structure!r} structure here; use structure='full' or 'diag' "
            "(small nets), or the matrix-free HessianLinearOperator"
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be a positive integer, got {num_samples}")


def compute(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable,
    *,
    structure: str = "kfac",
    kind: str = "ggn",
    params: ParamSet | str | Iterable[str] = "all",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    unknown_layers: str = "error",
    x_key: str = "x",
    y_key: str = "y",
    progress: bool = False,
) -> Curvature:
    r"""Curvature of :math:`L(\theta) = \sum_n -\log p(y_n | f(x_n;\theta))` at the current
    parameters.

    Args:
        model: the network; its outputs are ``(batch, outputs)``.
        likelihood: ``"classification"``, ``"regression"``, ``"binary"``, ``"poisson"`` or
            a :class:`~bayescurv.likelihoods.Likelihood`.
        data: an iterable of ``(x, y)`` batches or dicts (a DataLoader), any batch sizes;
            EKFAC iterates it twice.
        structure: ``"full"`` (dense ``P x P``), ``"diag"`` (exact diagonal), ``"kfac"``
            (K-FAC expand), ``"kfac-reduce"``, ``"ekfac"``.
        kind: ``"ggn"`` (exact GGN, :math:`\sum_n J_n^\top H_n J_n`), ``"mc"`` (Monte-Carlo
            GGN / Fisher with ``num_samples`` sampled targets per point), ``"ef"``
            (empirical Fisher :math:`\sum_n g_n g_n^\top`), ``"hessian"`` (full/diag only).
        params: which parameters (``"all"``, ``"last_layer"``, names, or a ParamSet).
        generator: random source of ``"mc"``, for reproducibility.
        reduction: ``"sum"`` (the convention above) or ``"mean"`` (divide by N).
        unknown_layers: ``"error"`` (refuse modules of unknown type, naming them) or
            ``"per_sample"`` (opt in to per-sample gradients of that module by
            ``torch.func``; exact for modules acting on each data point separately).
        progress: show a progress bar.

    The result is summed across ``torch.distributed`` ranks when a process group is
    initialized, so each rank holds the curvature of the whole data set.
    """
    _check_options(structure, kind, num_samples)
    batches.check_reduction(reduction)
    lik = get_likelihood(likelihood)
    pset = params if isinstance(params, ParamSet) else select(model, params)
    if kind == "hessian":
        return _dense_hessian(pset, lik, data, structure, reduction, x_key, y_key)
    capture = HookCapture(pset, structure, unknown_layers)
    if structure == "full":
        acc = accumulate.FullAccumulator(capture)
    elif structure == "diag":
        acc = accumulate.DiagAccumulator(capture)
    else:
        acc = accumulate.KFACAccumulator(
            capture, "reduce" if structure == "kfac-reduce" else "expand"
        )
    stats = torch.zeros(2, dtype=pset.dtype, device=pset.device)  # loss, count
    opts = dict(kind=kind, num_samples=num_samples, generator=generator, x_key=x_key,
                y_key=y_key, progress=progress)
    for res in stream(capture, lik, data, **opts):
        acc.update(res.records)
        stats[0] += res.loss.detach()
        stats[1] += res.batch_size
    batches.all_reduce_([*acc.tensors(), stats])
    if structure in ("kfac", "kfac-reduce"):
        matrix = acc.finalize_blocks(capture.records)
    elif structure == "ekfac":
        corr = accumulate.EKFACCorrection(acc, capture.records)
        for res in stream(capture, lik, data, **opts):
            corr.update(res.records)
        batches.all_reduce_(corr.tensors())
        matrix = corr.finalize_blocks(capture.records)
    else:
        matrix = acc.finalize()
    n = int(stats[1].item())
    loss = stats[0]
    if reduction == "mean":
        matrix = matrix.scale(1.0 / n)
        loss = loss / n
    return Curvature(matrix, loss, n, pset, structure, kind)


def _dense_hessian(
    pset: ParamSet, lik: Likelihood, data: Iterable, structure: str, reduction: str,
    x_key: str, y_key: str,
) -> Curvature:
    """Dense Hessian of the summed loss by ``torch.func.hessian`` (small nets only)."""
    theta = pset.vector()
    total = torch.zeros(pset.numel, pset.numel, dtype=pset.dtype, device=pset.device)
    loss = torch.zeros((), dtype=pset.dtype, device=pset.device)
    n = 0
    for x, y in batches.iterate(data, device=pset.device, dtype=pset.dtype, x_key=x_key,
                                y_key=y_key):
        def batch_loss(v, x=x, y=y):
            f = pset.functional_call(v, **x) if isinstance(x, dict) else pset.functional_call(v, x)
            return lik.nll(*lik.check(f, y))

        total += torch.func.hessian(batch_loss)(theta)
        loss += batch_loss(theta).detach()
        n += batches.batch_size(x)
    stats = torch.tensor([float(n)], dtype=pset.dtype, device=pset.device)
    batches.all_reduce_([total, loss, stats])
    n = int(stats.item())
    total = 0.5 * (total + total.T)
    # the Hessian need not be PSD: keep it dense/diagonal as it is
    matrix: PSDOperator = Dense(total) if structure == "full" else Diagonal(torch.diagonal(total))
    if reduction == "mean":
        matrix, loss = matrix.scale(1.0 / n), loss / n
    return Curvature(matrix, loss, n, pset, structure, "hessian")
