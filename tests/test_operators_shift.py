"""Operator uncertainty at its edges (issue 29): input validation in the user's terms, the
validation-NLL tuning of prior and noise together, the all-weights posterior that sees an
input it was not trained on, the spectral skip resampling of split neuralop layers, and the
closed-form heat-equation data."""

from __future__ import annotations

import math

import pytest
import torch

import bayescurv
from bayescurv.data import pde
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.operators import (
    FNO,
    FlattenOutput,
    OperatorGP,
    evaluate,
    neuralop_support,
    tune_prior_precision,
)

DT = torch.float64
# neuraloperator is a test dependency (`make test` installs neuraloperator==2.0.0 with the
# reference libraries): its tests here run, and fail loudly if it is missing, never skip.


def _neuralop(in_channels=2, dim=1):
    from neuralop.models import FNO as NeuralopFNO

    torch.manual_seed(0)
    return neuralop_support.split_complex(NeuralopFNO(
        n_modes=(4,) * dim, hidden_channels=4, in_channels=in_channels, out_channels=1,
        n_layers=2))


# ------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------
def test_our_fno_reports_the_whole_batch():
    gp = OperatorGP.isotropic(FNO(2, 1, 4, width=4, depth=2), "all", 1.0)
    with pytest.raises(ShapeError, match=r"got shape \(3, 3, 16\) \(batch 3, 1 grid dims and "
                                         r"3 channels\)"):
        gp.variance(torch.randn(3, 3, 16))


def test_neuralop_channels_and_grid_dims_in_the_users_terms():
    model = _neuralop()
    gp = OperatorGP.isotropic(model, "all", 1.0)
    # wrong channel count: the message counts the user's channels (2), not 2 + grid channel
    with pytest.raises(ShapeError, match=r"expects inputs \(batch, 2, \*grid\).*3 channels.*"
                                         r"appended by the operator"):
        gp.mean(torch.randn(3, 3, 16))
    with pytest.raises(ShapeError, match=r"1 grid dim\(s\); got shape \(3, 2, 16, 16\)"):
        gp.variance(torch.randn(3, 2, 16, 16))
    with pytest.raises(ShapeError, match="batch 5"):
        FlattenOutput(model)(torch.randn(5, 1, 16))


def test_neuralop_fine_grid_passes_through_and_is_closer_to_the_truth():
    """Spectral skip resampling: on a band-limited input, the 2x-finer prediction of a split
    neuralop FNO passes through the coarse one; neuralop's linear resampling does not."""
    model = _neuralop().double()
    a = pde.heat(4, 32, dtype=DT).a
    coarse = model(a)
    fine = model(a, output_shape=(64,))
    torch.testing.assert_close(fine[..., ::2], coarse, rtol=1e-9, atol=1e-10)
    for conv in model.fno_blocks.convs:
        conv.spectral_transform = False
    linear = model(a, output_shape=(64,))
    assert (linear[..., ::2] - coarse).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------
# the noise level from the validation NLL, not by hand
# ------------------------------------------------------------------------------------------
def _noisy_operator_data(sigma, n, seed):
    torch.manual_seed(0)
    model = FNO(1, 1, 4, width=4, depth=2).double()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 1, 16, generator=g, dtype=DT)
    with torch.no_grad():
        u = model(a) + sigma * torch.randn(n, 1, 16, generator=g, dtype=DT)
    return model, a, u


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_val_nll_tunes_sigma_noise_to_the_true_noise(sigma):
    """Targets = the network at θ* plus noise σ: starting from a wrong σ = 1, the tuned
    predictive variance matches σ² and covers 95 % of held-out targets."""
    model, a, u = _noisy_operator_data(sigma, 90, seed=1)
    flat = FlattenOutput(model)
    la = bayescurv.Laplace(flat, "regression", subset="all", structure="diag", sigma_noise=1.0)
    la.fit([(a[:30], u[:30].flatten(1))], progress=False)
    tune_prior_precision(la, "val_nll", val=(a[30:60], u[30:60]), tune_sigma_noise=True)
    # the NLL fixes the total variance; the epistemic part takes a share of the noise
    assert 0.75 * sigma < float(la.sigma_noise) < 1.1 * sigma
    gp = OperatorGP.from_laplace(la)
    mean, var = gp.predict(a[60:])
    assert 0.75 < float(var.mean()) / sigma**2 < 1.35
    cov = evaluate(mean, var, u[60:])["coverage95"]
    assert 0.90 < cov < 0.99


