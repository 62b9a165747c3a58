"""Pre-flight size check: refuse a curvature structure whose storage cannot fit before any
data is touched, naming the size and cheaper structures (a dense ``P x P`` GGN of a 1000-class
head over 512 features is 2 TB)."""

from __future__ import annotations

import os

import torch
from torch import nn

from bayescurv.curvature import layers
from bayescurv.curvature.accumulate import LOOSE_DENSE_MAX
from bayescurv.errors import InvalidArgumentError
from bayescurv.linalg.base import internal_dtype
from bayescurv.params import ParamSet

#: the largest fraction of the available memory one curvature may take
FRACTION = 0.8


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or ``MemAvailable`` of
    ``/proc/meminfo`` (Linux); ``None`` when unknown (then nothing is refused)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"


def _factor_entries(n: int, factor_rank: int | None) -> int:
    """Stored entries of one ``n x n`` Kronecker factor: ``n²``, or ``n r + r`` (basis and
    eigenvalues) once truncated to ``r = factor_rank < n`` eigenpairs."""
    if factor_rank is None or n <= factor_rank:
        return n * n
    return n * factor_rank + factor_rank


def _kfac_entries(pset: ParamSet, factor_rank: int | None = None) -> int:
    """Entries of the K-FAC factors: ``O² + I²`` per linear-like weight
    (:func:`~bayescurv.curvature.layers.linear_layout`; ``I`` with the bias column), exactly
    ``G (O_g² + I_g²)`` for a grouped convolution (one pair per group); the diagonal row
    counts plus ``D²`` for an embedding; other tensors a dense block. With ``factor_rank``
    each ungrouped factor counts :func:`_factor_entries` (grouped ones are kept whole)."""
    f = _factor_entries
    total = 0
    for _, module, owned in pset.modules():
        names = dict(owned)
        if isinstance(module, nn.Embedding):  # diagonal row-count factor and D x D
            total += module.num_embeddings + f(module.embedding_dim, factor_rank)
            continue
        if isinstance(module, nn.MultiheadAttention):  # in_proj: (3D, D + 1) factors
            names = {"weight": 0, **({"bias": 1} if "in_proj_bias" in names else {})}
            lay = layers.LinearLayout(3 * module.embed_dim, module.embed_dim)
        else:
            lay = layers.linear_layout(module)
        if "weight" in names and lay is not None:
            o, i = lay.out_per_group, lay.inp + ("bias" in names)
            r = factor_rank if lay.groups == 1 else None
            total += lay.groups * (f(o, r) + f(i, r))
            continue
        p = sum(pset.params[j].numel() for j in names.values())
        total += p * p if p <= LOOSE_DENSE_MAX else p  # dense block, or its diagonal
    return total


KRONECKER = ("kfac", "kfac-reduce", "ekfac")


def estimate_bytes(pset: ParamSet, structure: str, rank: int = 10,
                   factor_rank: int | None = None, *, peak: bool = False) -> int:
    """Bytes of the curvature of ``structure`` over ``pset`` as stored once computed, in the
    internal dtype (float64 for float32 models), before any data is read: ``P²`` entries for
    ``"full"``, ``P`` for ``"diag"``, ``P (rank + 1)`` / ``P (rank + 2)`` for the low-rank
    structures, the Kronecker factors (:func:`_kfac_entries`; each truncated factor
    ``n min(n, r) + r`` with ``r = factor_rank``) for K-FAC, plus ``P`` eigenvalues for
    EKFAC.

    ``peak=True``: the most the pass itself holds at once instead. It accumulates every
    layer's full factors before any truncation, so for K-FAC/EKFAC ``factor_rank`` does not
    lower it (the stored posterior shrinks, the pass does not).
    """
    itemsize = torch.empty((), dtype=internal_dtype(pset.dtype)).element_size()
    p = pset.numel
    if structure in KRONECKER:
        entries = _kfac_entries(pset, None if peak else factor_rank)
        entries += p if structure == "ekfac" else 0
    else:
        entries = {"full": p * p, "diag": p, "lowrank": p * (rank + 1),
                   "diag+lowrank": p * (rank + 2)}.get(structure, p)
    return entries * itemsize


def check_size(pset: ParamSet, structure: str, rank: int = 10,
               factor_rank: int | None = None) -> None:
    """Raise :class:`InvalidArgumentError` when computing the curvature of ``structure`` over
    ``pset`` needs more than :data:`FRACTION` of the available memory: the larger of the
    stored size and the pass's peak (:func:`estimate_bytes`). When K-FAC factors dominate,
    the message gives the size ``factor_rank=`` would store.
    ``BAYESCURV_SKIP_PREFLIGHT=1`` disables the check."""
    if os.environ.get("BAYESCURV_SKIP_PREFLIGHT"):
        return
    itemsize = torch.empty((), dtype=internal_dtype(pset.dtype)).element_size()
    p = pset.numel
    need = max(estimate_bytes(pset, structure, rank, factor_rank),
               estimate_bytes(pset, structure, rank, factor_rank, peak=True))
    free = available_bytes(pset.device)
    if free is None or need <= FRACTION * free:
        return
    options = [f"'diag' ({_human(p * itemsize)})"]
    if structure == "full":
        options.insert(0, f"'kfac' ({_human(_kfac_entries(pset) * itemsize)})")
    hint = ""
    factors = _kfac_entries(pset) * itemsize
    if structure in KRONECKER or (structure == "full" and factors > FRACTION * free):
        r = factor_rank or 128
        small = estimate_bytes(pset, structure if structure in KRONECKER else "kfac", rank, r)
        hint = (f" The K-FAC factors take {_human(factors)}: factor_rank={r} would store "
                f"{_human(small)}, but the pass accumulates the full factors before "
                "truncating them, so this limit also needs fewer or narrower layers in the "
                "subset.")
    raise InvalidArgumentError(
        f"structure={structure!r} over {p:,} parameters needs {_human(need)} "
        f"({pset.dtype} model, stored in {internal_dtype(pset.dtype)}), more than "
        f"{FRACTION:.0%} of the {_human(free)} available on {pset.device}. Use "
        f"structure={' or '.join(options)}, or a smaller subset (subset='last_layer' or "
        f"names).{hint}"
    )
