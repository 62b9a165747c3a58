"""Pre-flight size check: refuse a curvature structure whose storage cannot fit before any
data is touched, naming the size and cheaper structures (a dense ``P x P`` GGN of a 1000-class
head over 512 features is 2 TB)."""

from __future__ import annotations

import os

import torch
from torch import nn

from bayescurv.curvature import layers
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


def _kfac_entries(pset: ParamSet) -> int:
    """Entries of the K-FAC factors: ``O² + I²`` per linear-like weight
    (:func:`~bayescurv.curvature.layers.linear_layout`; ``I`` with the bias column), exactly
    ``G (O_g² + I_g²)`` for a grouped convolution (one pair per group); the diagonal row
    counts plus ``D²`` for an embedding; other tensors a dense block."""
    total = 0
    for _, module, owned in pset.modules():
        names = dict(owned)
        if isinstance(module, nn.Embedding):  # diagonal row-count factor and D x D
            total += module.num_embeddings + module.embedding_dim**2
            continue
        if isinstance(module, nn.MultiheadAttention):  # in_proj: (3D, D + 1) factors
            names = {"weight": 0, **({"bias": 1} if "in_proj_bias" in names else {})}
            lay = layers.LinearLayout(3 * module.embed_dim, module.embed_dim)
        else:
            lay = layers.linear_layout(module)
        if "weight" in names and lay is not None:
            o, i = lay.out_per_group, lay.inp + ("bias" in names)
            total += lay.groups * (o * o + i * i)
            continue
        p = sum(pset.params[j].numel() for j in names.values())
        total += p * p
    return total


def check_size(pset: ParamSet, structure: str, rank: int = 10) -> None:
    """Raise :class:`InvalidArgumentError` when the stored curvature of ``structure`` over
    ``pset`` needs more than :data:`FRACTION` of the available memory. Sizes in the internal
    dtype (float64 for float32 models). ``BAYESCURV_SKIP_PREFLIGHT=1`` disables the check."""
    if os.environ.get("BAYESCURV_SKIP_PREFLIGHT"):
        return
    itemsize = torch.empty((), dtype=internal_dtype(pset.dtype)).element_size()
    p = pset.numel
    entries = {
        "full": p * p,
        "diag": p,
        "lowrank": p * (rank + 1),
        "diag+lowrank": p * (rank + 2),
    }
    kfac = None
    if structure in ("kfac", "kfac-reduce", "ekfac"):
        kfac = _kfac_entries(pset) + (p if structure == "ekfac" else 0)
    need = (kfac if kfac is not None else entries.get(structure, p)) * itemsize
    free = available_bytes(pset.device)
    if free is None or need <= FRACTION * free:
        return
    options = [f"'diag' ({_human(p * itemsize)})"]
    if structure == "full":
        options.insert(0, f"'kfac' ({_human(_kfac_entries(pset) * itemsize)})")
    raise InvalidArgumentError(
        f"structure={structure!r} over {p:,} parameters needs {_human(need)} "
        f"({pset.dtype} model, stored in {internal_dtype(pset.dtype)}), more than "
        f"{FRACTION:.0%} of the {_human(free)} available on {pset.device}. Use "
        f"structure={' or '.join(options)}, or a smaller subset (subset='last_layer' or names)"
    )
