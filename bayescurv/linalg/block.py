"""Block-diagonal PSD matrix with heterogeneous blocks on arbitrary index sets.

Block ``i`` acts on the entries ``indices[i]`` of the full vector; the index sets partition
``range(n)``. With ``P`` the permutation ``v ↦ v[cat(indices)]``,
``A = Pᵀ blockdiag(A_1, ..., A_B) P``, so every operation is the blockwise one, and
``log det A = Σ log det A_i``.
"""

from __future__ import annotations

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

    def _copy(self, blocks: Sequence[PSDOperator]) -> BlockDiagonal:
        op = BlockDiagonal.__new__(BlockDiagonal)
        op._blocks, op._sizes, op._perm, op._inv = tuple(blocks), self._sizes, self._perm, self._inv
        return op

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
        return self._blocks

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
        parts = [fn(b, p) for b, p in zip(self._blocks, self._gather(V))]
        return finish(self._scatter(parts), vec)

    def _per_block(self, values: Sequence[Scalar] | Tensor, name: str) -> list[Scalar]:
        values = list(values) if not isinstance(values, Tensor) else list(values.reshape(-1))
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
        return torch.stack([b.logdet() for b in self._blocks]).sum()

    def diagonal(self) -> Tensor:
        return self._scatter([b.diagonal() for b in self._blocks])

    def inv_diagonal(self) -> Tensor:
        return self._scatter([b.inv_diagonal() for b in self._blocks])

    def to_dense(self) -> Tensor:
        M = torch.block_diag(*[b.to_dense() for b in self._blocks])
        return M if self._inv is None else M[self._inv][:, self._inv]

    def inv_sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._blockwise(z, lambda b, x: b.inv_sqrt_matvec(x), "z")

    def sqrt_matvec(self, z: Tensor) -> Tensor:
        return self._blockwise(z, lambda b, x: b.sqrt_matvec(x), "z")

    def scale(self, c: Scalar) -> BlockDiagonal:
        c = self._scalar(c, "c", nonnegative=True)
        return self._copy([b.scale(c) for b in self._blocks])

    def add_diagonal(self, d: Scalar) -> BlockDiagonal:
        d = self._diag_arg(d)
        if d.ndim == 0:
            return self._copy([b.add_diagonal(d) for b in self._blocks])
        return self._copy([b.add_diagonal(x) for b, x in zip(self._blocks, self._gather(d))])

    def scale_per_block(self, cs: Sequence[Scalar] | Tensor) -> BlockDiagonal:
        """``c_i · A_i`` on block ``i`` (one scalar per block)."""
        cs = self._per_block(cs, "scale_per_block")
        return self._copy([b.scale(c) for b, c in zip(self._blocks, cs)])

    def add_diagonal_per_block(self, deltas: Sequence[Scalar] | Tensor) -> BlockDiagonal:
        """``A_i + δ_i I`` on block ``i`` (one scalar per block, e.g. a per-layer prior)."""
        deltas = self._per_block(deltas, "add_diagonal_per_block")
        return self._copy([b.add_diagonal(d) for b, d in zip(self._blocks, deltas)])

    def to_linear_operator(self) -> LinearOperator:
        """``DiagLinearOperator`` when all blocks are diagonal, else a dense wrap."""
        if all(isinstance(b, Diagonal) for b in self._blocks):
            return DiagLinearOperator(self.diagonal())
        return DenseLinearOperator(self.to_dense())
