r"""Backpropagated diagonal GGN (Becker & LeCun, 1988; HesScale, Elsayed & Mahmood, 2022).

**Approximate.** The per-sample curvature with respect to each layer's output is carried
backwards as its diagonal only (off-diagonal terms are dropped), which costs about one
backward pass and no extra memory. With :math:`d^{(l)}_b` the carried diagonal at the output
``z`` of layer ``l`` for data point ``b``:

- at the network output the exact per-sample loss Hessian :math:`H_b` is kept as a full
  ``C x C`` matrix through elementwise activations (:math:`D H_b D`, ``D = diag(φ')``) and
  reshapes, and through the **last** Linear layer, whose input gets the exact diagonal
  :math:`\operatorname{diag}(W^\top H_b W)` (HesScale's exact last layer);
- Linear ``z = W a + c``: weight :math:`\sum_b d_{bo} a_{bi}^2`, bias :math:`\sum_b d_{bo}`,
  input :math:`d_a = d \, (W \odot W)` (positions of a shared Linear summed independently);
- Conv: the same with patches, input :math:`d_a` = transposed convolution of ``d`` with
  :math:`W \odot W`;
- elementwise activation: :math:`d_h = \varphi'(h)^2 \odot d_a` (Gauss-Newton: no
  :math:`\varphi''` term).

Exact for the last two Linear layers of an MLP (their GGN diagonal only needs the exact
curvature at their outputs); below that it is an approximation whose error depends on the
neglected off-diagonal curvature. Works for ``nn.Sequential`` models (nesting allowed) of
Linear, Conv1d/2d/3d (``groups=1``), Flatten, Identity, Dropout (eval) and elementwise
activations; other modules are refused with an error naming them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import layers
from bayescurv.errors import UnsupportedLayerError
from bayescurv.likelihoods import Likelihood, check_finite_outputs
from bayescurv.linalg import internal_dtype
from bayescurv.params import ParamSet

ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softsign,
)
PASS = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def flatten_sequential(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules of a (nested) ``nn.Sequential`` in call order; refuses the rest."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"structure='diag-hesscale' needs an nn.Sequential model (got "
            f"{type(model).__name__}); use structure='diag' for the exact diagonal"
        )
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            out += [(f"{name}.{n}", c) for n, c in flatten_sequential(m)]
            continue
        ok = isinstance(m, (nn.Linear, *ELEMENTWISE, *PASS)) or (
            isinstance(m, layers.LINEAR_LIKE) and m.groups == 1
        )
        if not ok or (isinstance(m, nn.modules.dropout._DropoutNd) and m.training):
            raise UnsupportedLayerError(
                f"module {name!r} ({type(m).__name__}) has no diagonal backpropagation rule "
                "in 'diag-hesscale' (supported: Linear, Conv1d/2d/3d with groups=1, "
                "elementwise activations, Flatten, Identity, Dropout in eval mode); use "
                "structure='diag' for the exact diagonal"
            )
        out.append((name, m))
    return out


def _derivative(module: nn.Module, h: Tensor) -> Tensor:
    """``φ'(h)`` of an elementwise module."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(module(h).sum(), h)
    return d


class HesScaleDiagonal:
    """Accumulates the backpropagated diagonal over batches (see the module docstring)."""

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self.modules = flatten_sequential(params.model)
        self.diag = torch.zeros(params.numel, dtype=internal_dtype(params.dtype),
                                device=params.device)

    def _add(self, p: Tensor, values: Tensor) -> None:
        i = self.params.index_of(p)
        if i >= 0:
            self.diag[self.params.slice_of(i)] += values.reshape(-1)

    def forward(self, x: Tensor, likelihood: Likelihood) -> tuple[Tensor, list[Tensor]]:
        """Network outputs ``f`` ``(B, C)`` and the input of every module."""
        inputs = []
        h = x
        with torch.no_grad():
            for _, m in self.modules:
                inputs.append(h)
                h = m(h)
            f = likelihood.check_outputs(h)
            check_finite_outputs(f)
        return f, inputs

    def backward(self, f: Tensor, inputs: list[Tensor], likelihood: Likelihood) -> None:
        """Carry the curvature from the output back to the input, filling ``self.diag``."""
        full: Tensor | None = likelihood.hessian(f)  # (B, C, C) while exact
        d: Tensor | None = None
        out_shape = f.shape
        for (_, m), a in zip(reversed(self.modules), reversed(inputs)):
            if full is not None and not (isinstance(m, (nn.Linear, *ELEMENTWISE, *PASS))
                                         and a.dim() == 2):
                d, full = torch.diagonal(full, dim1=-2, dim2=-1).reshape(out_shape), None
            if isinstance(m, nn.Linear):
                dz = d if full is None else torch.diagonal(full, dim1=-2, dim2=-1)
                a2 = a.square()
                self._add(m.weight, torch.einsum("...o,...i->oi", dz, a2))
                if m.bias is not None:
                    self._add(m.bias, dz.reshape(-1, dz.shape[-1]).sum(0))
                if full is not None:  # exact diag(Wᵀ H W)
                    d = torch.einsum("boq,oi,qi->bi", full, m.weight, m.weight)
                    full = None
                else:
                    d = d @ m.weight.square()
            elif isinstance(m, layers.LINEAR_LIKE):
                b, o = d.shape[:2]
                unf = layers.im2col(a, m)  # (B, T, I)
                self._add(m.weight, torch.einsum("bot,bti->oi", d.reshape(b, o, -1),
                                                 unf.square()).reshape(m.weight.shape))
                if m.bias is not None:
                    self._add(m.bias, d.reshape(b, o, -1).sum((0, 2)))
                w2 = m.weight.square()
                _, vjp = torch.func.vjp(lambda t, w2=w2, m=m: m._conv_forward(t, w2, None), a)
                d = vjp(d)[0]
            elif isinstance(m, ELEMENTWISE):
                dphi = _derivative(m, a)
                if full is not None:
                    full = full * dphi.unsqueeze(-1) * dphi.unsqueeze(-2)
                else:
                    d = dphi.square() * d
            elif full is not None:  # Flatten / Identity / Dropout(eval) on (B, C)
                pass
            else:
                d = d.reshape(a.shape)
            out_shape = a.shape


def hesscale_diagonal(
    params: ParamSet, likelihood: Likelihood, data: Iterable, x_key: str = "x",
    y_key: str = "y",
) -> tuple[Tensor, Tensor, int]:
    """``(diagonal (P,), summed NLL, N)`` of the backpropagated diagonal GGN over ``data``."""
    acc = HesScaleDiagonal(params)
    loss = torch.zeros((), dtype=internal_dtype(params.dtype), device=params.device)
    n = 0
    for x, y in batches.iterate(data, device=params.device, dtype=params.dtype, x_key=x_key,
                                y_key=y_key):
        if isinstance(x, dict):
            raise UnsupportedLayerError(
                "structure='diag-hesscale' needs tensor inputs for its nn.Sequential model"
            )
        with torch.no_grad():
            f, inputs = acc.forward(x, likelihood)
            fc, yc = likelihood.check(f, y)
            loss += likelihood.nll(fc, yc)
            acc.backward(fc, inputs, likelihood)
        n += x.shape[0]
    return acc.diag, loss, n


__all__ = ["hesscale_diagonal", "HesScaleDiagonal", "flatten_sequential"]
