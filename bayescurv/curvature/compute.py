"""``compute``: a curvature matrix of the summed loss in a requested structure, from one
streaming pass over the data (two for EKFAC)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import accumulate, layers, lowrank, preflight
from bayescurv.curvature.columns import KINDS
from bayescurv.curvature.engine import UNKNOWN_LAYERS, HookCapture, stream
from bayescurv.deprecation import UNSET, renamed
from bayescurv.errors import InvalidArgumentError, NonFiniteError
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    KroneckerEigen,
    LowRank,
    LowRankPlusDiagonal,
    PSDOperator,
    internal_dtype,
)
from bayescurv.linalg.kronecker import check_factor_rank
from bayescurv.params import OutputKey, ParamSet, check_output_key, select

STRUCTURES = ("full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank", "diag+lowrank",
              "diag-hesscale")
ALL_KINDS = (*KINDS, "hessian")
LOWRANK = ("lowrank", "diag+lowrank")
KRONECKER = ("kfac", "kfac-reduce", "ekfac")


@dataclass
class Curvature:
    """A curvature matrix and what was learned in the same pass.

    Attributes:
        matrix: the ``P x P`` PSD matrix over ``params`` (flat order), a
            :class:`bayescurv.linalg.PSDOperator` of the requested structure, in
            :func:`~bayescurv.linalg.internal_dtype` of the model (float64 for
            float32/bf16/fp16 models: the sums and decompositions are carried in float64).
        loss: the negative log-likelihood of the data at the current parameters (sum, or
            mean when ``reduction="mean"``), in the same dtype as ``matrix``.
        num_data: number of data points seen (over all ranks).
        params, structure, kind: what was computed.
        sum_of_squares: for a Gaussian likelihood, the per-output sums of squared residuals
            ``Σ_n (f_n - y_n)²`` ``(C,)`` at the current parameters, from the same pass
            (over all ranks, :func:`~bayescurv.linalg.internal_dtype`); ``None`` for other
            likelihoods and for the structures that do not stream through the hooks
            (``"diag-hesscale"``, ``kind="hessian"``, matrix-free ``"lowrank"`` alone).
    """

    matrix: PSDOperator
    loss: Tensor
    num_data: int
    params: ParamSet
    structure: str
    kind: str
    sum_of_squares: Tensor | None = None


def check_options(
    structure: str, kind: str, num_samples: int, rank: int, lowrank_method: str,
    unknown_layers: str = "auto", factor_rank: int | None = None,
) -> None:
    """Validate the options of :func:`compute` (also called by ``Laplace`` at construction,
    so a bad option is refused before any data are read)."""
    check_factor_rank(factor_rank)
    if factor_rank is not None and structure not in KRONECKER:
        raise InvalidArgumentError(
            f"factor_rank truncates Kronecker factors, so it applies to structure in "
            f"{KRONECKER}, not {structure!r}; drop factor_rank (for a low-rank curvature of "
            "the whole net use structure='lowrank' with rank=)")
    if unknown_layers not in UNKNOWN_LAYERS:
        raise InvalidArgumentError(
            f"unknown_layers must be one of {UNKNOWN_LAYERS}, got {unknown_layers!r}")
    if structure not in STRUCTURES:
        raise InvalidArgumentError(f"unknown structure {structure!r}; use one of {STRUCTURES}")
    if kind not in ALL_KINDS:
        raise InvalidArgumentError(f"unknown curvature kind {kind!r}; use one of {ALL_KINDS}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be a positive integer, got {num_samples}")
    if structure in LOWRANK:
        if lowrank_method not in lowrank.METHODS:
            raise InvalidArgumentError(
                f"unknown lowrank_method {lowrank_method!r}; use one of {lowrank.METHODS}"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise InvalidArgumentError(f"rank must be a positive integer, got {rank!r}")
        matfree = lowrank_method != "sqrt"
        if matfree and kind == "mc":
            raise InvalidArgumentError(
                "kind='mc' has no matrix-free operator; use lowrank_method='sqrt' or kind='ggn'"
            )
        if not matfree and kind == "hessian":
            raise InvalidArgumentError(
                "the Hessian has no square root; use lowrank_method='lanczos' or 'randomized'"
            )
        if structure == "diag+lowrank" and kind == "hessian":
            raise InvalidArgumentError(
                "structure='diag+lowrank' needs a PSD curvature; use kind='ggn', 'mc' or 'ef'"
            )
    elif structure == "diag-hesscale" and kind != "ggn":
        raise InvalidArgumentError(
            "structure='diag-hesscale' backpropagates the GGN diagonal; use kind='ggn'"
        )
    elif kind == "hessian" and structure not in ("full", "diag"):
        raise InvalidArgumentError(
            f"the Hessian has no {structure!r} structure here; use structure='full' or 'diag' "
            "(small nets), structure='lowrank' with lowrank_method='lanczos', or the "
            "matrix-free CurvatureLinearOperator(kind='hessian')"
        )


def _check_params(pset: ParamSet) -> None:
    bad = [n for n, p in zip(pset.names, pset.params) if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(
            f"parameters {bad[:5]} hold NaN or Inf; the curvature at such a point is "
            "meaningless. Check the training run"
        )


def compute(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable,
    *,
    structure: str = "kfac",
    kind: str = "ggn",
    subset: ParamSet | str | Iterable[str] = "all",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    unknown_layers: str = "auto",
    rank: int = 10,
    lowrank_method: str = "sqrt",
    factor_rank: int | None = None,
    x_key: str = "x",
    y_key: str = "y",
    progress: bool = False,
    batch_dim: int = 0,
    column_chunk: int | None = None,
    output_key: OutputKey = None,
    params: ParamSet | str | Iterable[str] = UNSET,
) -> Curvature:
    r"""Curvature of :math:`L(\theta) = \sum_n -\log p(y_n | f(x_n;\theta))` at the current
    parameters.

    Args:
        model: the network; its outputs are ``(batch, outputs)``.
        likelihood: ``"classification"``, ``"regression"``, ``"binary"``, ``"poisson"`` or
            a :class:`~bayescurv.likelihoods.Likelihood`.
        data: an iterable of ``(x, y)`` batches or dicts (a DataLoader), any batch sizes;
            EKFAC and the matrix-free low-rank methods iterate it several times.
        structure: ``"full"`` (dense ``P x P``), ``"diag"`` (exact diagonal), ``"kfac"``
            (K-FAC expand), ``"kfac-reduce"``, ``"ekfac"``, ``"lowrank"`` (top-``rank``
            eigenpairs, :class:`~bayescurv.linalg.LowRank`), ``"diag+lowrank"`` (those
            plus the diagonal of the remainder, so the diagonal is exact:
            :class:`~bayescurv.linalg.LowRankPlusDiagonal`), or ``"diag-hesscale"``: an
            **approximate** GGN diagonal backpropagated Becker & LeCun / HesScale style
            (``nn.Sequential`` models only, about one backward pass; see
            :mod:`bayescurv.curvature.hesscale`).
        kind: ``"ggn"`` (exact GGN, :math:`\sum_n J_n^\top H_n J_n`), ``"mc"`` (Monte-Carlo
            GGN / Fisher with ``num_samples`` sampled targets per point), ``"ef"``
            (empirical Fisher :math:`\sum_n g_n g_n^\top`), ``"hessian"`` (full/diag, dense
            by ``torch.func``; lowrank with a matrix-free ``lowrank_method``).
        subset: which parameters (``"all"``, ``"last_layer"``, names, or a ParamSet), as
            ``Laplace(subset=...)``.
        generator: random source of ``"mc"`` and of the randomized low-rank methods.
        reduction: ``"sum"`` (the convention above) or ``"mean"`` (divide by N).
        unknown_layers: modules of a type the extractors do not know that own parameters of
            the subset (loose parameters: class tokens, position codes, layer-scale gammas,
            bias tables): ``"auto"`` (default: exact; leading-size-one parameters expanded
            over the batch, others by per-sample gradients of the owning module, checked once
            to act per data point), ``"per_sample"`` (the same, unchecked) or ``"error"``
            (refuse them, naming them); see :data:`bayescurv.curvature.engine.UNKNOWN_LAYERS`.
            In K-FAC / EKFAC they get a dense block up to
            :data:`~bayescurv.curvature.accumulate.LOOSE_DENSE_MAX` entries, their exact
            diagonal above.
        rank: number of eigenpairs of the low-rank structures.
        lowrank_method: ``"sqrt"`` (exact low-rank root from the hooks, ViViT-style; exact
            when ``N * K <= rank``), ``"lanczos"`` or ``"randomized"`` (matrix-free GGN /
            EF / Hessian products); see :mod:`bayescurv.curvature.lowrank`.
        factor_rank: ``"kfac"``, ``"kfac-reduce"``, ``"ekfac"`` only: every Kronecker factor
            with more than ``factor_rank`` rows keeps only its top-``factor_rank`` eigenpairs
            (:meth:`~bayescurv.linalg.KroneckerEigen.truncate`; EKFAC corrects the
            eigenvalues on the kept basis only). The discarded part of a factor is zero, so
            in the posterior precision ``c K + δ I`` those directions revert to the prior
            (larger variance: conservative), as in ``bayesian-lora``. Storage per factor is
            ``n r + r`` instead of ``n²``; the pass itself still accumulates the full
            factors (:func:`~bayescurv.curvature.preflight.estimate_bytes`). Diagonal
            factors (embedding row counts) and grouped convolutions are kept whole.
            docs/laplace.md ("Wide layers") measures the error it introduces.
        progress: show a progress bar.
        batch_dim: the dimension of the model's inputs that indexes data points: 0, or 1
            for sequence-first ``(T, B, ...)`` inputs (PyTorch's ``batch_first=False``).
            Hooked layers whose output has more than two dimensions hold the batch there;
            two-dimensional ones (``(B, features)``, after pooling) and convolutions and
            batch/instance/group norms are batch-first. Targets are batch-first. A layer
            whose batch dimension does not hold the ``B`` data points raises
            :class:`~bayescurv.errors.ShapeError` naming it; with a sequence length equal to
            ``B`` a wrong ``batch_dim`` cannot be detected. The hook-based structures only:
            not ``kind="hessian"`` (full/diag), ``"diag-hesscale"`` or the matrix-free
            low-rank methods.

        column_chunk: loss-Hessian square-root columns per backward pass (default: as many
            as fit in :data:`bayescurv.curvature.engine.GRAD_ELEMENTS` output-gradient
            entries), so memory does not grow with the number of outputs ``C``.

        output_key: how to read the network output when the model returns a tuple, a
            dict or a HuggingFace-style output: a key / index, or a callable ``out -> f``.
            ``subset="last_layer"`` is resolved from a forward pass on the first batch
            (:func:`bayescurv.params.find_last_layer`).
        params: deprecated name of ``subset`` (a ``FutureWarning``).

    The result is summed across ``torch.distributed`` ranks when a process group is
    initialized, so each rank holds the curvature of the whole data set.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"model must be an nn.Module, got {type(model).__name__}; wrap a function of the "
            "parameters in an nn.Module that owns them"
        )
    subset = renamed(subset, params, "subset", "params", "compute")
    check_options(structure, kind, num_samples, rank, lowrank_method, unknown_layers,
                  factor_rank)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(seed)"
        )
    batches.check_data(data)
    if batches.check_batch_dim(batch_dim) and (
        structure == "diag-hesscale" or (kind == "hessian" and structure not in LOWRANK)
        or (structure in LOWRANK and lowrank_method != "sqrt")
    ):
        raise InvalidArgumentError(
            f"batch_dim={batch_dim} needs a hook-based structure (full, diag, kfac, "
            "kfac-reduce, ekfac, or lowrank/diag+lowrank with lowrank_method='sqrt') and "
            "kind 'ggn', 'mc' or 'ef'"
        )
    batches.check_reduction(reduction)
    lik = get_likelihood(likelihood)
    layers.check_modes(model)
    if structure == "ekfac" or (structure in LOWRANK and lowrank_method != "sqrt"):
        batches.check_reiterable(data, f"structure={structure!r}")
    example = None
    if isinstance(subset, str) and subset == "last_layer":
        example, data = batches.peek_inputs(data, x_key, y_key)
    if isinstance(subset, ParamSet):
        pset = subset if output_key is None else dataclasses.replace(
            subset, output_key=check_output_key(output_key))
    else:
        pset = select(model, subset, example_input=example, output_key=output_key)
    _check_params(pset)
    preflight.check_size(pset, structure, rank, factor_rank)
    if kind == "hessian" and structure not in LOWRANK:
        return _dense_hessian(pset, lik, data, structure, reduction, x_key, y_key)
    if structure == "diag-hesscale":
        return _hesscale(pset, lik, data, reduction, x_key, y_key)
    opts = dict(kind=kind, num_samples=num_samples, generator=generator, x_key=x_key,
                y_key=y_key, progress=progress)
    accs: dict[str, object] = {}
    matfree_lowrank = structure in LOWRANK and lowrank_method != "sqrt"
    # matrix-free low rank alone needs no hooks (and accepts any layer)
    capture = None if structure == "lowrank" and matfree_lowrank else HookCapture(
        pset, structure, unknown_layers, batch_dim=batch_dim, column_chunk=column_chunk)
    if structure == "full":
        accs["full"] = accumulate.FullAccumulator(capture)
    if structure in ("diag", "diag+lowrank"):
        accs["diag"] = accumulate.DiagAccumulator(capture)
    if structure in LOWRANK and not matfree_lowrank:
        accs["lowrank"] = lowrank.LowRankAccumulator(capture, rank)
    if structure in ("kfac", "kfac-reduce", "ekfac"):
        accs["kfac"] = accumulate.KFACAccumulator(
            capture, "reduce" if structure == "kfac-reduce" else "expand"
        )
    # loss and data count, summed in float64 at least: a bf16 count of 5,000 reads 4,864
    stats = torch.zeros(2, dtype=internal_dtype(pset.dtype), device=pset.device)
    sse = None  # Gaussian residuals, summed in the same pass
    if accs:
        for res in stream(capture, lik, data, **opts):
            for acc in accs.values():
                acc.update(res.records, first=res.first)
            stats[0] += res.loss.detach()
            stats[1] += res.batch_size
            if res.residuals is not None:
                sse = res.residuals if sse is None else sse + res.residuals
    else:  # matrix-free low rank alone: one forward pass for the loss and the count
        _loss_pass(pset, lik, data, stats, x_key, y_key)
    reduced = [t for k, acc in accs.items() if k != "lowrank" for t in acc.tensors()]
    batches.all_reduce_([*reduced, stats, *([] if sse is None else [sse])])
    _check_finite(reduced)
    matrix: PSDOperator
    if structure in ("kfac", "kfac-reduce"):
        matrix = truncate_factors(accs["kfac"].finalize_blocks(capture.records), factor_rank)
    elif structure == "ekfac":
        corr = accumulate.EKFACCorrection(accs["kfac"], capture.records,
                                          factor_rank=factor_rank)
        for res in stream(capture, lik, data, **opts):
            corr.update(res.records)
        batches.all_reduce_(corr.tensors())
        matrix = corr.finalize_blocks(capture.records)
    elif structure in LOWRANK:
        if matfree_lowrank:
            from bayescurv.curvature.matfree import CurvatureLinearOperator

            op = CurvatureLinearOperator(model, lik, data, subset=pset, kind=kind,
                                         x_key=x_key, y_key=y_key, progress=progress)
            u, s = lowrank.matfree_eigen(op, min(rank, pset.numel), lowrank_method, generator)
        else:
            u, s = accs["lowrank"].finalize()
        if structure == "lowrank":
            matrix = LowRank(u, s)
        else:  # the diagonal of the remainder G - U diag(s) Uᵀ, so the diagonal is exact
            d = (accs["diag"].diag - u.square() @ s).clamp_min(0)
            matrix = LowRankPlusDiagonal(u, s, d)
    else:
        matrix = next(iter(accs.values())).finalize()
    n = int(stats[1].item())
    loss = stats[0]
    if reduction == "mean":
        matrix = matrix.scale(1.0 / n)
        loss = loss / n
    return Curvature(matrix, loss, n, pset, structure, kind, sse)


