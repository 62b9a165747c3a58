"""Shared test fixtures: dense float64 curvature references from :mod:`torch.func`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.params import ParamSet, select


def dense_curvature(
    model: nn.Module,
    likelihood: str | Likelihood,
    data: Iterable,
    params: ParamSet | str = "all",
    kind: str = "ggn",
) -> Tensor:
    r"""Dense ``P x P`` curvature of :math:`\sum_n -\log p(y_n|f(x_n))` over ``data``.

    ``kind``: ``"ggn"`` (:math:`\sum_n J_n^\top H_n J_n` with whole-net Jacobians from
    ``jacrev``), ``"ef"`` (:math:`\sum_n g_n g_n^\top`) or ``"hessian"``
    (``jacrev(grad)``; ``torch.func.hessian`` is wrong through ``layer_norm``).
    """
    lik = get_likelihood(likelihood)
    pset = params if isinstance(params, ParamSet) else select(model, params)
    theta = pset.vector()
    out = torch.zeros(pset.numel, pset.numel, dtype=pset.dtype, device=pset.device)
    for x, y in batches.iterate(data, device=pset.device, dtype=pset.dtype):

        def f(v: Tensor, x=x) -> Tensor:
            o = pset.functional_call(v, **x) if isinstance(x, dict) else pset.functional_call(v, x)
            return lik.check_outputs(o)

        if kind == "hessian":
            nll_grad = torch.func.grad(lambda v, y=y: lik.nll(*lik.check(f(v), y)))
            out += torch.func.jacrev(nll_grad)(theta)
            continue
        fx = f(theta).detach()
        jac = torch.func.jacrev(f)(theta)  # (B, C, P)
        if kind == "ggn":
            out += torch.einsum("bcp,bcd,bdq->pq", jac, lik.hessian(fx), jac)
        elif kind == "ef":
            g = torch.einsum("bcp,bc->bp", jac, lik.gradient(*lik.check(fx, y)))
            out += g.T @ g
        else:
            raise ValueError(kind)
    return out


@pytest.fixture
def dense_reference() -> Callable[..., Tensor]:
    """The function :func:`dense_curvature` (dense float64 ground truth)."""
    return dense_curvature


def split_batches(x, y: Tensor, sizes: Iterable[int]) -> list:
    """``(x, y)`` cut into consecutive batches of the given (unequal) sizes; ``x`` may be a
    tensor or a dict of tensors (dict batches then carry ``y`` under ``"y"``)."""
    out, start = [], 0
    for s in sizes:
        sl = slice(start, start + s)
        if isinstance(x, dict):
            out.append({**{k: v[sl] for k, v in x.items()}, "y": y[sl]})
        else:
            out.append((x[sl], y[sl]))
        start += s
    return out


@pytest.fixture
def batches_of() -> Callable[..., list]:
    """The function :func:`split_batches`."""
    return split_batches
