"""Iterating over data: ``(x, y)`` pairs or dicts, any batch sizes, validated.

Loss convention used throughout bayescurv: curvatures and log-likelihoods are **sums over
data points** (the negative log-likelihood of the whole data set). A loss averaged over a
data set of N points has curvature equal to ours divided by N; functions that accept
``reduction="mean"`` do exactly that division.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayescurv.errors import EmptyDataError, InvalidArgumentError, NonFiniteError, ShapeError

REDUCTIONS = ("sum", "mean")


def split_batch(
    batch: Any, x_key: str = "x", y_key: str = "y"
) -> tuple[Tensor | dict[str, Tensor], Tensor]:
    """Return ``(inputs, targets)`` of one batch.

    A batch is a ``(x, y)`` pair / list, or a dict; for a dict the targets are
    ``batch[y_key]`` and the inputs ``batch[x_key]`` when present, else every other
    entry as a dict of keyword inputs for the model.
    """
    if isinstance(batch, dict):
        if y_key not in batch:
            raise InvalidArgumentError(
                f"dict batch has no target key {y_key!r} (keys: {sorted(batch)}); "
                "pass y_key= to name it"
            )
        if x_key in batch:
            return batch[x_key], batch[y_key]
        return {k: v for k, v in batch.items() if k != y_key}, batch[y_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    hint = ""
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        hint = (". The data are read batch by batch: pass a DataLoader or a list of (x, y) "
                "pairs, e.g. [(x, y)], not a single (x, y) pair")
    raise InvalidArgumentError(
        "each batch must be a (inputs, targets) pair or a dict with a targets key; "
        f"got {type(batch).__name__}{hint}"
    )


def check_data(data: Any) -> None:
    """Refuse what cannot be a collection of batches (``None``, a number, a tensor) before
    any work, naming what to pass instead."""
    if isinstance(data, (Tensor, np.ndarray)):
        raise InvalidArgumentError(
            "expected an iterable of (x, y) batches such as a DataLoader, got a "
            f"{type(data).__name__}; wrap it as DataLoader(TensorDataset(x, y), batch_size=...)"
            " or pass [(x, y)]"
        )
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise InvalidArgumentError(
            "expected an iterable of (x, y) batches such as a DataLoader or a list of (x, y) "
            f"pairs, got {type(data).__name__}"
        )


def _check_types(x: Any, y: Any) -> None:
    """Inputs must be tensors (or a dict of them), targets a tensor, after numpy conversion."""
    values = x.values() if isinstance(x, dict) else [x]
    bad = [type(v).__name__ for v in values if not torch.is_tensor(v)]
    if bad:
        raise InvalidArgumentError(
            f"batch inputs must be a tensor or numpy array (or a dict of them), got {bad[0]}; "
            "convert them with torch.as_tensor (or let a DataLoader collate them)"
        )
    if not torch.is_tensor(y):
        raise InvalidArgumentError(
            f"batch targets must be a tensor or numpy array, got {type(y).__name__}; convert "
            "them with torch.as_tensor (or let a DataLoader collate them)"
        )


def as_tensor(x: Any) -> Any:
    """numpy arrays (also as dict values) become tensors (sharing memory); anything else is
    returned as it is."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: as_tensor(v) for k, v in x.items()}
    return x


def is_one_shot(data: Any) -> bool:
    """Whether ``data`` is an iterator (a generator, ``iter(loader)``): iterating it a second
    time yields nothing."""
    return isinstance(data, Iterator)


def check_reiterable(data: Any, why: str) -> None:
    """Refuse a one-shot iterator where the data are read more than once, before any work."""
    if is_one_shot(data):
        raise InvalidArgumentError(
            f"{why} reads the data more than once, but a one-shot iterator "
            f"({type(data).__name__}) was given; pass a re-iterable loader (a DataLoader, or "
            "a list of batches)"
        )


def peek_inputs(data: Iterable, x_key: str = "x", y_key: str = "y") -> tuple[Any, Iterable]:
    """The inputs of the first batch of ``data`` and an iterable that still yields every
    batch (for a one-shot iterator the peeked batch is chained back in front)."""
    check_data(data)
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise EmptyDataError("the data loader yielded no data; nothing to fit") from None
    x, y = (as_tensor(t) for t in split_batch(first, x_key, y_key))
    _check_types(x, y)
    if is_one_shot(data):
        data = itertools.chain([first], it)
    return x, data


def check_batch_dim(batch_dim: Any) -> int:
    """Validate a ``batch_dim`` argument: a non-negative int (the dimension of the model's
    inputs that indexes data points; negative values are refused because the layers of one
    network see tensors of different ranks)."""
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise InvalidArgumentError(
            f"batch_dim must be a non-negative int (0 for batch-first inputs, 1 for "
            f"sequence-first (T, B, ...) inputs), got {batch_dim!r}"
        )
    return batch_dim