def streams(structure: str, kind: str, lowrank_method: str = "sqrt") -> bool:
    """Whether :func:`compute` streams through the hooks (then loss, count and Gaussian
    residuals come from the curvature pass itself)."""
    return not (structure == "diag-hesscale" or (kind == "hessian" and structure not in LOWRANK)
                or (structure == "lowrank" and lowrank_method != "sqrt"))


def passes(structure: str, kind: str = "ggn", lowrank_method: str = "sqrt",
           residuals: bool = False) -> int:
    """Passes over the data of :func:`compute` (``residuals``: plus the Gaussian residuals'
    sums of squares, :attr:`Curvature.sum_of_squares`): one for every hook-based
    structure (curvature, loss, data count and residuals together), two for ``"ekfac"``
    (the eigenvalue correction is a second pass), and for ``"diag-hesscale"`` and
    ``kind="hessian"`` with residuals (their own pass); the matrix-free low-rank methods
    read the data once per operator product (reported as 2: more than one)."""
    if structure == "ekfac" or (structure in LOWRANK and lowrank_method != "sqrt"):
        return 2
    return 1 + int(residuals and not streams(structure, kind, lowrank_method))


def truncate_factors(matrix: BlockDiagonal, factor_rank: int | None) -> BlockDiagonal:
    """``matrix`` with each :class:`~bayescurv.linalg.KroneckerEigen` block cut to its top
    ``factor_rank`` eigenpairs per factor (:meth:`~bayescurv.linalg.KroneckerEigen.truncate`,
    block by block: one layer's full eigenbases alive at a time); unchanged for ``None``."""
    if factor_rank is None:
        return matrix
    blocks = [b.truncate(factor_rank) if isinstance(b, KroneckerEigen) else b
              for b in matrix.blocks]
    return BlockDiagonal(blocks, matrix.indices)


