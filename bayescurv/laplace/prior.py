r"""Prior precision algebra: the prior :math:`N(0, diag(\delta)^{-1})` of a Laplace posterior.

:math:`\delta` is a scalar, one value per *layer* (module owning posterior parameters: weight
and bias share it), one per parameter *tensor* (weights and biases apart; laplace-torch's
"layerwise") or one per parameter. A prior of ``G`` values is expanded to the ``P`` entries by
a *group index* ``(P,)`` (:func:`layer_index` or :func:`tensor_index`). The posterior
precision :math:`\Lambda = c H + diag(\delta)` is rebuilt cheaply for every candidate
:math:`(\delta, c)`: the structured operators keep their eigendecompositions, so a log
determinant costs ``O(P)`` for diagonal, Kronecker (per-layer :math:`\delta`) and dense
(scalar :math:`\delta`) curvature (:func:`add_prior`).

Pure functions of tensors, parameter sets and operators: the tuning loops that use them live
in :mod:`bayescurv.laplace.marglik`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError
from bayescurv.linalg import BlockDiagonal, PSDOperator
from bayescurv.params import ParamSet

GRANULARITIES = ("scalar", "layer", "tensor", "parameter")


def layer_index(params: ParamSet) -> Tensor:
    """``(P,)`` index of the layer (module, in :meth:`ParamSet.modules` order) of every
    entry of the flat parameter vector; a tied parameter belongs to its first module."""
    idx = torch.full((params.numel,), -1, dtype=torch.long)
    for layer, (_, _, owned) in enumerate(params.modules()):
        for _, i in owned:
            sl = params.slice_of(i)
            if idx[sl.start] < 0:
                idx[sl] = layer
    return idx.to(params.device)


def tensor_index(params: ParamSet) -> Tensor:
    """``(P,)`` index of the parameter tensor (in :class:`ParamSet` order) of every entry of
    the flat parameter vector."""
    counts = torch.tensor([p.numel() for p in params.params])
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(params.device)


def group_index(prior: Tensor, layers: Tensor, tensors: Tensor) -> Tensor:
    """The group index that expands ``prior`` to the ``P`` entries: per layer when it has one
    value per layer (also when that count equals the number of tensors: then every layer
    holds one tensor and both groupings coincide up to order), per tensor when it has one
    value per tensor; ``layers`` otherwise (scalar and per-parameter priors ignore it)."""
    num_layers = int(layers.max()) + 1 if layers.numel() else 0
    num_tensors = int(tensors.max()) + 1 if tensors.numel() else 0
    if prior.dim() == 1 and prior.numel() == num_tensors and prior.numel() != num_layers:
        return tensors
    return layers


def check_prior(
    value, num_params: int, num_layers: int, dtype, device, allow_grad: bool = False,
    num_tensors: int | None = None,
) -> Tensor:
    """Validate a prior precision: positive, finite, shape ``()``, ``(num_layers,)``,
    ``(num_tensors,)`` or ``(num_params,)``."""
    if isinstance(value, (str, bytes, bool)) or not (
            torch.is_tensor(value) or isinstance(value, (int, float, list, tuple))
            or hasattr(value, "__array__")):
        raise InvalidArgumentError(
            f"prior_precision must be a number or a tensor, got {type(value).__name__} "
            f"{value!r}")
    t = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=dtype)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise InvalidArgumentError(f"prior_precision must be real numbers, got {t.dtype}")
    t = t.to(dtype=dtype, device=device)
    if not allow_grad:
        t = t.detach()
    if t.dim() == 1 and t.numel() == 1:
        t = t.reshape(())
    sizes = (num_layers, num_params) if num_tensors is None else (
        num_layers, num_tensors, num_params)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in sizes):
        per_tensor = "" if num_tensors is None else f", one per tensor ({num_tensors})"
        raise ShapeError(
            f"prior_precision must be a scalar, one value per layer ({num_layers}){per_tensor} "
            f"or one per parameter ({num_params}); got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise NonFiniteError("prior_precision contains NaN or Inf")
    if (t <= 0).any():
        raise InvalidArgumentError("prior_precision must be positive")
    return t


def _is_per_parameter(prior: Tensor, index: Tensor) -> bool:
    return prior.numel() == index.numel() and prior.numel() != int(index.max()) + 1


def expand_prior(prior: Tensor, index: Tensor) -> Tensor:
    """Prior precision as a ``(P,)`` vector. Per-layer values are repeated segment-wise when
    the layers are contiguous in the flat order (the usual case), whose backward is a
    segment sum; a gather's backward scatters P values into a few slots, far slower."""
    if prior.dim() == 0:
        return prior.expand(index.numel())
    if _is_per_parameter(prior, index):
        return prior
    if bool((index[1:] >= index[:-1]).all()):
        counts = torch.bincount(index, minlength=prior.numel())
        return torch.repeat_interleave(prior, counts, output_size=index.numel())
    return prior[index]


def log_prior(prior: Tensor, theta: Tensor, index: Tensor) -> Tensor:
    r""":math:`\log N(\theta; 0, diag(\delta)^{-1}) + \tfrac{P}{2}\log 2\pi
    = -\tfrac12 \theta^\top diag(\delta)\theta + \tfrac12 \log\det diag(\delta)`,
    computed per layer for scalar and per-layer priors (no length-``P`` vector in the graph,
    so one evidence step costs ``O(L)`` here)."""
    sq = theta.detach() ** 2
    if prior.dim() == 0:
        return -0.5 * prior * sq.sum() + 0.5 * theta.numel() * torch.log(prior)
    if _is_per_parameter(prior, index):
        return -0.5 * (prior * sq).sum() + 0.5 * torch.log(prior).sum()
    per_layer = torch.zeros(prior.numel(), dtype=sq.dtype, device=sq.device).index_add_(
        0, index, sq)
    counts = torch.bincount(index, minlength=prior.numel()).to(sq.dtype)
    return -0.5 * (prior * per_layer).sum() + 0.5 * (counts * torch.log(prior)).sum()


def add_prior(h: PSDOperator, prior: Tensor, index: Tensor, num_layers: int) -> PSDOperator:
    """:math:`H + diag(\\delta)`, keeping Kronecker blocks exact for per-layer priors."""
    if prior.dim() == 0:
        return h.add_diagonal(prior)
    per_layer = prior.numel() == num_layers and not (
        prior.numel() == index.numel() and num_layers != index.numel()
    )
    if per_layer and num_layers == 1:  # one layer: a scalar shift keeps Dense's eigenbasis
        return h.add_diagonal(prior.reshape(()))
    if per_layer and isinstance(h, BlockDiagonal) and h.num_blocks == num_layers:
        return h.add_diagonal_per_block(prior)
    return h.add_diagonal(expand_prior(prior, index))


__all__ = ["GRANULARITIES", "layer_index", "tensor_index", "group_index", "check_prior",
           "expand_prior", "log_prior", "add_prior"]
