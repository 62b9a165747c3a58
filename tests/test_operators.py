"""Neural operators as function-valued GPs (bayescurv.operators) and the PDE generators
(bayescurv.data.pde), against closed forms and dense float64 torch.func references."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bayescurv
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.data import pde
from bayescurv.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    UnsupportedLayerError,
)
from bayescurv.operators import (
    FNO,
    FlattenOutput,
    OperatorGP,
    SpectralConv,
    fourier_resample,
    mode_weights,
    neuralop_support,
    tune_prior_precision,
)
from bayescurv.params import select

DT = torch.float64
needs_neuralop = pytest.mark.skipif(not neuralop_support.available(),
                                    reason="neuraloperator is not installed (extra 'operators')")


def _fno(dim: int = 1, seed: int = 0) -> FlattenOutput:
    torch.manual_seed(seed)
    modes = 4 if dim == 1 else (3, 3)
    return FlattenOutput(FNO(1, 1, modes, width=4, depth=2, dim=dim, hidden=6).to(DT))


def _inputs(n: int, grid: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, *grid, generator=g, dtype=DT)


def _dense_jacobian(flat: nn.Module, pset, a: torch.Tensor, out_size=None) -> torch.Tensor:
    """``(B, C, P)`` by jacrev over the whole batch (float64 ground truth)."""
    theta = pset.vector()
    return torch.func.jacrev(lambda t: pset.functional_call(t, a, out_size=out_size))(theta)


# ------------------------------------------------------------------------------------------
# spectral layers and the FNO
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid,fine", [(1, (16,), (40,)), (2, (12, 10), (24, 15))])
def test_spectral_conv_is_resolution_invariant(dim, grid, fine):
    torch.manual_seed(0)
    conv = SpectralConv(2, 3, 4 if dim == 1 else (3, 4), dim).to(DT)
    a = torch.randn(2, 2, *grid, dtype=DT)
    # the output on the fine grid is the same trigonometric polynomial: the forward pass on
    # the band-limited interpolant of the input, and the interpolant of the coarse output
    direct = conv(a, out_size=fine)
    torch.testing.assert_close(direct, conv(fourier_resample(a, fine, dim)))
    torch.testing.assert_close(direct, fourier_resample(conv(a), fine, dim))


def test_fourier_resample_interpolates_and_inverts():
    v = _inputs(3, (16, 12))[:, 0]
    up = fourier_resample(v, (32, 24), 2)
    torch.testing.assert_close(up[:, ::2, ::2], v)
    torch.testing.assert_close(fourier_resample(up, (16, 12), 2), v)


def test_fno_shapes_and_errors():
    fno = _fno(2).operator
    a = _inputs(2, (12, 12))
    assert fno(a).shape == (2, 1, 12, 12)
    assert fno(a, out_size=(20, 16)).shape == (2, 1, 20, 16)
    with pytest.raises(ShapeError):
        fno(a[:, 0])
    with pytest.raises(ShapeError, match="finer"):
        fno(_inputs(1, (4, 4)))
    with pytest.raises(InvalidArgumentError):
        FNO(1, 1, 4, dim=3)


def test_spectral_conv_is_accepted_by_the_engine_without_opt_in():
    flat = _fno(1)
    a = _inputs(3, (16,))
    y = flat(a).detach()
    curv = bayescurv.compute(flat, "regression", [(a, y)], structure="diag",
                             subset=["operator.blocks.1.spectral"])
    assert curv.matrix.size == 2 * 4 * 4 * 4


# ------------------------------------------------------------------------------------------
# curvature and predictive of the last block against dense torch.func references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2])
def test_last_block_curvature_matches_dense(dim, dense_reference):
    flat = _fno(dim)
    grid = (12,) if dim == 1 else (8, 8)
    a = _inputs(4, grid)
    y = flat(a).detach() + 0.1 * _inputs(4, grid, seed=2).flatten(1)
    data = [(a[:3], y[:3]), (a[3:], y[3:])]
    subset = ["operator.blocks.1"]
    pset = select(flat, subset)
    ggn = dense_reference(flat, "regression", data, pset)
    full = bayescurv.compute(flat, "regression", data, structure="full", subset=subset)
    torch.testing.assert_close(full.matrix.to_dense(), ggn)
    diag = bayescurv.compute(flat, "regression", data, structure="diag", subset=subset)
    torch.testing.assert_close(diag.matrix.diagonal(), ggn.diagonal())
    v = torch.randn(pset.numel, 3, dtype=DT)
    op = CurvatureLinearOperator(flat, "regression", data, subset=pset)
    torch.testing.assert_close(op @ v, ggn @ v)
    rank = min(pset.numel, 4 * y.shape[1])  # N * C columns: the sqrt route is exact
    low = bayescurv.compute(flat, "regression", data[:1] + data[1:], structure="lowrank",
                            subset=subset, rank=rank)
    torch.testing.assert_close(low.matrix.to_dense(), ggn, atol=1e-9, rtol=1e-7)


def test_spectral_weights_are_an_exact_dense_block_in_kfac(dense_reference):
    flat = _fno(1)
    a = _inputs(3, (12,))
    data = [(a, flat(a).detach())]
    subset = ["operator.blocks.1.spectral"]
    kfac = bayescurv.compute(flat, "regression", data, structure="kfac", subset=subset)
    torch.testing.assert_close(kfac.matrix.to_dense(),
                               dense_reference(flat, "regression", data, select(flat, subset)))


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank", "diag+lowrank"])
def test_operator_gp_matches_dense_predictive(structure):
    flat = _fno(1)
    a = _inputs(5, (12,))
    y = flat(a).detach() + 0.1 * _inputs(5, (12,), seed=3).flatten(1)
    la = bayescurv.Laplace(flat, "regression", subset=["operator.blocks.1"],
                           structure=structure, prior_precision=0.5, sigma_noise=0.2, rank=8)
    la.fit([(a, y)], progress=False)
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    gp = OperatorGP.from_laplace(la)
    test = _inputs(2, (12,), seed=4)
    for out_size in (None, 20):
        jac = _dense_jacobian(la.model, la.params, test, out_size)
        cov = torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac)
        torch.testing.assert_close(gp.covariance(test, out_size), cov)
        torch.testing.assert_close(gp.variance(test, out_size).flatten(1),
                                   cov.diagonal(dim1=-2, dim2=-1))
    # the library's own linearized predictive agrees on the training grid
    _, la_cov = la.functional(test)
    jac = _dense_jacobian(la.model, la.params, test)
    torch.testing.assert_close(la_cov, torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac))
    mean, var = gp.predict(test)
    torch.testing.assert_close(var, gp.variance(test) + 0.04)
    lr = gp.lowrank_covariance(test, rank=24)
    torch.testing.assert_close(lr[0].to_dense(), gp.covariance(test)[0])


def test_predictive_mean_on_a_new_grid_is_the_forward_at_that_resolution():
    flat = _fno(1)
    a = _inputs(4, (16,))
    gp = OperatorGP.isotropic(flat, ["operator.blocks.1"], variance=0.3)
    for size in (16, 32, 50):
        torch.testing.assert_close(gp.mean(a, size), flat.operator(a, out_size=size))
    # on a grid twice as fine, mean, variance and the samples of the same weight draws pass
    # through the coarse values (Fourier interpolation is exact at the original points)
    eps = gp.precision.sample_inverse(3, torch.Generator().manual_seed(0))
    coarse = gp.sample(a, 3, weights=eps)
    fine = gp.sample(a, 3, out_size=32, weights=eps)
    torch.testing.assert_close(fine[..., ::2], coarse)
    torch.testing.assert_close(gp.variance(a, 32)[..., ::2], gp.variance(a))


# ------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------
def _features(a: torch.Tensor, modes: int) -> torch.Tensor:
    r"""Closed-form features of a 1-in/1-out spectral layer, ``(B, n, 2m)``:
    :math:`\partial u(x)/\partial R_{re,k} = c_k Re(\hat a_k e_k(x))`,
    :math:`\partial u(x)/\partial R_{im,k} = -c_k Im(\hat a_k e_k(x))`."""
    n = a.shape[-1]
    ah = torch.fft.rfft(a[:, 0], norm="forward")[:, :modes]  # (B, m)
    x = torch.arange(n, dtype=DT) / n
    e = torch.exp(2j * math.pi * torch.arange(modes, dtype=DT)[:, None] * n * x / n)
    z = ah[:, :, None] * e * mode_weights(n, modes)[:, None]  # (B, m, n)
    return torch.cat([z.real, -z.imag], 1).transpose(1, 2)


def test_linear_spectral_layer_laplace_is_the_closed_form_gp():
    n, modes, delta, sigma = 16, 5, 2.0, 0.3
    torch.manual_seed(0)
    flat = FlattenOutput(SpectralConv(1, 1, modes).to(DT))
    a, test = _inputs(6, (n,), seed=5), _inputs(3, (n,), seed=6)
    phi = _features(a, modes).reshape(-1, 2 * modes)
    y = (phi @ torch.randn(2 * modes, dtype=DT) + sigma * torch.randn(phi.shape[0], dtype=DT))
    # the MAP of Bayesian linear regression
    prec = phi.T @ phi / sigma**2 + delta * torch.eye(2 * modes, dtype=DT)
    theta = torch.linalg.solve(prec, phi.T @ y / sigma**2)
    pset = select(flat, "all")
    pset.assign(theta)
    torch.testing.assert_close(flat(a).reshape(-1), phi @ theta)  # features are exact
    la = bayescurv.Laplace(flat, "regression", subset="all", structure="full",
                           prior_precision=delta, sigma_noise=sigma)
    la.fit([(a, y.reshape(6, n))], progress=False)
    gp = OperatorGP.from_laplace(la)
    # function-space GP with kernel k = φᵀφ'/δ
    phis = _features(test, modes).reshape(-1, 2 * modes)
    k = phi @ phi.T / delta
    ks, kss = phis @ phi.T / delta, phis @ phis.T / delta
    gram = k + sigma**2 * torch.eye(k.shape[0], dtype=DT)
    mean = ks @ torch.linalg.solve(gram, y)
    cov = kss - ks @ torch.linalg.solve(gram, ks.T)
    torch.testing.assert_close(gp.mean(test).reshape(-1), mean)
    blocks = torch.stack([cov[i * n:(i + 1) * n, i * n:(i + 1) * n] for i in range(3)])
    torch.testing.assert_close(gp.covariance(test), blocks)
    # and the Laplace evidence of a linear-Gaussian model is the exact GP evidence
    exact = torch.distributions.MultivariateNormal(torch.zeros_like(y), gram).log_prob(y)
    torch.testing.assert_close(la.log_marginal_likelihood(), exact)


@pytest.mark.parametrize("dim", [1, 2])
def test_isotropic_spectral_variance_is_the_same_at_every_point(dim):
    torch.manual_seed(0)
    grid, modes = ((32,), 6) if dim == 1 else ((12, 10), (3, 4))
    conv = SpectralConv(2, 3, modes, dim).to(DT)
    var0 = 0.7
    gp = OperatorGP.isotropic(conv, "all", variance=var0)
    a = _inputs(2, grid).expand(2, 2, *grid).clone() + _inputs(2, grid, seed=9)
    var = gp.variance(a, out_size=tuple(2 * g for g in grid))
    flat = var.flatten(2)
    torch.testing.assert_close(flat, flat[..., :1].expand_as(flat))
    # closed form: σ² Σ_i Σ_k c_k² |â_i(k)|², the same for every output channel
    ah = torch.fft.rfftn(a, dim=tuple(range(-dim, 0)), norm="forward")
    if dim == 1:
        kept = ah[..., :modes]
        c = mode_weights(grid[0], modes)
    else:
        kept = torch.cat([ah[..., :modes[0], :modes[1]], ah[..., -modes[0]:, :modes[1]]], -2)
        c = mode_weights(grid[1], modes[1])
    expected = var0 * (c**2 * kept.abs().square()).flatten(1).sum(-1)
    torch.testing.assert_close(flat[:, 0, 0], expected)
    torch.testing.assert_close(flat[:, 1, 0], expected)


def test_monte_carlo_samples_converge_to_the_closed_form():
    flat = _fno(1)
    a = _inputs(6, (12,))
    y = flat(a).detach() + 0.1 * _inputs(6, (12,), seed=3).flatten(1)
    la = bayescurv.Laplace(flat, "regression", subset=["operator.blocks.1"], structure="lowrank",
                           prior_precision=1.0, sigma_noise=0.1, rank=10)
    la.fit([(a, y)], progress=False)
    gp = OperatorGP.from_laplace(la)
    test = _inputs(2, (12,), seed=7)
    n = 4000
    s = gp.sample(test, n, out_size=24, generator=torch.Generator().manual_seed(1))
    mean, var = gp.mean(test, 24), gp.variance(test, 24)
    se = (var / n).sqrt()
    assert ((s.mean(0) - mean).abs() <= 5 * se + 1e-12).all()
    rel = (s.var(0) - var).abs() / var
    assert rel.max() < 0.15 and rel.mean() < 0.05
    nl = gp.sample(test, 2, linearized=False, generator=torch.Generator().manual_seed(1))
    assert nl.shape == (2, 2, 1, 12)
    # n= is the deprecated name of num_samples (as Laplace.sample)
    g = torch.Generator().manual_seed(2)
    with pytest.warns(FutureWarning, match=r"OperatorGP.sample: n= is deprecated"):
        old = gp.sample(test, n=3, generator=g)
    new = gp.sample(test, num_samples=3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(old, new)


def test_prior_precision_by_marglik_and_validation_nll():
    flat = _fno(1)
    a = _inputs(8, (12,))
    y = flat(a).detach() + 0.1 * _inputs(8, (12,), seed=3).flatten(1)
    la = bayescurv.Laplace(flat, "regression", subset=["operator.blocks.1"], structure="lowrank",
                           sigma_noise=0.1, rank=6)
    la.fit([(a[:6], y[:6])], progress=False)
    grid = torch.logspace(-2, 2, 5)
    best = tune_prior_precision(la, "val_nll", val=(a[6:], y[6:]), grid=grid)
    nlls = []
    for g in grid:
        la.prior_precision = g
        m, v = OperatorGP.from_laplace(la).predict(a[6:])
        nlls.append(bayescurv.metrics.gaussian_nll(m.flatten(), v.flatten(), y[6:].flatten()))
    assert float(best) == pytest.approx(float(grid[int(torch.tensor(nlls).argmin())]))
    assert float(tune_prior_precision(la, "marglik", n_steps=20)) > 0
    with pytest.raises(InvalidArgumentError):
        tune_prior_precision(la, "val_nll")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operator_gp_stays_on_the_model_device():
    flat = _fno(1).cuda()
    a = _inputs(3, (12,)).cuda()
    y = flat(a).detach()
    la = bayescurv.Laplace(flat, "regression", subset=["operator.blocks.1"], structure="diag")
    la.fit([(a, y)], progress=False)
    gp = OperatorGP.from_laplace(la)
    for t in (gp.mean(a, 24), gp.variance(a, 24), gp.sample(a, 2), gp.covariance(a)):
        assert t.is_cuda


# ------------------------------------------------------------------------------------------
# neuralop
# ------------------------------------------------------------------------------------------
def _neuralop_fno(dim: int = 1, **kwargs):
    from neuralop.models import FNO as NeuralopFNO

    torch.manual_seed(0)
    modes = (6,) if dim == 1 else (4, 4)
    return NeuralopFNO(n_modes=modes, hidden_channels=4, in_channels=1, out_channels=1,
                       n_layers=2, **kwargs)


@needs_neuralop
@pytest.mark.parametrize("dim", [1, 2])
def test_neuralop_split_is_the_same_map_and_matches_dense(dim, dense_reference):
    model = _neuralop_fno(dim)
    grid = (16,) if dim == 1 else (10, 12)
    a = _inputs(3, grid).float()
    split = neuralop_support.split_complex(copy.deepcopy(model))
    torch.testing.assert_close(split(a), model(a))
    big = tuple(2 * g for g in grid)
    for conv in split.fno_blocks.convs:  # neuralop's own (linear) skip resampling
        conv.spectral_transform = False
    torch.testing.assert_close(split(a, output_shape=big), model(a, output_shape=big))
    for conv in split.fno_blocks.convs:
        del conv.spectral_transform  # back to the class default: spectral
    fine = split(a, output_shape=big)  # band-limited skip paths: passes through the coarse grid
    sl = (Ellipsis, *[slice(None, None, 2)] * dim)
    torch.testing.assert_close(fine[sl], split(a), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fine, model(a, output_shape=big), atol=1e-4)
    flat = FlattenOutput(split).to(DT)
    a = a.to(DT)
    y = flat(a).detach()
    subset = ["operator.fno_blocks.convs.1", "operator.fno_blocks.fno_skips.1"]
    pset = select(flat, subset)
    assert any("weight_imag" in n for n in pset.names)
    ggn = dense_reference(flat, "regression", [(a, y)], pset)
    full = bayescurv.compute(flat, "regression", [(a, y)], structure="full", subset=subset)
    torch.testing.assert_close(full.matrix.to_dense(), ggn)
    la = bayescurv.Laplace(flat, "regression", subset=subset, structure="diag",
                           sigma_noise=0.1)
    la.fit([(a, y)], progress=False)
    gp = OperatorGP.from_laplace(la)
    jac = _dense_jacobian(flat, pset, a[:1], big)
    var = (jac.square() * la.posterior_variance).sum(-1)
    torch.testing.assert_close(gp.variance(a[:1], big).flatten(1), var)
    merged = neuralop_support.merge_complex(split)
    assert merged.fno_blocks.convs[1].weight.tensor.is_complex()


@needs_neuralop
def test_neuralop_unsupported_factorization_is_refused_by_name():
    model = _neuralop_fno(1, factorization="tucker", rank=0.5)
    with pytest.raises(UnsupportedLayerError, match="tucker"):
        neuralop_support.split_complex(model)


# ------------------------------------------------------------------------------------------
# PDE data
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kwargs,grid,channels", [
    (pde.burgers, dict(size=64), (64,), 1),
    (pde.kuramoto_sivashinsky, dict(size=64, steps=20), (64,), 1),
    (pde.darcy, dict(size=16), (16, 16), 1),
    (pde.advection_diffusion_reaction, dict(size=16, steps=10), (16, 16), 4),
])
def test_pde_shapes_and_determinism(make, kwargs, grid, channels):
    d1, d2 = make(n=4, seed=3, **kwargs), make(n=4, seed=3, **kwargs)
    assert d1.a.shape == (4, channels, *grid) and d1.u.shape == (4, 1, *grid)
    assert d1.a.dtype == torch.float32 and torch.isfinite(d1.u).all()
    torch.testing.assert_close(d1.a, d2.a, rtol=0, atol=0)
    torch.testing.assert_close(d1.u, d2.u, rtol=0, atol=0)
    assert not torch.equal(d1.a, make(n=4, seed=4, **kwargs).a)
    train, test = d1.split(3)
    assert len(train) == 3 and len(test) == 1


def test_burgers_and_ks_conserve_the_mean_and_converge_in_time():
    b = pde.burgers(n=3, size=64, dtype=DT)
    torch.testing.assert_close(b.u.mean(-1), b.a.mean(-1))
    assert (b.u.square().mean(-1) < b.a.square().mean(-1)).all()  # viscous energy decay
    ref = pde.burgers(n=3, size=64, steps=2048, dtype=DT).u
    err = [(u - ref).abs().max() for u in
           (b.u, *(pde.burgers(n=3, size=64, steps=s, dtype=DT).u for s in (256, 512)))]
    assert err[0] < 1e-2 * ref.std() and err[1] / err[2] > 8  # fourth order in time
    with pytest.raises(NonFiniteError, match="more steps"):
        pde.burgers(n=3, size=128, steps=20)
    ks = pde.kuramoto_sivashinsky(n=3, size=64, steps=40, dtype=DT)
    torch.testing.assert_close(ks.u.mean(-1), ks.a.mean(-1), atol=1e-12, rtol=0)
    ks2 = pde.kuramoto_sivashinsky(n=3, size=64, steps=80, dtype=DT)
    assert (ks.u - ks2.u).abs().max() < 1e-3


def test_darcy_satisfies_the_discrete_equation():
    d = pde.darcy(n=2, size=12, dtype=DT)
    u, k = d.u[:, 0], d.a[:, 0]
    assert (u[:, 0] == 0).all() and (u[:, :, -1] == 0).all() and (u[:, 1:-1, 1:-1] > 0).all()
    assert set(k.unique().tolist()) <= {3.0, 12.0}
    h = 1 / 11
    res = torch.zeros_like(u[:, 1:-1, 1:-1])
    c = k[:, 1:-1, 1:-1]
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nb = k[:, 1 + di:11 + di, 1 + dj:11 + dj]
        face = 2 * c * nb / (c + nb) / h**2
        res += face * (u[:, 1:-1, 1:-1] - u[:, 1 + di:11 + di, 1 + dj:11 + dj])
    torch.testing.assert_close(res, torch.ones_like(res))


def test_advection_is_an_exact_translation_and_variants_differ():
    kw = dict(n=2, size=16, velocity=(1.0, 0.5), speed_range=(1.0, 1.0), diffusion=0.0,
              reaction=0.0, t_final=0.25, steps=5, dtype=DT)
    fwd = pde.advection_diffusion_reaction(**kw)
    torch.testing.assert_close(fwd.u, torch.roll(fwd.a[:, :1], (4, 2), (-2, -1)))
    rev = pde.advection_diffusion_reaction(variant="reversed", **kw)
    torch.testing.assert_close(rev.u, torch.roll(rev.a[:, :1], (-4, -2), (-2, -1)))
    torch.testing.assert_close(rev.a[:, 1:3], -fwd.a[:, 1:3])  # the velocity channels
    base = pde.advection_diffusion_reaction(n=2, size=16, steps=10, dtype=DT)
    src = pde.advection_diffusion_reaction(n=2, size=16, steps=10, variant="source", dtype=DT)
    assert (src.u.mean((-2, -1)) > base.u.mean((-2, -1))).all()
    assert (base.a[:, 3] == 0).all() and (src.a[:, 3] > 0).all()
    with pytest.raises(InvalidArgumentError):
        pde.advection_diffusion_reaction(variant="sideways")


# ------------------------------------------------------------------------------------------
# benchmark smoke test
# ------------------------------------------------------------------------------------------
def test_benchmark_smallest_configuration_runs():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "operators.py"
    spec = importlib.util.spec_from_file_location("bench_operators", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    rows = mod.run(mod.TINY)
    assert rows and all(math.isfinite(r["nll"]) for r in rows)
