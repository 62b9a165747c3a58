"""State dicts of the structured operators: plain tensors, strings and lists, so that they
save with ``torch.save`` and load with ``torch.load(..., weights_only=True)``.

Only unmodified operators are serialized (no pending ``scale`` / ``add_diagonal``): the
posteriors store their curvature this way and rebuild the prior-shifted operators.
Eigendecompositions are stored with the operator, so a loaded one needs none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError
from bayescurv.linalg.base import PSDOperator
from bayescurv.linalg.block import BlockDiagonal
from bayescurv.linalg.dense import Dense
from bayescurv.linalg.diagonal import Diagonal
from bayescurv.linalg.kronecker import KroneckerEigen
from bayescurv.linalg.kronecker_batch import KroneckerBatch
from bayescurv.linalg.lowrank import LowRank, LowRankPlusDiagonal


def _check_plain(op: PSDOperator) -> None:
    if op.modifications:
        raise InvalidArgumentError(
            f"{type(op).__name__} has pending scale/add_diagonal modifications; serialize the "
            "base operator"
        )


def to_state(op: PSDOperator) -> dict[str, Any]:
    """A ``weights_only``-loadable description of ``op``."""
    _check_plain(op)
    if isinstance(op, Diagonal):
        return {"type": "diagonal", "d": op.diagonal()}
    if isinstance(op, Dense):
        return {"type": "dense", "matrix": op.base, "eigenvalues": op.eigenvalues(),
                "eigenvectors": op.eigenvectors()}
    if isinstance(op, KroneckerEigen):
        # a diagonal factor's identity basis is stored as None
        qa, qb = op.eigenbases
        state = {"type": "kronecker", "QA": qa, "QB": qb, "eigenvalues": op.base_eigenvalues}
        if op.factor_eigenvalues is not None:
            state["factor_eigenvalues"] = list(op.factor_eigenvalues)
        return state
    if isinstance(op, KroneckerBatch):  # a grouped convolution: one block per group
        qa, qb = op.eigenbases
        state = {"type": "kronecker-batch", "QA": qa, "QB": qb,
                 "eigenvalues": op.base_eigenvalues}
        if op.factor_eigenvalues is not None:
            state["factor_eigenvalues"] = list(op.factor_eigenvalues)
        return state
    if isinstance(op, LowRank):
        return {"type": "lowrank", "U": op.U, "s": op.s}
    if isinstance(op, LowRankPlusDiagonal):
        return {"type": "lowrank+diag", "U": op.U, "s": op.s, "d": op.d}
    if isinstance(op, BlockDiagonal):
        return {"type": "block", "blocks": [to_state(b) for b in op.blocks],
                "indices": op.indices}
    raise InvalidArgumentError(f"cannot serialize {type(op).__name__}")


def from_state(state: dict[str, Any], device: torch.device | str | None = None) -> PSDOperator:
    """Rebuild an operator from :func:`to_state`, optionally on another ``device``."""

    def t(x: Tensor | None) -> Tensor | None:
        return x.to(device) if device is not None and x is not None else x

    kind = state.get("type")
    if kind == "diagonal":
        return Diagonal(t(state["d"]))
    if kind == "dense":
        return Dense.from_eigendecomposition(t(state["matrix"]), t(state["eigenvalues"]),
                                             t(state["eigenvectors"]))
    if kind == "kronecker":
        factor_eigs = state.get("factor_eigenvalues")
        return KroneckerEigen(t(state["QA"]), t(state["QB"]), t(state["eigenvalues"]),
                              None if factor_eigs is None else tuple(t(e) for e in factor_eigs))
    if kind == "kronecker-batch":
        factor_eigs = state.get("factor_eigenvalues")
        return KroneckerBatch(t(state["QA"]), t(state["QB"]), t(state["eigenvalues"]),
                              None if factor_eigs is None else tuple(t(e) for e in factor_eigs))
    if kind == "lowrank":
        return LowRank(t(state["U"]), t(state["s"]))
    if kind == "lowrank+diag":
        return LowRankPlusDiagonal(t(state["U"]), t(state["s"]), t(state["d"]))
    if kind == "block":
        return BlockDiagonal([from_state(b, device) for b in state["blocks"]],
                             [t(i) for i in state["indices"]])
    raise InvalidArgumentError(f"unknown operator state type {kind!r}")


__all__ = ["to_state", "from_state"]
