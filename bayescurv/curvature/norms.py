r"""Per-sample gradients of normalization layers' affine parameters in closed form.

A norm layer computes :math:`y = \gamma \odot \hat x + \beta` with :math:`\hat x` the
normalized input, so for an output gradient :math:`g` (one loss-square-root column, one data
point) the gradients of its own parameters are

.. math:: \nabla_\gamma = \sum_s g_s \odot \hat x_s, \qquad \nabla_\beta = \sum_s g_s,

summed over the positions :math:`s` that share :math:`\gamma, \beta` (spatial positions of
BatchNorm/GroupNorm, the leading positions of LayerNorm). This is what the generic route
(``torch.func`` vector-Jacobian products of the module per data point) computes, at the cost
of one elementwise product instead of a vmapped backward through the module.

Covered: ``BatchNorm1d/2d/3d`` in eval mode with running statistics, ``LayerNorm`` and
``GroupNorm``, each with PyTorch's own ``forward`` (subclasses that override it, such as
the channels-first ``LayerNorm2d`` of torchvision/timm ConvNeXt or timm's norm+activation
layers, keep the generic route). Everything else (BatchNorm without running statistics,
which normalizes with batch statistics; instance norms; unknown modules) keeps the generic
route
(:func:`per_sample` returns ``None``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``base`` computing ``base``'s own forward (a subclass that
    overrides it, e.g. a channels-first ``LayerNorm2d`` that permutes its input, or a norm
    fused with an activation, keeps the generic route)."""
    return isinstance(module, base) and type(module).forward is base.forward


def normalized(module: nn.Module, x: Tensor) -> Tensor | None:
    r""":math:`\hat x` of ``module`` for its input ``x`` (batch in front), or ``None`` when
    the module is not covered (module docstring)."""
    bn = type(module).forward is nn.modules.batchnorm._BatchNorm.forward
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and bn:
        if module.training or module.running_mean is None or module.running_var is None:
            return None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        inv = torch.rsqrt(module.running_var.to(x.dtype) + module.eps).view(shape)
        return (x - mean) * inv
    if _own_forward(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)
    if _own_forward(module, nn.GroupNorm):
        b = x.shape[0]
        xg = x.reshape(b, module.num_groups, -1)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
        return ((xg - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)
    return None


def per_sample(module: nn.Module, names: list[str], x: Tensor, g: Tensor,
               cache: dict | None = None) -> dict[str, Tensor] | None:
    r"""Per-sample, per-column gradients ``{name: (K, B, *p.shape)}`` of the norm's own
    ``weight`` / ``bias`` among ``names``, for its input ``x`` ``(B, ...)`` and output
    gradients ``g`` ``(K, B, ...)``; ``None`` when the module is not covered. ``cache``
    (a dict) keeps :math:`\hat x` for later chunks of loss columns of the same batch."""
    if not set(names) <= {"weight", "bias"}:
        return None
    xhat = cache.get("xhat") if cache is not None else None
    if xhat is None:
        xhat = normalized(module, x)
        if cache is not None and xhat is not None:
            cache["xhat"] = xhat
    if xhat is None:
        return None
    if isinstance(module, nn.LayerNorm):  # γ over the trailing normalized_shape
        nd = len(module.normalized_shape)
        dims = tuple(range(2, g.dim() - nd))
    else:  # (K, B, C, *spatial): γ per channel
        dims = tuple(range(3, g.dim()))
    out: dict[str, Tensor] = {}
    if "weight" in names:
        gx = g * xhat.to(g.dtype)
        out["weight"] = gx.sum(dims) if dims else gx
    if "bias" in names:
        out["bias"] = g.sum(dims) if dims else g
    return out
