"""Block-diagonal PSD matrix with heterogeneous blocks on arbitrary index sets.

Block ``i`` acts on the entries ``indices[i]`` of the full vector; the index sets partition
``range(n)``. With ``P`` the permutation ``v ↦ v[cat(indices)]``,
``A = Pᵀ blockdiag(A_1, ..., A_B) P``, so every operation is the blockwise one, and
``log det A = Σ log det A_i``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from linear_operator import LinearOperator
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.linalg.base import PSDOperator, Scalar, finish
from bayescurv.linalg.diagonal import Diagonal

__all__ = ["BlockDiagonal"]


class BlockDiagonal(PSDOperator):
    """``A = Pᵀ blockdiag(blocks) P``; ``indices=None`` means consecutive contiguous blocks."""

    def __init__(
        self, blocks: Sequence[PSDOperator], indices: Sequence[Tensor] | None = None
    ) -> None:
        blocks = tuple(blocks)
        if not blocks:
            raise InvalidArgumentError("BlockDiagonal needs at least one block.")
        for b in blocks:
            if not isinstance(b, PSDOperator):
                raise InvalidArgumentError(
                    f"BlockDiagonal blocks must be PSDOperators, got {type(b).__name__}."
                )
            if b.dtype != blocks[0].dtype or b.device != blocks[0].device:
                raise InvalidArgumentError(
                    "All BlockDiagonal blocks must share dtype and device, got "
                    f"{blocks[0].dtype}/{blocks[0].device} and {b.dtype}/{b.device}."
                )
        self._blocks = blocks
        self._sizes = [b.size for b in blocks]
        self._perm, self._inv = self._check_indices(indices)
        self._block_mods: tuple[tuple[str, object], ...] = ()
        self._eff: tuple[PSDOperator, ...] | None = None

    def _check_indices(
        self, indices: Sequence[Tensor] | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validate that ``indices`` partition ``range(n)``; ``(None, None)`` when contiguous."""
        if indices is None:
            return None, None
        indices = list(indices)
        if len(indices) != len(self._blocks):
            raise ShapeError(f"Got {len(self._blocks)} blocks but {len(indices)} index sets.")
        for i, (idx, size) in enumerate(zip(indices, self._sizes)):
            if not isinstance(idx, Tensor) or idx.ndim != 1 or idx.dtype != torch.long:
                raise ShapeError(f"indices[{i}] must be a 1-D LongTensor.")
            if idx.shape[0] != size:
                raise ShapeError(
                    f"indices[{i}] has {idx.shape[0]} entries but block {i} has size {size}."
                )
        perm = torch.cat([idx.to(self.device) for idx in indices])
        arange = torch.arange(self.size, device=self.device)
        if not torch.equal(torch.sort(perm).values, arange):
            raise ShapeError(
                f"BlockDiagonal indices must partition range({self.size}) "
                "(every entry exactly once)."
            )
        if torch.equal(perm, arange):
            return None, None
        return perm, torch.argsort(perm)

    # ------------------------------------------------------------------ modifications
    # Recorded here and applied to the base blocks on every call (cached when nothing requires
    # grad), so each result gets a fresh autograd graph from the user's tensors.
    def _with_mod(self, kind: str, x: object) -> BlockDiagonal:
        new = copy.copy(self)
        new._block_mods = self._block_mods + ((kind, x),)
        new._eff = None
        new._effective_blocks()  # validate now (e.g. a vector shift on a Kronecker block)
        return new

    def _effective_blocks(self) -> tuple[PSDOperator, ...]:
        if self._eff is not None:
            return self._eff
        blocks = list(self._blocks)
        for kind, x in self._block_mods:
            if kind == "scale":
                blocks = [b.scale(x) for b in blocks]
            elif kind == "shift":
                pieces = [x] * len(blocks) if x.ndim == 0 else self._gather(x)
                blocks = [b.add_diagonal(p) for b, p in zip(blocks, pieces)]
            elif kind == "block_scale":
                blocks = [b.scale(x[i]) for i, b in enumerate(blocks)]
            else:  # "block_shift"
                blocks = [b.add_diagonal(x[i]) for i, b in enumerate(blocks)]
        out = tuple(blocks)
        values = [x for _, x in self._block_mods]
        flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
        if not any(isinstance(t, Tensor) and t.requires_grad for t in flat):
            self._eff = out
        return out

    # ------------------------------------------------------------------ metadata
    @property
    def size(self) -> int:
        return sum(self._sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self._blocks[0].device

    @property
    def blocks(self) -> tuple[PSDOperator, ...]:
        """The blocks with all scalings and shifts applied."""
        return self._effective_blocks()

    @property
    def modifications(self) -> tuple:
        """The pending modifications: those of the whole operator, then the per-block ones
        (``scale``/``shift``/``block_scale``/``block_shift``, applied to every block)."""
        return super().modifications + self._block_mods

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def indices(self) -> list[Tensor]:
        """Index set of each block in the full vector."""
        perm = self._perm if self._perm is not None else torch.arange(self.size, device=self.device)
        return list(torch.split(perm, self._sizes))

    # ------------------------------------------------------------------ permutation helpers
    def _gather(self, x: Tensor) -> list[Tensor]:
        """Block pieces ``x[indices[i]]`` (along dim 0)."""
        if self._perm is not None:
            x = x[self._perm]
        return list(torch.split(x, self._sizes))

    def _scatter(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`_gather`."""
        x = torch.cat(list(parts))
        return x if self._inv is None else x[self._inv]

    def _blockwise(
        self, v: Tensor, fn: Callable[[PSDOperator, Tensor], Tensor], name: str
    ) -> Tensor:
        V, vec = self._as_matrix(v, name)
        parts = [fn(b, p) for b, p in zip(self._effective_blocks(), self._gather(V))]
        return finish(self._scatter(parts), vec)

    def _per_block(self, values: Sequence[Scalar] | Tensor, name: str) -> Tensor | tuple:
        if isinstance(values, Tensor):
            values = values.reshape(-1) if values.ndim != 1 else values
        else:
            values = tuple(values)
        if len(values) != self.num_blocks:
            raise ShapeError(
                f"{name} needs {self.num_blocks} values (one per block), got {len(values)}."
            )
        return values

    # ------------------------------------------------------------------ algebra
    def matvec(self, v: Tensor) -> Tensor:
        return self._blockwise(v, lambda b, x: b.matvec(x), "v")

    def solve(self, v: Tensor) -> Tensor:
        return self._blockwise(v, lambda b, x: b.solve(x), "v")

    def logdet(self) -> Tensor:
        return torch.stack([b.logdet() for b in self._effective_blocks()]).sum()

    def diagonal(self) -> Tensor:
        return self._scatter([b.diagonal() for b in self._effective_blocks()])

    def inv_diagonal(self) -> Tensor:
        return self._scatter([b.inv_diagonal() for b in self._effective_blocks()])

    def to_dense(self) -> Tensor:
        M = torch.block_diag(*[b.to_dense() for b in self._effective_blocks()])
        return M if self._inv is None else M[self._inv][:, self._inv]

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._blockwise(z, lambda b, x: b.inv_sqrt_matvec(x), "z")

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._blockwise(z, lambda b, x: b.sqrt_matvec(x), "z")

    def scale(self, c: Scalar) -> BlockDiagonal:
        return self._with_mod("scale", self._scalar(c, "c", nonnegative=True))

    def add_diagonal(self, d: Scalar) -> BlockDiagonal:
        """Scalar ``d``: added to every block; ``(n,)`` ``d``: block ``i`` gets ``d[indices[i]]``.

        A vector ``d`` raises on Kronecker blocks (see ``add_diagonal_per_block``).
        """
        return self._with_mod("shift", self._diag_arg(d))

    def scale_per_block(self, cs: Sequence[Scalar] | Tensor) -> BlockDiagonal:
        """``c_i · A_i`` on block ``i`` (one scalar per block)."""
        return self._with_mod("block_scale", self._per_block(cs, "scale_per_block"))

    def add_diagonal_per_block(self, deltas: Sequence[Scalar] | Tensor) -> BlockDiagonal:
        """``A_i + δ_i I`` on block ``i`` (one scalar per block, e.g. a per-layer prior)."""
        return self._with_mod("block_shift", self._per_block(deltas, "add_diagonal_per_block"))

    def to_linear_operator(self) -> LinearOperator:
        """``DiagLinearOperator`` when all blocks are diagonal, else a dense wrap."""
        if all(isinstance(b, Diagonal) for b in self._blocks):
            return DiagLinearOperator(self.diagonal())
        return DenseLinearOperator(self.to_dense())
