r"""``neuralop`` (the ``neuraloperator`` package) support: its complex spectral weights as two
real parameters.

``neuralop.layers.spectral_convolution.SpectralConv`` holds ``R`` as one complex parameter
(``weight.tensor`` of a ``tltorch`` ``DenseTensor``), which no real-valued curvature routine
accepts, and writes its output spectrum in place (not ``vmap``-able). :func:`split_complex`
replaces each such layer by :class:`SplitSpectralConv`: the same map, with
``R = weight_real + i·weight_imag`` and the bias as real ``nn.Parameter`` s, a functional
(``vmap``-able) forward that follows neuralop's (rfft, ``fftshift`` of the full axes, centred
mode selection, ``max_n_modes`` slicing, ``output_shape``), and ``bayescurv_per_sample = True``
so the curvature engine handles it exactly. The original layer is kept (unregistered);
:func:`merge_complex` writes the weights back. Evaluated on another grid (``output_shape``),
the skip paths of a split layer are resampled spectrally (band-limited interpolation on the
periodic grid), not by neuralop's linear ``resample``: on the 1D heat equation the 128-point
prediction of a 64-point model is then as accurate as on the training grid and passes through
the 64-point values (docs/operators.md).

Supported: the dense factorization (``factorization=None``), non-separable, real data, full
precision. Tucker/CP/TT factorizations, ``separable=True``, ``complex_data=True`` and
half/mixed precision are refused by name (:class:`~bayescurv.errors.UnsupportedLayerError`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.errors import InvalidArgumentError, UnsupportedLayerError
from bayescurv.operators.spectral import fourier_resample


def available() -> bool:
    """Whether ``neuralop`` can be imported."""
    try:
        import neuralop  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _spectral_conv_class():
    from neuralop.layers.spectral_convolution import SpectralConv

    return SpectralConv


def _check_supported(conv: nn.Module, name: str) -> None:
    fact = getattr(conv, "factorization", None)
    problems = []
    if fact not in (None, "dense", "Dense") or not hasattr(conv.weight, "tensor"):
        problems.append(f"factorization={fact!r} (only the dense one, factorization=None)")
    if getattr(conv, "separable", False):
        problems.append("separable=True")
    if getattr(conv, "complex_data", False):
        problems.append("complex_data=True")
    if getattr(conv, "fno_block_precision", "full") != "full":
        problems.append(f"fno_block_precision={conv.fno_block_precision!r}")
    if problems:
        raise UnsupportedLayerError(
            f"neuralop SpectralConv {name!r} has {', '.join(problems)}, which bayescurv does not "
            "support; use a dense, non-separable, full-precision SpectralConv for the layers in "
            "the posterior, or leave this layer out of the subset (split_complex(names=...))"
        )


class SplitSpectralConv(nn.Module):
    """A neuralop ``SpectralConv`` (dense) with real parameters ``weight_real``,
    ``weight_imag`` ``(in, out, *max_n_modes)`` and ``bias``; same forward."""

    bayescurv_per_sample = True
    #: resample skip paths spectrally (:meth:`transform`); ``False``: neuralop's interpolation
    spectral_transform: bool = True

    def __init__(self, conv: nn.Module, name: str = "") -> None:
        super().__init__()
        _check_supported(conv, name)
        w = conv.weight.tensor.detach()
        real_dtype = w.real.dtype
        self.weight_real = nn.Parameter(w.real.clone())
        self.weight_imag = nn.Parameter(w.imag.clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone()
                                                               .to(real_dtype))
        # kept unregistered: its complex weight is not a parameter of the model any more (and
        # ``model.to(dtype)`` would drop its imaginary part); config and ``transform`` only
        self._original = [conv]

    @property
    def conv(self) -> nn.Module:
        """The original neuralop layer (its weights are stale until :func:`merge_complex`)."""
        return self._original[0]

    @property
    def weight(self) -> Tensor:
        return torch.complex(self.weight_real, self.weight_imag)

    def transform(self, x: Tensor, output_shape=None) -> Tensor:
        """Resampling of a skip path onto the output grid: band-limited (Fourier)
        interpolation on the periodic grid, :func:`~bayescurv.operators.fourier_resample`,
        in place of neuralop's ``resample`` (linear interpolation, not periodic), so that a
        prediction on a finer grid passes through the coarse one. ``spectral_transform =
        False`` on the layer restores neuralop's."""
        if not self.spectral_transform:
            return self.conv.transform(x, output_shape=output_shape)
        order = self.conv.order
        sizes = list(x.shape[-order:])
        scale = self.conv.resolution_scaling_factor
        if output_shape is not None:
            sizes = list(output_shape)
        elif scale is not None:
            sizes = [round(s * r) for s, r in zip(sizes, scale)]
        return fourier_resample(x, tuple(sizes), order)

    def forward(self, x: Tensor, output_shape=None) -> Tensor:
        conv = self.conv
        order = conv.order
        _, _, *sizes = x.shape
        fft_size = list(sizes)
        fft_size[-1] = fft_size[-1] // 2 + 1
        dims = list(range(-order, 0))
        xh = torch.fft.rfftn(x, norm=conv.fft_norm, dim=dims)
        if order > 1:
            xh = torch.fft.fftshift(xh, dim=dims[:-1])
        starts = [mx - min(s, n) for s, n, mx in zip(fft_size, conv.n_modes, conv.max_n_modes)]
        sw = [slice(None), slice(None)]
        sw += [slice(st // 2, -st // 2) if st else slice(st, None) for st in starts[:-1]]
        sw += [slice(None, -starts[-1]) if starts[-1] else slice(None)]
        weight = self.weight.to(xh.dtype)[tuple(sw)]
        sx, pad = [slice(None), slice(None)], []
        for j, (all_modes, kept) in enumerate(zip(fft_size, weight.shape[2:])):
            if j == order - 1:
                stop = min(kept, all_modes)
                sx.append(slice(None, stop))
                pad.append((0, all_modes - stop))
            else:
                centre, neg = all_modes // 2, kept // 2
                lo, hi = centre - neg, centre + kept // 2 + kept % 2
                sx.append(slice(lo, hi))
                pad.append((lo, all_modes - hi))
        y = torch.einsum("bi...,io...->bo...", xh[tuple(sx)], weight)
        flat_pad = [p for pair in reversed(pad) for p in pair]
        y = torch.view_as_complex(F.pad(torch.view_as_real(y).movedim(-1, 0), flat_pad)
                                  .movedim(0, -1).contiguous())
        scale = conv.resolution_scaling_factor
        if output_shape is not None:
            sizes = list(output_shape)
        elif scale is not None:
            sizes = [round(s * r) for s, r in zip(sizes, scale)]
        if order > 1:
            y = torch.fft.fftshift(y, dim=dims[:-1])
        out = torch.fft.irfftn(y, s=sizes, dim=dims, norm=conv.fft_norm)
        return out if self.bias is None else out + self.bias


def split_complex(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Replace (in place) the neuralop ``SpectralConv`` layers of ``model`` (all, or the
    module names in ``names``) by :class:`SplitSpectralConv`; returns ``model``. Refuses
    unsupported layers by name."""
    cls = _spectral_conv_class()
    found = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    wanted = list(found) if names is None else list(names)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise InvalidArgumentError(f"no neuralop SpectralConv named {missing}; the model has "
                                   f"{list(found)}")
    for name in wanted:
        _replace(model, name, SplitSpectralConv(found[name], name))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    if isinstance(holder, nn.ModuleList):
        holder[int(child)] = new
    else:
        setattr(holder, child, new)


@torch.no_grad()
def merge_complex(model: nn.Module) -> nn.Module:
    """Undo :func:`split_complex` in place: write the (possibly trained) real and imaginary
    parts back into the original complex layers and put those back; returns ``model``."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, SplitSpectralConv):
            continue
        conv = m.conv
        conv.weight.tensor.copy_(m.weight.to(conv.weight.tensor.dtype))
        conv.to(device=m.weight_real.device)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
        _replace(model, name, conv)
    return model


__all__ = ["SplitSpectralConv", "split_complex", "merge_complex", "available"]
