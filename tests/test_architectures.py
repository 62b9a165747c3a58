"""The architecture matrix of issue 11: every structure and subset on the networks users
bring, against dense float64 algebra of the *same* posterior precision.

Architectures (``tests/architectures.py``): MLP; CNN (Conv2d with bias, BatchNorm2d in eval
mode, max and average pooling, Linear head); Conv1d and Conv3d nets with bias; a self-attention
block from ``nn.Linear`` q/k/v/o projections with a residual and LayerNorm on ``(B, T, D)``;
``nn.Embedding`` into a per-position Linear and mean pooling; ``nn.MultiheadAttention``
(refused by name with the opt-in fallback; the last layer alone is a plain Linear). Three
regression cases (MLP, attention, CNN) beside the classification ones.

Checks, with ``Λ = la.posterior_precision.to_dense()`` and ``J`` from ``torch.func.jacrev``
over ``la.params``:

- ``functional``: mean ``f(x)``, marginal and joint ``J Λ⁻¹ Jᵀ`` (exact: relative 1e-8);
- ``functional_samples``: covariance of many draws, z-scores from the sample size;
- ``sample``: draws whitened by the Cholesky factor of ``Λ`` have identity covariance;
- ``log_marginal_likelihood`` and its gradient in the prior precision (scalar and per
  layer) and in the noise, against autograd of the dense formula;
- curvature: ``full`` = dense GGN, ``diag`` (and the diagonal of ``diag+lowrank``) = its
  diagonal, ``lowrank`` below the GGN in Loewner order and exact at full rank, EKFAC's
  eigenvalues = the GGN's diagonal in the K-FAC eigenbasis, and K-FAC / K-FAC-reduce / EKFAC
  = the GGN's layer blocks where theory makes them exact (one datum; deep linear nets with a
  per-position loss for expand, with pooling for reduce).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from architectures import (
    ARCHS,
    DT,
    SIGMA,
    case,
    dense_ggn,
    jacobian,
    layer_of,
    log_likelihood,
    rel_err,
)
from torch import nn

from bayescurv import Laplace
from bayescurv.linalg import BlockDiagonal, KroneckerEigen, LowRankPlusDiagonal

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning")  # torch.func references through SDPA

STRUCTURES = ("full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank", "diag+lowrank")
SUBSETS = ("all", "last_layer")
PRIOR = 0.5
EXACT = 1e-8  # relative error where the algebra is exact in float64

MATRIX = [
    pytest.param(arch, structure, subset, id=f"{arch}-{structure}-{subset}")
    for arch in ARCHS
    for structure in STRUCTURES
    for subset in SUBSETS
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine spinning
    thread pools make this module many times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def fitted(arch: str, structure: str, subset: str, unknown_layers: str = "error") -> Laplace:
    """A fitted posterior of the case (cached; tests only read it)."""
    c = case(arch)
    sigma = SIGMA if c.arch.likelihood == "regression" else 1.0
    return Laplace(c.model, c.arch.likelihood, subset=subset, structure=structure,
                   prior_precision=PRIOR, sigma_noise=sigma,
                   unknown_layers=unknown_layers).fit(c.batches, progress=False)


def dense_functional(la: Laplace, x: torch.Tensor) -> torch.Tensor:
    """``J Λ⁻¹ Jᵀ`` as ``(B, C, B, C)`` from the dense posterior precision."""
    jac = jacobian(la.params, x)
    b, c, p = jac.shape
    flat = jac.reshape(b * c, p)
    lam = la.posterior_precision.to_dense()
    return (flat @ torch.linalg.solve(lam, flat.T)).reshape(b, c, b, c)


def marginal(joint: torch.Tensor) -> torch.Tensor:
    """Per-input ``(B, C, C)`` blocks of a ``(B, C, B, C)`` covariance."""
    return torch.diagonal(joint, dim1=0, dim2=2).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------
# the linearized predictive
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,structure,subset", MATRIX)
def test_functional(arch, structure, subset):
    c = case(arch)
    la = fitted(arch, structure, subset)
    ref = dense_functional(la, c.x_test)
    b, k = ref.shape[:2]
    mean, cov = la.functional(c.x_test)
    with torch.no_grad():
        torch.testing.assert_close(mean, c.model(c.x_test), rtol=1e-12, atol=1e-12)
    assert cov.shape == (b, k, k)
    err = rel_err(cov, marginal(ref))
    assert err < EXACT, f"marginal J Σ Jᵀ: relative error {err:.3g}"
    mean_j, joint = la.functional(c.x_test, joint=True)
    torch.testing.assert_close(mean_j, mean, rtol=0, atol=0)
    assert joint.shape == (b * k, b * k)
    err = rel_err(joint, ref.reshape(b * k, b * k))
    assert err < EXACT, f"joint J Σ Jᵀ (input-major): relative error {err:.3g}"


@pytest.mark.parametrize("arch,structure,subset", MATRIX)
def test_functional_samples(arch, structure, subset):
    """Empirical mean and covariance of joint draws vs ``f(x)`` and the dense ``J Σ Jᵀ``,
    entry by entry in units of their sampling standard deviation."""
    c = case(arch)
    la = fitted(arch, structure, subset)
    n = 50_000
    draws = la.functional_samples(c.x_test, num_samples=n,
                                  generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        f = c.model(c.x_test)
    assert draws.shape == (n, *f.shape)
    ref = dense_functional(la, c.x_test).reshape(f.numel(), f.numel())
    e = (draws - f).reshape(n, -1)
    var = ref.diagonal()
    z_mean = e.mean(0) / (var / n).sqrt()
    assert z_mean.abs().max() < 6, f"sample mean off by {z_mean.abs().max():.1f} std"
    emp = e.T @ e / n
    std = ((torch.outer(var, var) + ref**2) / n).sqrt()
    z = (emp - ref) / std
    assert z.abs().max() < 6, (
        f"sample covariance off by {z.abs().max():.1f} std (relative "
        f"{rel_err(emp, ref):.3g})")
    assert z.square().mean() < 3


# ------------------------------------------------------------------------------------------
# parameter samples
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,structure,subset", MATRIX)
def test_sample(arch, structure, subset):
    """``la.sample``: mean θ*, and draws whitened by the Cholesky factor ``L`` of ``Λ``
    (``Lᵀ(θ - θ*)`` has identity covariance) pass entrywise and aggregate checks."""
    la = fitted(arch, structure, subset)
    torch.testing.assert_close(la.mean, la.params.vector(), rtol=0, atol=0)
    n = 8000
    theta = la.sample(n, generator=torch.Generator().manual_seed(11))
    p = la.num_params
    assert theta.shape == (n, p)
    chol = torch.linalg.cholesky(la.posterior_precision.to_dense())
    z = (theta - la.mean) @ chol
    z_mean = z.mean(0) * math.sqrt(n)
    assert z_mean.abs().max() < 6, f"sample mean off by {z_mean.abs().max():.1f} std"
    dev = z.T @ z / n - torch.eye(p, dtype=DT)
    worst = (dev * math.sqrt(n) / (1 + torch.eye(p, dtype=DT)).sqrt()).abs().max()
    assert worst < 6.5, f"whitened covariance entry off by {worst:.1f} std"
    ratio = dev.square().sum() / (p * (p + 1) / n)  # 1 in expectation
    assert ratio < 1 + 6 * math.sqrt(4 / (p * (p + 1))) + 0.05, f"‖cov - I‖² ratio {ratio:.3f}"


# ------------------------------------------------------------------------------------------
# evidence
# ------------------------------------------------------------------------------------------
def dense_logml(la: Laplace, arch: str, prior: torch.Tensor, sigma) -> torch.Tensor:
    r""":math:`\log p(D|\theta^*) - \frac12\sum\delta\theta^{*2} + \frac12\sum\log\delta
    - \frac12\log\det(H/\sigma^2 + diag\,\delta)`, ``H = la.curvature.to_dense()``."""
    c = case(arch)
    theta = la.params.vector()
    delta = prior.expand(theta.numel()) if prior.dim() == 0 else (
        prior[layer_of(la.params)] if prior.numel() != theta.numel() else prior)
    h = la.curvature.to_dense()
    if c.arch.likelihood == "regression":
        h = h / sigma**2
    lam = h + torch.diag(delta)
    return (log_likelihood(c.model, c.arch.likelihood, c.x, c.y, sigma)
            - 0.5 * (delta * theta**2).sum() + 0.5 * delta.log().sum()
            - 0.5 * torch.logdet(lam))


def value_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Error of a log evidence relative to ``max(1, |ref|)``."""
    return abs((got - ref).item()) / max(1.0, abs(ref.item()))