def _hesscale(
    pset: ParamSet, lik: Likelihood, data: Iterable, reduction: str, x_key: str, y_key: str
) -> Curvature:
    """Approximate backpropagated diagonal (:mod:`bayescurv.curvature.hesscale`)."""
    from bayescurv.curvature.hesscale import hesscale_diagonal

    diag, loss, n = hesscale_diagonal(pset, lik, data, x_key, y_key)
    diag = diag.to(internal_dtype(pset.dtype))
    stats = torch.tensor([loss.item(), float(n)], dtype=diag.dtype, device=pset.device)
    batches.all_reduce_([diag, stats])
    _check_finite([diag])
    n = int(stats[1].item())
    matrix: PSDOperator = Diagonal(diag)
    loss = stats[0]
    if reduction == "mean":
        matrix, loss = matrix.scale(1.0 / n), loss / n
    return Curvature(matrix, loss, n, pset, "diag-hesscale", "ggn")


def _check_finite(tensors: list[Tensor]) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteError(
            "the curvature holds NaN or Inf (overflow in the network or the loss); check "
            "the inputs' scale and the parameters, or compute in float64"
        )


@torch.no_grad()
def _loss_pass(pset: ParamSet, lik: Likelihood, data: Iterable, stats: Tensor, x_key: str,
               y_key: str) -> None:
    """Accumulate the summed NLL and the number of data points into ``stats``."""
    for x, y in batches.iterate(data, device=pset.device, dtype=pset.dtype, x_key=x_key,
                                y_key=y_key):
        f = pset.forward(x)
        stats[0] += lik.nll(*lik.check(lik.check_outputs(f), y))
        stats[1] += batches.batch_size(x)