def batch_size(x: Tensor | dict[str, Tensor], batch_dim: int = 0) -> int:
    """Number of data points in inputs ``x`` (a tensor or a dict of tensors; for a dict, its
    first entry): the size of dimension ``batch_dim``."""
    t = next(iter(x.values())) if isinstance(x, dict) else x
    if t.dim() <= batch_dim:
        raise ShapeError(
            f"inputs of shape {tuple(t.shape)} have no dimension batch_dim={batch_dim}; pass "
            "the dimension of the inputs that indexes data points"
        )
    return t.shape[batch_dim]


def split_inputs(x: Tensor | dict[str, Tensor], size: int,
                 batch_dim: int = 0) -> list[Tensor | dict[str, Tensor]]:
    """Inputs ``x`` cut into consecutive chunks of at most ``size`` data points along
    ``batch_dim`` (views, no copies; one chunk, ``x`` itself, when it holds at most ``size``).
    For a dict every entry whose dimension ``batch_dim`` has the batch size
    (:func:`batch_size`) is cut; other entries (broadcast ones, e.g. a shared ``(1, T)``
    ``position_ids``) go whole into every chunk."""
    n = batch_size(x, batch_dim)
    if n <= size:
        return [x]
    if not isinstance(x, dict):
        return list(x.split(size, dim=batch_dim))
    starts = range(0, n, size)

    def cut(v: Tensor, s: int) -> Tensor:
        batched = torch.is_tensor(v) and v.dim() > batch_dim and v.shape[batch_dim] == n
        return v.narrow(batch_dim, s, min(size, n - s)) if batched else v

    return [{k: cut(v, s) for k, v in x.items()} for s in starts]


def to_device(x: Tensor | dict[str, Tensor], device: torch.device, dtype: torch.dtype | None):
    """Move inputs to the model's device; floating inputs also take the model's dtype."""

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if isinstance(x, dict):
        return {k: move(v) for k, v in x.items()}
    return move(x)


def check_finite(t: Tensor | dict[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` when a floating tensor holds NaN or Inf."""
    tensors = t.values() if isinstance(t, dict) else [t]
    for v in tensors:
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise NonFiniteError(
                f"{what} contain NaN or Inf; clean or impute the data before fitting"
            )


def iterate(
    data: Iterable[Any],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    x_key: str = "x",
    y_key: str = "y",
    check: bool = True,
    batch_dim: int = 0,
) -> Iterator[tuple[Tensor | dict[str, Tensor], Tensor]]:
    """Yield validated ``(x, y)`` batches on ``device``; raise :class:`EmptyDataError` when
    ``data`` yields nothing (or only empty batches). ``batch_dim``: the dimension of the
    inputs that indexes data points (targets are always batch-first)."""
    check_data(data)
    seen = False
    for batch in data:
        x, y = (as_tensor(t) for t in split_batch(batch, x_key, y_key))
        _check_types(x, y)
        n = batch_size(x, batch_dim)
        if n == 0:
            continue
        if y.dim() == 0 or y.shape[0] != n:
            shape = tuple(next(iter(x.values())).shape if isinstance(x, dict) else x.shape)
            raise ShapeError(
                f"a batch has {n} inputs (dim batch_dim={batch_dim} of inputs of shape "
                f"{shape}) but targets of shape {tuple(y.shape)}; targets are batch-first. "
                "For sequence-first (T, B, ...) inputs pass batch_dim=1"
            )
        if check:
            check_finite(x, "inputs")
            check_finite(y, "targets")
        if device is not None:
            x = to_device(x, device, dtype)
            y = y.to(device=device)
        seen = True
        yield x, y
    if not seen:
        raise EmptyDataError("the data loader yielded no data; nothing to fit")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InvalidArgumentError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")


def all_reduce_(tensors: list[Tensor]) -> None:
    """Sum tensors in place across ``torch.distributed`` ranks when a process group is
    initialized (so each rank holds the sum over the whole data set); no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


__all__ = [
    "iterate",
    "check_data",
    "as_tensor",
    "is_one_shot",
    "check_reiterable",
    "peek_inputs",
    "split_batch",
    "batch_size",
    "split_inputs",
    "check_batch_dim",
    "to_device",
    "check_finite",
    "check_reduction",
    "all_reduce_",
    "REDUCTIONS",
]


def is_batch_iterable(x: Any) -> bool:
    """Whether ``x`` is a loader / iterable of batches rather than one batch (a tensor, an
    array or a dict of tensors)."""
    return not isinstance(x, (Tensor, np.ndarray, dict, str, bytes)) and hasattr(x, "__iter__")


def inputs_of(batch: Any, x_key: str = "x", y_key: str = "y") -> Any:
    """The inputs of one batch of a prediction loader: a tensor / array, an ``(x, y)`` or
    ``(x,)`` tuple, or a dict (``batch[x_key]`` when present, else every entry but
    ``y_key`` as keyword inputs)."""
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        batch = batch[0]
    elif isinstance(batch, dict):
        batch = batch[x_key] if x_key in batch else {
            k: v for k, v in batch.items() if k != y_key}
    elif not isinstance(batch, (Tensor, np.ndarray)):
        raise InvalidArgumentError(
            "each batch must be inputs, an (inputs, targets) pair, an (inputs,) tuple or a "
            f"dict; got {type(batch).__name__}")
    return as_tensor(batch)