@pytest.mark.parametrize("arch,structure,subset", MATRIX)
def test_log_marginal_likelihood(arch, structure, subset):
    c = case(arch)
    la = fitted(arch, structure, subset)
    regression = c.arch.likelihood == "regression"
    sigma0 = SIGMA if regression else 1.0
    # the posterior precision is curvature / σ² + prior
    h = la.curvature.to_dense() / sigma0**2
    err = rel_err(la.posterior_precision.to_dense(), h + PRIOR * torch.eye(la.num_params, dtype=DT))
    assert err < 1e-12, f"posterior precision ≠ H/σ² + δI: {err:.3g}"
    ref = dense_logml(la, arch, torch.tensor(PRIOR, dtype=DT), sigma0)
    got = la.log_marginal_likelihood()
    assert value_err(got, ref) < 1e-9, (float(got), float(ref))

    num_layers = int(layer_of(la.params).max()) + 1
    g = torch.Generator().manual_seed(5)
    priors = {"scalar": torch.tensor(2.0, dtype=DT),
              "layer": 0.2 + 3 * torch.rand(num_layers, generator=g, dtype=DT)}
    for label, value in priors.items():
        p_got = value.clone().requires_grad_(True)
        p_ref = value.clone().requires_grad_(True)
        s_got = torch.tensor(0.55, dtype=DT, requires_grad=True) if regression else None
        s_ref = torch.tensor(0.55, dtype=DT, requires_grad=True) if regression else 1.0
        got = la.log_marginal_likelihood(p_got, s_got)
        ref = dense_logml(la, arch, p_ref, s_ref)
        assert value_err(got, ref) < 1e-9, (label, float(got), float(ref))
        inputs_got = [p_got] + ([s_got] if regression else [])
        inputs_ref = [p_ref] + ([s_ref] if regression else [])
        grads_got = torch.autograd.grad(got, inputs_got)
        grads_ref = torch.autograd.grad(ref, inputs_ref)
        for gg, gr, what in zip(grads_got, grads_ref, ("prior", "sigma")):
            err = rel_err(gg, gr)
            assert err < EXACT, f"{label} prior: d/d{what} relative error {err:.3g}"


