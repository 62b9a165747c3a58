r"""Spectral convolutions with complex weights held as two real parameters.

A spectral convolution on a periodic grid of ``n`` points (per dimension) computes

.. math:: (K v)_o(x) = \mathcal F^{-1}\Big[\sum_i R_{iok}\, \hat v_i(k)\Big](x),
          \qquad \hat v(k) = \tfrac1n \sum_x v(x) e^{-2\pi i k x / n},

keeping only the lowest modes ``k``. The transform is normalised on the forward side
(``norm="forward"``), so :math:`\hat v(k)` approximates the Fourier-series coefficient of the
underlying function and the inverse transform can be evaluated on a grid of *any* size: the
output is the same function sampled at another resolution.

``R = R_re + i R_im`` is stored as two real ``nn.Parameter`` s ``weight_real`` and
``weight_imag`` of shape ``(in, out, *modes)``, so every real-valued curvature routine
(GGN, diagonal, low rank, linearized predictive) applies unchanged. For real inputs the
output is :math:`\sum_k c_k \operatorname{Re}(R_{iok}\hat v_i(k) e^{2\pi i k x/n})` with the
rfft weights :math:`c_0 = 1, c_{k>0} = 2` (last dimension), so

.. math:: \partial u_o(x)/\partial R_{re,iok} = c_k \operatorname{Re}(\hat v_i(k) e_k(x)),\quad
          \partial u_o(x)/\partial R_{im,iok} = -c_k \operatorname{Im}(\hat v_i(k) e_k(x)),

whose squares sum to :math:`c_k^2 |\hat v_i(k)|^2` — independent of ``x``.

2D layout: modes ``(2 m_1, m_2)``; rows ``0..m_1-1`` hold the frequencies :math:`k_1 = 0..m_1-1`,
rows ``m_1..2m_1-1`` the negative frequencies :math:`k_1 = -m_1..-1`; :math:`k_2 = 0..m_2-1`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.errors import InvalidArgumentError, ShapeError


def _as_tuple(v: int | tuple[int, ...] | list[int], d: int, what: str) -> tuple[int, ...]:
    t = (v,) * d if isinstance(v, int) else tuple(v)
    if len(t) != d or any(not isinstance(m, int) or m < 1 for m in t):
        raise InvalidArgumentError(f"{what} must be a positive int or {d} positive ints, got {v}")
    return t


def spatial_size(x: Tensor, dim: int, size: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """The output grid size: ``size`` (int or tuple) or the input's own grid."""
    return tuple(x.shape[-dim:]) if size is None else _as_tuple(size, dim, "out_size")


def fourier_resample(v: Tensor, size: int | tuple[int, ...], dim: int) -> Tensor:
    r"""Band-limited (trigonometric) interpolation of the periodic grid function ``v``
    ``(..., *n)`` onto a grid of ``size`` points per dimension: keep the common modes and
    invert at the new size. Identity when ``size`` equals the grid; exact for functions with
    fewer than ``min(n, size)/2`` modes per dimension."""
    size = _as_tuple(size, dim, "size")
    if tuple(v.shape[-dim:]) == size:
        return v
    dims = tuple(range(-dim, 0))
    vh = torch.fft.rfftn(v, dim=dims, norm="forward")
    vh = _crop_pad(vh, tuple(v.shape[-dim:]), size)
    return torch.fft.irfftn(vh, s=size, dim=dims, norm="forward")


