r"""Fourier neural operators (Li et al. 2021) as plain ``nn.Module`` s, 1D and 2D.

.. math::
    v_0 = P_{lift}([a(x), x]),\qquad
    v_{l+1}(x) = \sigma\big((K_l v_l)(x) + W_l v_l(x) + b_l\big),\qquad
    u(x) = Q_2\, \sigma(Q_1 v_L(x))

with spectral convolutions :math:`K_l` (:class:`~bayescurv.operators.spectral.SpectralConv`),
pointwise skips ``W_l, b_l`` (1x1 convolutions), no activation after the last block. The
operator maps input functions on any grid to output functions; ``out_size`` evaluates the
last block on another grid (its spectral path by the inverse FFT at the new size, its
pointwise path by Fourier interpolation), so the output is the same function at another
resolution. Block ``l`` is the module ``blocks.l`` with children ``spectral`` and ``skip``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.operators.spectral import (
    SpectralConv,
    fourier_resample,
    grid_coordinates,
    spatial_size,
)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class FNOBlock(nn.Module):
    r"""One Fourier layer :math:`v \mapsto \sigma(K v + W v + b)` (``activation=None``:
    no :math:`\sigma`)."""

    def __init__(self, width: int, modes, dim: int, activation: str | None = "gelu") -> None:
        super().__init__()
        self.dim = dim
        self.spectral = SpectralConv(width, width, modes, dim)
        self.skip = _CONV[dim](width, width, 1)
        self.act = _ACT[activation]() if activation else nn.Identity()

    def forward(self, v: Tensor, out_size: int | tuple[int, ...] | None = None) -> Tensor:
        m = spatial_size(v, self.dim, out_size)
        return self.act(self.spectral(v, m) + self.skip(fourier_resample(v, m, self.dim)))


class FNO(nn.Module):
    """Fourier neural operator on a periodic grid in ``dim`` = 1 or 2 dimensions.

    Args:
        in_channels: channels of the input function ``a`` (the grid coordinates are
            appended when ``grid=True``).
        out_channels: channels of the output function ``u``.
        modes: kept Fourier modes per dimension.
        width: channels of the hidden functions.
        depth: number of Fourier blocks.
        dim: 1 or 2.
        hidden: width of the projection (default ``2 * width``).
        activation: ``"gelu"``, ``"relu"`` or ``"tanh"``.

    ``forward(a, out_size=None)``: ``a`` ``(B, in, *n)`` -> ``u`` ``(B, out, *out_size)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: int | tuple[int, ...],
        width: int = 32,
        depth: int = 4,
        dim: int = 1,
        hidden: int | None = None,
        activation: str = "gelu",
        grid: bool = True,
    ) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise InvalidArgumentError(f"dim must be 1 or 2, got {dim}")
        if activation not in _ACT:
            raise InvalidArgumentError(f"activation must be one of {list(_ACT)}, got "
                                       f"{activation!r}")
        if depth < 1:
            raise InvalidArgumentError(f"depth must be at least 1, got {depth}")
        conv = _CONV[dim]
        self.dim, self.in_channels, self.out_channels, self.grid = dim, in_channels, \
            out_channels, grid
        self.lift = conv(in_channels + (dim if grid else 0), width, 1)
        self.blocks = nn.ModuleList(
            FNOBlock(width, modes, dim, activation if i < depth - 1 else None)
            for i in range(depth)
        )
        hidden = 2 * width if hidden is None else hidden
        self.project = nn.Sequential(conv(width, hidden, 1), _ACT[activation](),
                                     conv(hidden, out_channels, 1))

    @property
    def last_block(self) -> str:
        """Module name of the last Fourier block (the LUNO posterior subset)."""
        return f"blocks.{len(self.blocks) - 1}"

    def forward(self, a: Tensor, out_size: int | tuple[int, ...] | None = None) -> Tensor:
        check_input(self, a)
        if self.grid:
            coords = grid_coordinates(tuple(a.shape[-self.dim:]), a)
            a = torch.cat([a, coords.expand(a.shape[0], *coords.shape)], 1)
        v = self.lift(a)
        for i, block in enumerate(self.blocks):
            v = block(v, out_size if i == len(self.blocks) - 1 else None)
        return self.project(v)


