"""Tiny float64 networks of the architecture matrix (issue 11) and their dense references.

Every case is a trained-looking network of a few hundred parameters at most, in eval mode,
with ~24 training points in unequal batches and 4 test inputs. The references are dense
``torch.func`` algebra over the posterior's own :class:`~bayescurv.params.ParamSet`, in the
flat order of :mod:`bayescurv.params`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv.likelihoods import get_likelihood
from bayescurv.params import ParamSet

DT = torch.float64
N_TRAIN = 24
SIZES = (10, 8, 6)  # unequal batches
N_TEST = 4
SIGMA = 0.7  # observation noise of the regression cases


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """One single-head self-attention block from ``nn.Linear`` q/k/v/o projections with a
    residual and LayerNorm on ``(B, T, D)``, mean-pooled over ``T`` into a Linear head."""

    def __init__(self, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * self.scale, -1)
        h = self.norm(x + self.o(w @ self.v(x)))
        return self.head(h.mean(1))


class EmbeddingSequence(nn.Module):
    """Token ids ``(B, T)`` -> embedding -> Linear per position -> tanh -> mean pool -> head."""

    def __init__(self, vocab: int = 7, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(idx))).mean(1))


class MHASequence(nn.Module):
    """``torch.nn.MultiheadAttention`` self-attention (batch first), mean pool, Linear head."""

    def __init__(self, d: int = 4, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def _randomize_batchnorm(model: nn.Module, g: torch.Generator) -> None:
    """Running statistics and affine parameters away from their defaults (eval mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g, dtype=DT))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=DT))
                m.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=g, dtype=DT))
                m.bias.copy_(0.2 * torch.randn(n, generator=g, dtype=DT))


def _mlp(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, c))


def _cnn() -> nn.Module:
    # 1x8x8 -> conv 3x8x8 -> BN -> tanh -> maxpool 3x4x4 -> conv 3x4x4 -> avgpool 3x2x2 -> 3
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(12, 3),
    )


def _conv1d() -> nn.Module:
    # 2x8 -> conv 3x8 -> tanh -> avgpool 3x4 -> conv (stride 2) 2x2 -> 4 -> 3
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool1d(2),
        nn.Conv1d(3, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3),
    )


def _conv3d() -> nn.Module:
    # 1x4x4x4 -> conv 2x3x3x3 -> tanh -> maxpool 2x1x1x1 -> 2 -> 3 (plus a 2x3x3x3 flatten)
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.Tanh(), nn.MaxPool3d(2, stride=1), nn.Flatten(),
        nn.Linear(16, 3),
    )


@dataclass(frozen=True)
class Arch:
    name: str
    build: object  # () -> nn.Module
    x_shape: tuple[int, ...]
    likelihood: str = "classification"
    outputs: int = 3
    tokens: int = 0  # > 0: integer inputs in [0, tokens)


ARCHS = {
    a.name: a
    for a in (
        Arch("mlp", lambda: _mlp(3), (5,)),
        Arch("cnn", _cnn, (1, 8, 8)),
        Arch("conv1d", _conv1d, (2, 8)),
        Arch("conv3d", _conv3d, (1, 4, 4, 4)),
        Arch("attention", SelfAttention, (5, 4)),
        Arch("embedding", EmbeddingSequence, (5,), tokens=7),
        Arch("mha", MHASequence, (5, 4)),
        # regression
        Arch("mlp-reg", lambda: _mlp(2), (5,), "regression", 2),
        Arch("attention-reg", lambda: SelfAttention(c=2), (5, 4), "regression", 2),
        Arch("cnn-reg", lambda: nn.Sequential(*list(_cnn())[:-1], nn.Linear(12, 2)),
             (1, 8, 8), "regression", 2),
    )
}


@dataclass
class Case:
    arch: Arch
    model: nn.Module
    x: Tensor  # training inputs (N, ...)
    y: Tensor
    batches: list
    x_test: Tensor


def _inputs(arch: Arch, n: int, g: torch.Generator) -> Tensor:
    if arch.tokens:
        return torch.randint(0, arch.tokens, (n, *arch.x_shape), generator=g)
    return torch.randn(n, *arch.x_shape, generator=g, dtype=DT)


@functools.cache
def case(name: str) -> Case:
    """The network of ``ARCHS[name]`` (seeded, float64, eval mode) with its data."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.build().to(DT).eval()
    g = torch.Generator().manual_seed(1)
    _randomize_batchnorm(model, g)
    x = _inputs(arch, N_TRAIN, g)
    with torch.no_grad():
        f = model(x)
    if arch.likelihood == "classification":
        y = torch.randint(0, arch.outputs, (N_TRAIN,), generator=g)
    else:
        y = f + SIGMA * torch.randn(f.shape, generator=g, dtype=DT)
    batches, start = [], 0
    for s in SIZES:
        batches.append((x[start:start + s], y[start:start + s]))
        start += s
    return Case(arch, model, x, y, batches, _inputs(arch, N_TEST, g))


# ------------------------------------------------------------------------------------------
# dense references
# ------------------------------------------------------------------------------------------
def jacobian(params: ParamSet, x: Tensor) -> Tensor:
    """``J`` ``(B, C, P)`` of the network outputs w.r.t. the set's flat vector (jacrev)."""
    jac = torch.func.jacrev(lambda v: params.functional_call(v, x))(params.vector())
    jac = jac.detach()  # parameters outside the set still carry requires_grad
    return jac.unsqueeze(1) if jac.dim() == 2 else jac


def dense_ggn(params: ParamSet, likelihood: str, x: Tensor) -> Tensor:
    r""":math:`\sum_n J_n^\top H_n J_n` over the inputs ``x`` (unit noise for regression)."""
    lik = get_likelihood(likelihood)
    jac = jacobian(params, x)
    with torch.no_grad():
        f = params.model(x)
    f = f if f.dim() == 2 else f.unsqueeze(-1)
    return torch.einsum("ncp,ncd,ndq->pq", jac, lik.hessian(f), jac)


def log_likelihood(model: nn.Module, likelihood: str, x: Tensor, y: Tensor,
                   sigma: Tensor | float = 1.0) -> Tensor:
    r""":math:`\log p(D|\theta^*)`, differentiable in the observation noise ``sigma``."""
    with torch.no_grad():
        f = model(x)
    if likelihood == "classification":
        return -torch.nn.functional.cross_entropy(f, y, reduction="sum")
    sigma = torch.as_tensor(sigma, dtype=DT)
    n = f.numel()
    return (-0.5 * ((f - y) ** 2).sum() / sigma**2 - n * torch.log(sigma)
            - 0.5 * n * math.log(2 * math.pi))


def layer_of(params: ParamSet) -> Tensor:
    """``(P,)`` index of the module (in :meth:`ParamSet.modules` order) of every entry."""
    idx = torch.empty(params.numel, dtype=torch.long)
    for layer, (_, _, owned) in enumerate(params.modules()):
        for _, i in owned:
            idx[params.slice_of(i)] = layer
    return idx


def rel_err(got: Tensor, ref: Tensor) -> float:
    """Largest absolute deviation relative to the largest reference entry."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