def _crop_pad(vh: Tensor, n: tuple[int, ...], m: tuple[int, ...]) -> Tensor:
    """rfft coefficients of a grid of size ``n`` rearranged for a grid of size ``m``.

    Frequencies below both Nyquist limits are kept. Upsampling from an even ``n`` splits its
    Nyquist coefficient evenly between ``±n/2`` (the interpolant passes through the original
    values); downsampling to an even ``m`` folds ``±m/2`` into the new Nyquist slot (exact
    decimation of band-limited functions), so resampling up and back down is the identity."""
    d = len(n)
    for j in range(d):
        axis = vh.dim() - d + j
        rfft_axis = j == d - 1
        h = (min(n[j], m[j]) - 1) // 2  # frequencies 1..h on both sides
        nyq = None
        if m[j] > n[j] and n[j] % 2 == 0:
            nyq = 0.5 * vh.narrow(axis, n[j] // 2, 1)
        elif m[j] < n[j] and m[j] % 2 == 0:
            plus = vh.narrow(axis, m[j] // 2, 1)
            nyq = 2 * plus if rfft_axis else plus + vh.narrow(axis, n[j] - m[j] // 2, 1)
        head = [vh.narrow(axis, 0, h + 1)]
        tail = [] if rfft_axis else [vh.narrow(axis, n[j] - h, h)]
        if nyq is not None:
            head.append(nyq)
            if not rfft_axis and m[j] > n[j]:
                tail.insert(0, nyq)
        size = m[j] // 2 + 1 if rfft_axis else m[j]
        shape = list(vh.shape)
        shape[axis] = size - sum(t.shape[axis] for t in head + tail)
        vh = torch.cat([*head, vh.new_zeros(shape), *tail], axis)
    return vh


class SpectralConv(nn.Module):
    r"""Spectral convolution in ``dim`` = 1 or 2 spatial dimensions (see the module docstring).

    Args:
        in_channels: channels of the input function.
        out_channels: channels of the output function.
        modes: kept modes per dimension (int or tuple); in 2D ``m_1`` positive and ``m_1``
            negative frequencies of the first axis, ``m_2`` of the (rfft) last axis.
        dim: 1 or 2.

    ``forward(x, out_size=None)``: ``x`` ``(B, in, *n)`` -> ``(B, out, *out_size)``.
    The class sets ``bayescurv_per_sample = True``: the curvature engine treats its weights
    exactly by per-sample gradients (it acts on each data point separately).
    """

    bayescurv_per_sample = True

    def __init__(
        self, in_channels: int, out_channels: int, modes: int | tuple[int, ...], dim: int = 1
    ) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise InvalidArgumentError(f"dim must be 1 or 2, got {dim}")
        self.in_channels, self.out_channels, self.dim = in_channels, out_channels, dim
        self.modes = _as_tuple(modes, dim, "modes")
        shape = (in_channels, out_channels, *self.weight_modes)
        scale = 1.0 / (in_channels * out_channels)
        self.weight_real = nn.Parameter(scale * torch.rand(shape))
        self.weight_imag = nn.Parameter(scale * torch.rand(shape))

    @property
    def weight_modes(self) -> tuple[int, ...]:
        """Mode axes of the weights: ``(m,)`` in 1D, ``(2 m_1, m_2)`` in 2D."""
        if self.dim == 1:
            return self.modes
        return (2 * self.modes[0], self.modes[1])

    @property
    def weight(self) -> Tensor:
        """The complex weights ``R_re + i R_im``."""
        return torch.complex(self.weight_real, self.weight_imag)

    def _check_grid(self, n: tuple[int, ...], what: str) -> None:
        if self.dim == 1:
            ok = n[0] // 2 + 1 >= self.modes[0]
        else:
            ok = n[0] >= 2 * self.modes[0] and n[1] // 2 + 1 >= self.modes[1]
        if not ok:
            raise ShapeError(
                f"SpectralConv with modes {self.modes} needs a finer {what} grid than {n} "
                f"(at least {2 * self.modes[0] - (1 if self.dim == 1 else 0)} points per "
                "axis); use a finer grid or fewer modes"
            )

    def forward(self, x: Tensor, out_size: int | tuple[int, ...] | None = None) -> Tensor:
        if x.dim() != self.dim + 2 or x.shape[1] != self.in_channels:
            raise ShapeError(
                f"SpectralConv expects (batch, {self.in_channels}, *grid) with {self.dim} grid "
                f"dims, got {tuple(x.shape)}"
            )
        n = tuple(x.shape[-self.dim:])
        m = spatial_size(x, self.dim, out_size)
        self._check_grid(n, "input")
        self._check_grid(m, "output")
        dims = tuple(range(-self.dim, 0))
        xh = torch.fft.rfftn(x, dim=dims, norm="forward")
        w = self.weight.to(xh.dtype)
        if self.dim == 1:
            k = self.modes[0]
            y = torch.einsum("bik,iok->bok", xh[..., :k], w)
            y = torch.cat([y, y.new_zeros(*y.shape[:-1], m[0] // 2 + 1 - k)], -1)
        else:
            k1, k2 = self.modes
            pos = torch.einsum("bixy,ioxy->boxy", xh[..., :k1, :k2], w[:, :, :k1])
            neg = torch.einsum("bixy,ioxy->boxy", xh[..., -k1:, :k2], w[:, :, k1:])
            mid = pos.new_zeros(*pos.shape[:2], m[0] - 2 * k1, k2)
            y = torch.cat([pos, mid, neg], -2)
            y = torch.cat([y, y.new_zeros(*y.shape[:-1], m[1] // 2 + 1 - k2)], -1)
        return torch.fft.irfftn(y, s=m, dim=dims, norm="forward")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, modes={self.modes}, dim={self.dim}")


def mode_weights(n: int, modes: int) -> Tensor:
    """rfft symmetry weights ``c_k`` of the kept modes ``k < modes`` on an ``n``-point grid:
    1 for ``k = 0`` (and the Nyquist mode), 2 otherwise."""
    c = torch.full((modes,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if n % 2 == 0 and modes > n // 2:
        c[n // 2] = 1.0
    return c


def grid_coordinates(size: tuple[int, ...], like: Tensor) -> Tensor:
    """Coordinates ``(dim, *size)`` of the periodic grid ``x_j = j / n`` on ``[0, 1)^dim``."""
    axes = [torch.arange(n, dtype=like.dtype, device=like.device) / n for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


__all__ = ["SpectralConv", "fourier_resample", "mode_weights", "grid_coordinates"]