def _dense_hessian(
    pset: ParamSet, lik: Likelihood, data: Iterable, structure: str, reduction: str,
    x_key: str, y_key: str,
) -> Curvature:
    """Dense Hessian of the summed loss by ``jacrev(grad(.))`` (small nets only).

    Not ``torch.func.hessian`` (forward-over-reverse): in torch 2.13 it returns wrong cross
    terms through ``layer_norm`` with an affine weight (measured: off by 4.7 on a 20-parameter
    ``layer_norm(x W^T) * w`` example, not symmetric; ``jacrev(grad)`` equals central finite
    differences of the gradient to 1e-10). ``tests/test_curvature.py`` pins this.
    """
    theta = pset.vector()
    dt = internal_dtype(pset.dtype)
    total = torch.zeros(pset.numel, pset.numel, dtype=dt, device=pset.device)
    loss = torch.zeros((), dtype=dt, device=pset.device)
    n = 0
    for x, y in batches.iterate(data, device=pset.device, dtype=pset.dtype, x_key=x_key,
                                y_key=y_key):
        def batch_loss(v, x=x, y=y):
            f = pset.functional_call(v, **x) if isinstance(x, dict) else pset.functional_call(v, x)
            return lik.nll(*lik.check(f, y))

        total += torch.func.jacrev(torch.func.grad(batch_loss))(theta).to(dt)
        loss += batch_loss(theta).detach()
        n += batches.batch_size(x)
    stats = torch.tensor([float(n)], dtype=dt, device=pset.device)
    batches.all_reduce_([total, loss, stats])
    n = int(stats.item())
    total = 0.5 * (total + total.T)
    # the Hessian need not be PSD: keep it dense/diagonal as it is (no clamping; inverse
    # quantities of an indefinite posterior precision raise NumericalError)
    matrix: PSDOperator = Dense(total) if structure == "full" else Diagonal(torch.diagonal(total))
    if reduction == "mean":
        matrix, loss = matrix.scale(1.0 / n), loss / n
    return Curvature(matrix, loss, n, pset, structure, "hessian")