# ------------------------------------------------------------------------------------------
# curvature against the dense GGN
# ------------------------------------------------------------------------------------------
@functools.cache
def ggn(arch: str, subset: str) -> torch.Tensor:
    c = case(arch)
    return dense_ggn(fitted(arch, "diag", subset).params, c.arch.likelihood, c.x)


CURVATURE = [
    pytest.param(arch, structure, subset, id=f"{arch}-{structure}-{subset}")
    for arch in ARCHS
    for structure in ("full", "diag", "diag+lowrank", "lowrank", "ekfac")
    for subset in SUBSETS
]


@pytest.mark.parametrize("arch,structure,subset", CURVATURE)
def test_curvature_against_dense_ggn(arch, structure, subset):
    la = fitted(arch, structure, subset)
    ref = ggn(arch, subset)
    h = la.curvature
    dense = h.to_dense()
    scale = ref.abs().max()
    if structure == "full":
        err = rel_err(dense, ref)
        assert err < EXACT, f"full vs dense GGN: {err:.3g}"
    elif structure in ("diag", "diag+lowrank"):
        err = rel_err(h.diagonal(), ref.diagonal())
        assert err < EXACT, f"diagonal vs dense GGN diagonal: {err:.3g}"
        if structure == "diag":
            assert (dense - torch.diag(dense.diagonal())).abs().max() == 0
        else:
            assert isinstance(h, LowRankPlusDiagonal)
            low = (h.U * h.s) @ h.U.T
            assert torch.linalg.eigvalsh(ref - low).min() > -1e-10 * scale
    elif structure == "lowrank":
        # a streamed truncated eigendecomposition: PSD and below the GGN (Loewner order)
        assert torch.linalg.eigvalsh(dense).min() > -1e-10 * scale
        assert torch.linalg.eigvalsh(ref - dense).min() > -1e-10 * scale
    else:  # ekfac: eigenvalues = diagonal of the exact GGN block in the K-FAC eigenbasis
        assert isinstance(h, BlockDiagonal)
        worst = 0.0
        for block, idx in zip(h.blocks, h.indices):
            exact = ref[idx[:, None], idx[None, :]]
            if isinstance(block, KroneckerEigen):
                q = torch.kron(block.QA, block.QB)
                rotated = torch.diagonal(q.T @ exact @ q).reshape(block.eigenvalues.shape)
                worst = max(worst, rel_err(block.eigenvalues, rotated) * float(
                    rotated.abs().max() / scale))
            else:
                worst = max(worst, rel_err(block.to_dense(), exact) * float(
                    exact.abs().max() / scale))
        assert worst < EXACT, f"EKFAC eigenvalues vs rotated GGN: {worst:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_lowrank_exact_at_full_rank(arch):
    """With ``rank >= N * C`` (all non-zero eigenpairs kept) ``lowrank`` is the GGN."""
    c = case(arch)
    ref = ggn(arch, "all")
    rank = min(len(c.x) * c.arch.outputs, ref.shape[0])
    la = Laplace(c.model, c.arch.likelihood, structure="lowrank", rank=rank,
                 prior_precision=PRIOR).fit(c.batches, progress=False)
    err = rel_err(la.curvature.to_dense(), ref)
    assert err < EXACT, f"lowrank at rank {rank} vs dense GGN: {err:.3g}"