def test_val_nll_without_sigma_keeps_sigma():
    model, a, u = _noisy_operator_data(0.1, 40, seed=2)
    la = bayescurv.Laplace(FlattenOutput(model), "regression", subset="all", structure="diag",
                           sigma_noise=0.7)
    la.fit([(a[:20], u[:20].flatten(1))], progress=False)
    tune_prior_precision(la, "val_nll", val=(a[20:], u[20:]))
    assert float(la.sigma_noise) == pytest.approx(0.7)
    with pytest.raises(InvalidArgumentError, match="val_nll"):
        tune_prior_precision(la, "val_nll", tune_sigma_noise=True)


# ------------------------------------------------------------------------------------------
# a posterior over all weights sees an input channel that training never used
# ------------------------------------------------------------------------------------------
def test_all_weights_posterior_sees_a_source_shift_last_block_does_not():
    data = pde.heat(40, 16, dtype=DT, modes=(1, 3))
    shifted = pde.heat(20, 16, variant="source", dtype=DT, modes=(1, 3), seed=1)
    torch.manual_seed(0)
    model = FNO(2, 1, 4, width=4, depth=2).double()
    flat = FlattenOutput(model)
    with torch.no_grad():
        u = model(data.a)  # targets = the network itself: θ* is the MAP of any prior's limit
    ratios = {}
    for name, subset in (("all", "all"), ("last", [f"operator.{model.last_block}"])):
        la = bayescurv.Laplace(flat, "regression", subset=subset, structure="diag",
                               sigma_noise=0.01, prior_precision=1.0)
        la.fit([(data.a, u.flatten(1))], progress=False)
        gp = OperatorGP.from_laplace(la)
        ratios[name] = float(gp.variance(shifted.a).mean().sqrt()
                             / gp.variance(data.a).mean().sqrt())
    assert ratios["all"] > 3.0 * ratios["last"]
    assert ratios["all"] > 3.0


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def test_heat_is_the_closed_form_solution():
    d = pde.heat(3, 32, variant="source", dtype=DT, diffusivity=1e-3, t_final=0.5)
    u0, s = d.a[:, 0], d.a[:, 1]
    k = torch.fft.rfftfreq(32, 1 / 32).to(DT)
    lam = 1e-3 * (2 * math.pi * k) ** 2
    # u(T) solves u_t = ν u_xx + s: check by the ODE per mode, integrated by many RK4 steps
    uh, sh = torch.fft.rfft(u0), torch.fft.rfft(s)
    h = 0.5 / 400
    for _ in range(400):
        f = lambda v: -lam * v + sh  # noqa: E731
        k1 = f(uh)
        k2 = f(uh + h / 2 * k1)
        k3 = f(uh + h / 2 * k2)
        k4 = f(uh + h * k3)
        uh = uh + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(d.u[:, 0], torch.fft.irfft(uh, n=32), rtol=1e-9, atol=1e-9)
    fine = pde.heat(3, 32, variant="source", dtype=DT, diffusivity=1e-3, t_final=0.5,
                    out_size=64)
    torch.testing.assert_close(fine.u[..., ::2], d.u)
    freq = pde.heat(3, 64, variant="frequency", dtype=DT)
    spec = torch.fft.rfft(freq.a[:, 0]).abs()
    assert spec[:, :10].max() < 1e-9 * spec.max() and spec[:, 10:25].min() > 0
    with pytest.raises(InvalidArgumentError, match="variant"):
        pde.heat(2, 16, variant="nope")
