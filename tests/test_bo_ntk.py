"""The network surrogate (``structure="ntk"``): the exact linearized GP in data or weight space,
checked against dense float64 references (``J`` from ``torch.func.jacrev``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.exceptions.errors import BotorchTensorDimensionError
from botorch.optim import optimize_acqf
from botorch.sampling import SobolQMCNormalSampler
from torch import nn
from torch.func import functional_call, jacrev

from bayescurv.bo import ConditionedLaplaceModel, LaplaceModel, train_map
from bayescurv.bo.features import FourierFeatures
from bayescurv.bo.ntk import Center, LinearizedGP, jacobian, prior_groups, tune
from bayescurv.errors import InvalidArgumentError
from bayescurv.params import select

DT = torch.float64
# the plain MLP on the raw inputs (the Fourier embedding, default for hidden=..., is tested below)
FAST = dict(hidden=(8, 8), steps=150, patience=50, refine_steps=30, marglik_steps=30,
            embedding=None)


def _data(n=12, d=2, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=DT)
    Y = torch.stack([torch.sin(3 * X).sum(-1) + k * X[:, 0] ** 2 for k in range(m)], -1)
    return X, Y


def _net(d=2, m=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, m)).to(DT)


def _dense_jac(net, x):
    ps = select(net, "all")
    names, shapes = ps.names, [p.shape for p in ps.params]
    sizes = [p.numel() for p in ps.params]

    def f(flat):
        return functional_call(net, {n: v.reshape(s) for n, v, s in
                                     zip(names, flat.split(sizes), shapes)}, (x,))

    J = jacrev(f)(ps.vector())
    return J.reshape(-1, ps.numel)


def test_prior_groups_ard_splits_the_first_layer_by_input():
    net = _net(d=3)
    ps = select(net, "all")
    g = prior_groups(ps, 3, "ard")
    W = g[:18].reshape(6, 3)
    assert (W == torch.arange(3)).all()  # column j of the first weight -> group j
    assert g.max().item() + 1 == 3 + 5  # + first bias, W2, b2, W3, b3
    assert prior_groups(ps, 3, "layer").max().item() + 1 == 6
    assert prior_groups(ps, 3, "scalar").max().item() == 0
    with pytest.raises(InvalidArgumentError):
        prior_groups(ps, 3, "nope")


def _embedded_net(d=2, m=1, seed=0, body=None):
    """Frozen Fourier features, then trainable layers (``body``: a factory, default the MLP)."""
    feats = FourierFeatures(d, 16, torch.tensor([0.3, 0.7]), torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return nn.Sequential(feats.to(DT), (body or _net)(16, m).to(DT))


@pytest.mark.parametrize("m, embedded", [(1, None), (2, None), (1, "mlp"), (2, "residual")])
def test_data_and_weight_space_agree_with_the_dense_posterior(m, embedded):
    X, Y = _data(n=7, m=m)
    net = _net(m=m) if embedded is None else _embedded_net(
        m=m, body=_ResidualLN if embedded == "residual" else None)
    ps = select(net, "all")
    theta0 = ps.vector() + 0.1  # prior mean away from θ*
    groups = prior_groups(ps, 2, "layer" if embedded else "ard")
    if embedded == "residual":
        assert 7 * m <= ps.numel  # data space checked against weight space and the dense one
    delta = torch.linspace(0.5, 3.0, int(groups.max()) + 1, dtype=DT)
    sigma = torch.tensor(0.2, dtype=DT)
    gps = {s: LinearizedGP(ps, theta0, groups, delta, sigma, X, Y, space=s)
           for s in ("data", "weight")}
    assert LinearizedGP(ps, theta0, groups, delta, sigma, X, Y).space == (
        "data" if 7 * m <= ps.numel else "weight")
    # dense reference: Λ = JᵀJ/σ² + D, θ̄ = Λ⁻¹(Jᵀ(y - f + Jθ*)/σ² + Dθ₀)
    J = _dense_jac(net, X)
    D = torch.diag(delta[groups])
    lam = J.T @ J / sigma**2 + D
    r = Y.reshape(-1) - net(X).reshape(-1) + J @ ps.vector()
    theta_bar = torch.linalg.solve(lam, J.T @ r / sigma**2 + D @ theta0)
    K = J @ torch.linalg.inv(D) @ J.T + sigma**2 * torch.eye(J.shape[0], dtype=DT)
    lml = torch.distributions.MultivariateNormal(J @ theta0, K).log_prob(r)
    Xq = torch.rand(3, 2, 2, dtype=DT)
    Jq = _dense_jac(net, Xq.reshape(6, 2))
    mean_ref = net(Xq.reshape(6, 2)).reshape(-1) + Jq @ (theta_bar - ps.vector())
    cov_ref = Jq @ torch.linalg.inv(lam) @ Jq.T
    for gp in gps.values():
        torch.testing.assert_close(gp.theta_bar, theta_bar)
        torch.testing.assert_close(gp.log_evidence, lml)
        mean, cov = gp.moments(Xq)
        assert mean.shape == (3, 2, m) and cov.shape == (3, 2 * m, 2 * m)
        torch.testing.assert_close(mean.reshape(-1), mean_ref)
        for t in range(3):
            blk = slice(2 * m * t, 2 * m * (t + 1))
            torch.testing.assert_close(cov[t], cov_ref[blk, blk])


def test_tuning_maximizes_the_same_evidence_and_keeps_the_noise_floor():
    X, Y = _data(n=10)
    net = _net()
    ps = select(net, "all")
    theta0 = ps.vector()
    groups = prior_groups(ps, 2, "ard")
    G = int(groups.max()) + 1
    f, J = jacobian(ps, X)
    torch.testing.assert_close(J, _dense_jac(net, X))
    r = Y.reshape(-1) - f + J @ (ps.vector() - theta0)
    grams = torch.stack([J[:, groups == g] @ J[:, groups == g].T for g in range(G)])
    hyper = tune(grams, r, min_noise=0.05)
    assert hyper.sigma_noise >= 0.05 - 1e-12  # the floor holds during tuning
    gp = LinearizedGP(ps, theta0, groups, hyper.prior_precision, hyper.sigma_noise, X, Y)
    assert math.isclose(gp.log_evidence.item(), hyper.objective, rel_tol=1e-6)
    start = tune(grams, r, min_noise=0.05, max_iter=0)
    assert hyper.objective >= start.objective
    fixed = tune(grams, r, fixed_noise=0.3)
    torch.testing.assert_close(fixed.sigma_noise, torch.tensor(0.3, dtype=DT))


def test_train_map_with_an_anchor_and_per_tensor_decay():
    X, Y = _data(n=10)
    net = _net()
    anchor = [p.detach().clone() + 0.5 for p in net.parameters()]
    wd = [torch.full_like(p, 1e6) for p in net.parameters()]
    train_map(net, X, Y, wd, anchor=anchor, steps=300, lr=0.05)
    for p, a in zip(net.parameters(), anchor):  # a huge prior pins θ at its mean
        torch.testing.assert_close(p.detach(), a, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def ntk_model():
    X, Y = _data(n=12)
    return LaplaceModel(X, Y, seed=0, **FAST)


def test_mlp_defaults_to_the_linearized_gp(ntk_model):
    model = ntk_model
    assert model.gp is not None and model.la is None and model.gp.space == "data"
    assert isinstance(model.net[0], Center)
    assert hasattr(model, "input_transform") and hasattr(model, "outcome_transform")
    assert model.sigma2 >= 1e-6 - 1e-15
    post = model.posterior(torch.rand(4, 3, 2, dtype=DT))
    assert post.mean.shape == (4, 3, 1)
    assert (post.variance > 0).all()
    X, Y = _data(n=12)
    with torch.no_grad():  # fits the data it was trained on
        rmse = (model.posterior(X[:, None]).mean.reshape(-1) - Y.reshape(-1)).square().mean()
    assert rmse.sqrt() < 0.2 * Y.std()


def test_gradients_wrt_X_ntk(ntk_model):
    def fn(x):
        p = ntk_model.posterior(x)
        return p.mean.sum() + p.distribution.covariance_matrix.sum()

    x = torch.rand(2, 2, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_optimize_acqf_ntk(ntk_model):
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    acq = LogExpectedImprovement(ntk_model, best_f=ntk_model.train_Y.max())
    cand, value = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=2, raw_samples=16)
    assert cand.shape == (1, 2) and torch.isfinite(value)


def test_fantasy_equals_gp_conditioning_ntk(ntk_model):
    model = ntk_model
    Xn = torch.rand(2, 2, dtype=DT)
    fm = model.fantasize(Xn, SobolQMCNormalSampler(torch.Size([3]), seed=0))
    assert isinstance(fm, ConditionedLaplaceModel) and fm.batch_shape == torch.Size([3])
    Xq = torch.rand(4, 2, dtype=DT)
    post = fm.posterior(Xq)
    # reference: the linearized GP refit with the fantasy points appended (same θ*, δ, σ)
    gp = model.gp
    Xt_train = model.train_X
    for k in range(3):
        Yk = torch.cat([model.train_Y, fm.Y_cond[k]])
        ref = LinearizedGP(gp.params, gp.theta0, model._ntk.groups, gp.prior_precision,
                           gp.sigma_noise, torch.cat([Xt_train, fm.X_cond]), Yk)
        mean, cov = ref.moments(model.transform_inputs(Xq)[None])
        std2 = model.outcome_transform.stdvs.reshape(()) ** 2
        mu = model.outcome_transform.means.reshape(())
        torch.testing.assert_close(post.mean[k].reshape(-1), mean.reshape(-1) * std2.sqrt() + mu)
        torch.testing.assert_close(post.distribution.covariance_matrix[k], cov[0] * std2)


def test_condition_on_observations_refines_ntk(ntk_model):
    model = ntk_model
    Xn = torch.rand(3, 2, dtype=DT)
    Yn = torch.full((3, 1), 3.0, dtype=DT)
    new = model.condition_on_observations(Xn, Yn)
    assert isinstance(new, LaplaceModel) and new.gp is not None
    assert new.train_X.shape[0] == 15 and new.net is not model.net
    assert (model.posterior(Xn[:, None]).mean - 3).abs().mean() > \
        (new.posterior(Xn[:, None]).mean - 3).abs().mean()
    torch.testing.assert_close(new._ntk.theta0, model._ntk.theta0)  # prior mean kept


def test_user_network_and_two_outputs():
    X, Y = _data(n=10, m=2)
    model = LaplaceModel(X, Y, network=lambda d, m: _net(d, m), seed=0, steps=100,
                         marglik_steps=20)
    assert model.gp is not None and model.num_outputs == 2
    post = model.posterior(torch.rand(3, 2, 2, dtype=DT))
    assert post.mean.shape == (3, 2, 2)


def test_weight_space_when_data_outnumber_parameters():
    X, Y = _data(n=80)
    model = LaplaceModel(X, Y, hidden=(4,), seed=0, steps=100, marglik_steps=20,
                         tune_points=40, embedding=None)
    assert model.gp.space == "weight"  # 80 targets > P = 17
    assert torch.isfinite(model.posterior(torch.rand(5, 1, 2, dtype=DT)).variance).all()


def test_batched_training_data_is_refused_with_a_botorch_error():
    X, Y = _data(n=8)
    with pytest.raises(BotorchTensorDimensionError, match="batch"):
        LaplaceModel(X.expand(3, 8, 2), Y.expand(3, 8, 1), **FAST)


def test_ntk_arguments_are_checked():
    X, Y = _data(n=8)
    with pytest.raises(ValueError, match="prior_mean"):
        LaplaceModel(X, Y, prior_mean="map", **FAST)
    with pytest.raises(ValueError, match="linearized"):
        LaplaceModel(X, Y, structure="ntk", evidence="laplace", **FAST)
    with pytest.raises(ValueError, match="subset"):
        LaplaceModel(X, Y, structure="ntk", subset="last_layer", **FAST)


def test_prior_first_and_center_scale():
    X, Y = _data(n=10)
    model = LaplaceModel(X, Y, seed=0, prior_first=True, center=3.0, **FAST)
    assert model.net[0].scale == 3.0
    x = torch.rand(5, 2, dtype=DT)
    torch.testing.assert_close(model.net[0](x), 3.0 * (2 * x - 1))
    assert torch.isfinite(model.posterior(x[:, None]).mean).all()
    plain = LaplaceModel(X, Y, seed=0, center=False, **FAST)
    assert not isinstance(plain.net[0], Center)


def test_center_candidates_are_selected_by_the_evidence_at_init():
    from bayescurv.bo.fitting import ntk_evidence, prepare_ntk
    from bayescurv.bo.networks import default_network

    X = torch.rand(30, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    scales = (0.3, 10.0)
    picked = {}
    # tanh: the scale decides whether its first layer is linear or saturating on the box
    for name, y in (("wiggly", torch.sin(12 * X[:, :1])), ("linear", X[:, :1] + X[:, 1:])):
        model = LaplaceModel(X, y, seed=0, center=scales, activation="tanh", **FAST)
        assert model.center_scale in scales and model.net[0].scale == model.center_scale
        picked[name] = model.center_scale
        # the choice is the argmax of the tuned evidence of the NTK GP at the initialization
        torch.manual_seed(0)
        base = default_network(2, 1, FAST["hidden"], "tanh").to(DT)
        cfg = dict(model._config)
        objectives = []
        for c in scales:
            net, state = prepare_ntk(copy.deepcopy(base), 2, cfg, center=c)
            objectives.append(ntk_evidence(
                net, model.train_X, model.train_Y, cfg, state, delta=None, sigma=0.1,
                fixed=None, noise_prior=model._noise_prior(), generator=torch.Generator(),
                max_iter=cfg["marglik_steps"])[2])
        assert model.center_scale == scales[max(range(2), key=objectives.__getitem__)]
    # a wiggly target needs the nonlinear first layer, a linear one the nearly linear one
    assert picked == {"wiggly": 10.0, "linear": 0.3}
    assert LaplaceModel(X, y, seed=0, center=2.0, **FAST).center_scale == 2.0


@pytest.mark.parametrize(
    "center", [(), (1.0, -2.0), (0.0, 1.0), ("a",), -1.0, float("nan"), "auto"])
def test_invalid_center_is_refused(center):
    X, Y = _data(n=8)
    with pytest.raises(InvalidArgumentError, match="center"):
        LaplaceModel(X, Y, center=center, **FAST)


def test_conditioning_keeps_the_ntk_hyperparameters(ntk_model):
    new = ntk_model.condition_on_observations(torch.rand(2, 2, dtype=DT),
                                              torch.zeros(2, 1, dtype=DT))
    torch.testing.assert_close(new.gp.prior_precision, ntk_model.gp.prior_precision)
    torch.testing.assert_close(new.gp.sigma_noise, ntk_model.gp.sigma_noise)
    assert new.center_scale == ntk_model.center_scale == 1.0
    assert math.isfinite(new.log_evidence)


class _ResidualLN(nn.Module):
    """A user's network that is not an MLP: residual block with LayerNorm."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.a, self.norm = nn.Linear(d, 16), nn.LayerNorm(16)
        self.b, self.out = nn.Linear(16, 16), nn.Linear(16, m)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h + torch.tanh(self.b(self.norm(h))))