# K-FAC where it is exact ---------------------------------------------------------------------
class MeanT(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _exact_case(name: str):
    """``(model, x, y, likelihood, structures)`` where K-FAC is exact by theory."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if name == "mlp-one-datum":  # no weight sharing, a single datum: G ⊗ A is the block
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(1, 5, generator=g, dtype=DT)
        y = torch.tensor([1])
        return model.to(DT), x, y, "classification", ("kfac", "kfac-reduce", "ekfac")
    if name == "cnn-one-datum-last-layer":  # BN + pooling below a plain Linear head
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(),
                              nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)).to(DT).eval()
        x = torch.randn(1, 1, 6, 6, generator=g, dtype=DT)
        return model, x, torch.tensor([2]), "classification", ("kfac", "kfac-reduce", "ekfac")
    if name == "deep-linear-sequence":  # per-position loss: expand is exact
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2),
                              nn.Flatten())
        x = torch.randn(12, 5, 4, generator=g, dtype=DT)
        return model.to(DT), x, torch.randn(12, 10, generator=g, dtype=DT), "regression", (
            "kfac", "ekfac")
    if name == "deep-linear-pooled":  # pooling before the loss: reduce is exact
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), MeanT(), nn.Linear(3, 2))
        x = torch.randn(12, 5, 4, generator=g, dtype=DT)
        return model.to(DT), x, torch.randn(12, 2, generator=g, dtype=DT), "regression", (
            "kfac-reduce",)
    if name == "deep-linear-conv1d":  # conv k=3 then a 1x1 conv, per-position outputs
        model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(3, 2, 1), nn.Flatten())
        x = torch.randn(12, 2, 6, generator=g, dtype=DT)
        return model.to(DT), x, torch.randn(12, 12, generator=g, dtype=DT), "regression", (
            "kfac", "ekfac")
    raise ValueError(name)


EXACT_CASES = [
    pytest.param(name, structure, subset, id=f"{name}-{structure}-{subset}")
    for name in ("mlp-one-datum", "cnn-one-datum-last-layer", "deep-linear-sequence",
                 "deep-linear-pooled", "deep-linear-conv1d")
    for structure in _exact_case(name)[4]
    for subset in (("last_layer",) if name.endswith("last-layer") else SUBSETS)
]


@pytest.mark.parametrize("name,structure,subset", EXACT_CASES)
def test_kfac_exact_against_dense_ggn(name, structure, subset):
    model, x, y, lik, _ = _exact_case(name)
    la = Laplace(model, lik, subset=subset, structure=structure,
                 prior_precision=PRIOR).fit([(x[:7], y[:7]), (x[7:], y[7:])], progress=False)
    ref = dense_ggn(la.params, lik, x)
    layer = layer_of(la.params)
    mask = layer[:, None] == layer[None, :]
    err = rel_err(la.curvature.to_dense(), ref * mask)
    assert err < EXACT, f"{structure} vs the GGN's layer blocks: {err:.3g}"
    # and the predictive of that (exact) posterior
    ref_f = dense_functional(la, x[:3])
    _, joint = la.functional(x[:3], joint=True)
    err = rel_err(joint, ref_f.reshape(joint.shape))
    assert err < EXACT, f"joint J Σ Jᵀ: {err:.3g}"


# ------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ------------------------------------------------------------------------------------------
# Supported natively (bayescurv.curvature.attention): in the main matrix above with every
# structure and subset; layouts, masks, TransformerEncoderLayer and refusals in
# tests/test_attention.py.


def test_multihead_attention_out_proj_alone():
    """``mha.out_proj`` is an ``nn.Linear`` subclass that MHA never *calls* (its weight
    enters ``F.multi_head_attention_forward`` directly), so forward hooks see nothing: a
    posterior over it alone must be right (the engine recomputes the attention and calls
    ``out_proj`` itself)."""
    c = case("mha")
    la = Laplace(c.model, "classification", subset=["mha.out_proj", "head"],
                 structure="full", prior_precision=PRIOR).fit(c.batches, progress=False)
    err = rel_err(la.curvature.to_dense(), dense_ggn(la.params, "classification", c.x))
    assert err < EXACT, f"full vs dense GGN over mha.out_proj + head: {err:.3g}"