class FlattenOutput(nn.Module):
    """A neural operator whose output ``(B, channels, *grid)`` is flattened to ``(B, C)``
    with ``C = channels * prod(grid)`` (channel-major), the shape :class:`bayescurv.Laplace`
    and :func:`bayescurv.compute` expect. Parameter names gain the prefix ``operator.``.

    ``forward(a, out_size=None)`` passes ``out_size`` to the operator (as ``output_shape`` for
    ``neuralop`` models)."""

    def __init__(self, operator: nn.Module) -> None:
        super().__init__()
        self.operator = operator

    def forward(self, a: Tensor, out_size: int | tuple[int, ...] | None = None) -> Tensor:
        return call_operator(self.operator, a, out_size).flatten(1)


def check_input(op: nn.Module, a: Tensor) -> None:
    """Refuse inputs whose number of grid dimensions or channels does not fit the operator
    (our :class:`FNO`, or a ``neuralop`` model with ``n_dim`` and ``in_channels``), with a
    :class:`~bayescurv.errors.ShapeError` in the user's terms: the whole batch's shape, and the
    channels *without* the grid coordinates that the operator appends itself."""
    op = op.operator if isinstance(op, FlattenOutput) else op
    if isinstance(op, FNO):
        dims, chans, name, grid = op.dim, op.in_channels, "FNO", op.grid
    elif hasattr(op, "n_dim") and hasattr(op, "in_channels"):
        dims, chans, name = op.n_dim, op.in_channels, f"neuralop {type(op).__name__}"
        grid = getattr(op, "positional_embedding", None) is not None
    else:
        return
    got = tuple(a.shape)
    if a.dim() == dims + 2 and a.shape[1] == chans:
        return
    have = (f"{a.dim() - 2} grid dims and {a.shape[1]} channels" if a.dim() >= 3
            else f"{a.dim()} dims")
    extra = (f"; the {dims} grid-coordinate channel(s) are appended by the operator, do not "
             f"include them" if grid else "")
    raise ShapeError(f"{name} expects inputs (batch, {chans}, *grid) with {dims} grid dim(s); "
                     f"got shape {got} (batch {got[0] if got else 0}, {have}){extra}")


def call_operator(op: nn.Module, a: Tensor, out_size=None) -> Tensor:
    """``op(a)`` evaluated on an output grid of ``out_size`` points (``None``: the input's):
    ``out_size=`` for bayescurv operators, ``output_shape=`` for ``neuralop`` models. Inputs
    are checked first (:func:`check_input`)."""
    check_input(op, a)
    if out_size is None:
        return op(a)
    params = inspect.signature(op.forward).parameters
    if "out_size" in params:
        return op(a, out_size=out_size)
    if "output_shape" in params:
        d = a.dim() - 2
        size = (out_size,) * d if isinstance(out_size, int) else tuple(out_size)
        return op(a, output_shape=size)
    raise InvalidArgumentError(
        f"{type(op).__name__}.forward takes neither out_size nor output_shape; it cannot be "
        "evaluated at another resolution"
    )


def FNO1d(in_channels: int = 1, out_channels: int = 1, modes: int = 16, width: int = 32,
          depth: int = 4, **kwargs) -> FNO:
    """A 1D :class:`FNO`."""
    return FNO(in_channels, out_channels, modes, width, depth, dim=1, **kwargs)


def FNO2d(in_channels: int = 1, out_channels: int = 1, modes: int | tuple[int, int] = 12,
          width: int = 32, depth: int = 4, **kwargs) -> FNO:
    """A 2D :class:`FNO`."""
    return FNO(in_channels, out_channels, modes, width, depth, dim=2, **kwargs)


__all__ = ["FNO", "FNO1d", "FNO2d", "FNOBlock", "FlattenOutput", "call_operator", "check_input"]