def test_center_selection_on_a_residual_layernorm_net_agrees_in_float32():
    X = torch.rand(30, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    for y, expected in ((torch.sin(12 * X[:, :1]), 10.0), (X[:, :1] + X[:, 1:], 0.3)):
        picks = [LaplaceModel(X.to(dt), y.to(dt), network=_ResidualLN, seed=0,
                              center=(0.3, 10.0), **{**FAST, "hidden": None}).center_scale
                 for dt in (torch.float64, torch.float32)]
        assert picks == [expected, expected]


# the Fourier embedding (default for hidden=...) ---------------------------------------------
EMB = {**FAST, "embedding": "auto", "embedding_features": 32}


@pytest.fixture(scope="module")
def embedded_model():
    X, Y = _data(n=12)
    return LaplaceModel(X, Y, seed=0, **EMB)


def test_mlp_defaults_to_a_fourier_embedding_with_evidence_lengthscales(embedded_model):
    model = embedded_model
    feats = model.net[0]
    assert isinstance(feats, FourierFeatures) and feats.omega.shape == (32, 2)
    assert model.ard is not None  # lengthscales fitted by the evidence, then frozen
    torch.testing.assert_close(feats.lengthscale, model.ard.lengthscale)
    assert not any(p is feats.omega for p in model.net.parameters())
    assert model.center_scale == 0.0 and model.gp.prior_precision.numel() == 1  # "scalar"
    X, Y = _data(n=12)
    with torch.no_grad():
        post = model.posterior(X[:, None])
        rmse = (post.mean.reshape(-1) - Y.reshape(-1)).square().mean().sqrt()
    assert rmse < 0.2 * Y.std()
    new = model.condition_on_observations(torch.rand(2, 2, dtype=DT), torch.zeros(2, 1, dtype=DT))
    torch.testing.assert_close(new.net[0].lengthscale, feats.lengthscale)  # features kept
    torch.testing.assert_close(new.net[0].omega, feats.omega)


def test_embedding_has_no_trend_away_from_the_data(embedded_model, ntk_model):
    """The point of the embedding: a stationary NTK. Far from the data (in the embedding's
    lengthscales) the predictive mean of the embedded MLP is the same constant everywhere and
    nearly the same everywhere, where the plain MLP's linearized mean keeps its
    trend (it extrapolates)."""
    far = torch.tensor([[40.0, -40.0], [-37.0, 52.0], [60.0, 45.0], [-50.0, -45.0]], dtype=DT)
    spread = {}
    for name, model in (("embedded", embedded_model), ("plain", ntk_model)):
        with torch.no_grad():
            post = model.posterior(far[:, None])
        mean, sd = post.mean.reshape(-1), post.variance.sqrt().reshape(-1)
        spread[name] = ((mean.max() - mean.min()) / sd.min()).item()
    # finite features: the far-field kernel is O(1/sqrt(F)) noise, not exactly zero
    assert spread["embedded"] < 0.5
    assert spread["plain"] > 5 * spread["embedded"]


def test_embedding_factory_gets_the_feature_count():
    X, Y = _data(n=10)
    seen = []

    def factory(d, m):
        seen.append(d)
        return _net(d, m)

    model = LaplaceModel(X, Y, network=factory, seed=0,
                         **{**EMB, "hidden": None, "embedding": "fourier"})
    assert seen == [32] and isinstance(model.net[0], FourierFeatures)


@pytest.mark.parametrize("kwargs, match", [
    (dict(embedding="rff"), "embedding must be"),
    (dict(embedding="fourier", hidden=None), "default network already"),
    (dict(embedding="fourier", hidden=None, network=_net()), "factory"),
    (dict(center=3.0), "center"),
    (dict(center=(1.0, 3.0)), "center"),
    (dict(prior_granularity="ard"), "prior_granularity"),
    (dict(embedding_features=0), "embedding_features"),
])
def test_embedding_arguments_are_checked(kwargs, match):
    X, Y = _data(n=8)
    with pytest.raises(InvalidArgumentError, match=match):
        LaplaceModel(X, Y, **{**EMB, **kwargs})


def test_embedded_linearized_gp_float32_agrees_with_float64_when_ill_conditioned():
    """Clustered inputs and a small noise make ``K`` ill-conditioned; the float32 posterior
    stays close to the float64 one at the same weights and hyperparameters."""
    g = torch.Generator().manual_seed(1)
    X = torch.cat([0.5 + 1e-3 * torch.randn(10, 2, generator=g, dtype=DT),
                   torch.rand(10, 2, generator=g, dtype=DT)])
    Y = torch.sin(6 * X).sum(-1, keepdim=True)
    Xq = torch.rand(4, 1, 2, generator=g, dtype=DT)
    out = {}
    for dt in (torch.float64, torch.float32):
        net = _embedded_net().to(dt)
        ps = select(net, "all")
        groups = prior_groups(ps, 2, "scalar")
        gp = LinearizedGP(ps, ps.vector(), groups, torch.ones(1, dtype=dt),
                          torch.tensor(1e-2, dtype=dt), X.to(dt), Y.to(dt))
        assert gp.space == "data"
        out[dt] = [t.double() for t in gp.moments(Xq.to(dt))]
    (m64, c64), (m32, c32) = out[torch.float64], out[torch.float32]
    torch.testing.assert_close(m32, m64, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(c32, c64, atol=1e-3 * c64.abs().max().item(), rtol=1e-2)
