r"""Subnetwork posteriors given by boolean masks over parameter tensors.

``subset={"fc.weight": mask, ...}`` puts only the entries where ``mask`` is True into the
posterior; every other parameter stays at its trained value (zero posterior variance). The
curvature is the exact GGN restricted to those entries: for ``structure="full"`` it is
accumulated from the per-sample gradients of the masked columns only,
:math:`\sum_{b,k} v_{bk}[m] v_{bk}[m]^\top`, so memory scales with the subnetwork size
``S`` (``S x S``), and hooks sit only on the modules that own masked parameters.
Masks cut through Kronecker structure, so ``"full"`` and ``"diag"`` are the structures
offered.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import Curvature, compute
from bayescurv.curvature.accumulate import per_sample_matrix
from bayescurv.curvature.engine import HookCapture, stream
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Likelihood
from bayescurv.linalg import Dense, Diagonal, internal_dtype
from bayescurv.params import ParamSet, select

MASK_STRUCTURES = ("full", "diag")


def is_mask_subset(subset) -> bool:
    return isinstance(subset, dict)


def parse_masks(model: nn.Module, masks: dict[str, Tensor]) -> tuple[ParamSet, Tensor]:
    """The ParamSet of the masked tensors and the flat positions (within it) of the
    selected entries."""
    named = dict(model.named_parameters())
    if not masks:
        raise InvalidArgumentError("the subnetwork mask dict is empty")
    for name, m in masks.items():
        if name not in named:
            raise InvalidArgumentError(f"mask for unknown parameter {name!r}")
        if not torch.is_tensor(m) or m.dtype != torch.bool:
            raise InvalidArgumentError(f"mask for {name!r} must be a bool tensor")
        if m.shape != named[name].shape:
            raise ShapeError(f"mask for {name!r} has shape {tuple(m.shape)}, the parameter "
                             f"{tuple(named[name].shape)}")
        if not named[name].requires_grad:
            raise InvalidArgumentError(f"parameter {name!r} is frozen (requires_grad=False)")
    names = [n for n in named if n in masks and bool(masks[n].any())]
    if not names:
        raise InvalidArgumentError("the subnetwork masks select no parameter entry")
    pset = select(model, names)
    flat = torch.cat([masks[n].reshape(-1) for n in pset.names]).to(pset.device)
    return pset, flat.nonzero().squeeze(-1)


def masked_curvature(
    pset: ParamSet,
    index: Tensor,
    likelihood: Likelihood,
    data: Iterable,
    structure: str,
    **options,
) -> Curvature:
    """Exact GGN (or ``kind``) of the masked entries, dense or diagonal."""
    if structure not in MASK_STRUCTURES:
        raise InvalidArgumentError(
            f"a masked subnetwork has no {structure!r} structure (masks cut through Kronecker "
            f"factors); use one of {MASK_STRUCTURES}"
        )
    if structure == "diag":
        curv = compute(pset.model, likelihood, data, structure="diag", subset=pset, **options)
        curv.matrix = Diagonal(curv.matrix.diagonal()[index])
        return curv
    unknown = options.pop("unknown_layers", "auto")
    capture = HookCapture(pset, "full", unknown)
    s = index.numel()
    dt = internal_dtype(pset.dtype)  # float64 sums for float32/bf16/fp16 models
    gram = torch.zeros(s, s, dtype=dt, device=pset.device)
    stats = torch.zeros(2, dtype=dt, device=pset.device)
    for res in stream(capture, likelihood, data, **options):
        v = per_sample_matrix(res.records, pset, dt)[:, index]
        gram.addmm_(v.T, v)
        stats[0] += res.loss.detach()
        stats[1] += res.batch_size
    batches.all_reduce_([gram, stats])
    return Curvature(Dense(0.5 * (gram + gram.T)), stats[0], int(stats[1].item()), pset,
                     structure, options.get("kind", "ggn"))
