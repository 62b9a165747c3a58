"""BoTorch surrogate and NTK kernel, checked against dense float64 references
(``J`` from ``torch.func.jacrev``, ``Σ`` = inverse of the dense posterior precision)."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from botorch.exceptions.errors import BotorchTensorDimensionError, InputDataError
from botorch.models.transforms import Normalize, Standardize
from botorch.sampling import SobolQMCNormalSampler
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from torch.func import functional_call, jacrev

from bayescurv.bo import ConditionedLaplaceModel, LaplaceModel, NTKKernel

DT = torch.float64
# the Laplace path (structure="full"; MLPs default to structure="ntk" since issue 12, tested in
# tests/test_bo_ntk.py)
FAST = dict(hidden=(8, 8), steps=200, marglik_steps=20, refine_steps=50, patience=50,
            structure="full", embedding=None)


def _data(n=12, d=2, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=DT)
    Y = torch.stack([torch.sin(3 * X).sum(-1) + k * X[:, 0] ** 2 for k in range(m)], -1)
    return X, Y


def _dense_jac(model: LaplaceModel, x: torch.Tensor) -> torch.Tensor:
    """``(B*m, P)`` Jacobian in the posterior's flat parameter order, input-major rows."""
    la = model.la
    names = la.params.names
    shapes = [p.shape for p in la.params.params]
    sizes = [p.numel() for p in la.params.params]

    def f(flat):
        ps = {n: v.reshape(s) for n, v, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(model.net, ps, (x,))

    J = jacrev(f)(la.mean.detach().clone())  # (B, m, P)
    return J.reshape(-1, J.shape[-1])


def _sigma(model: LaplaceModel) -> torch.Tensor:
    return torch.linalg.inv(model.la.posterior_precision.to_dense())


@pytest.fixture(scope="module")
def model_1d():
    X, Y = _data()
    return LaplaceModel(X, Y, seed=0, **FAST)


CASES = [("kfac", "all", 1), ("diag", "all", 1), ("full", "all", 1), ("kfac", "last_layer", 1),
         ("kfac", "all", 2), ("full", "all", 2)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def case_model(request):
    structure, subset, m = request.param
    X, Y = _data(m=m)
    return LaplaceModel(X, Y, subset=subset, seed=1, **{**FAST, "structure": structure})


# posterior vs dense reference -------------------------------------------------------------
def test_posterior_joint_matches_dense(case_model):
    model = case_model
    m = model.num_outputs
    Xq = torch.rand(3, 4, 2, dtype=DT)  # 3 t-batches of q = 4
    post = model.posterior(Xq)
    mvn = post.distribution
    assert isinstance(mvn, MultitaskMultivariateNormal if m > 1 else MultivariateNormal)
    assert post.mean.shape == (3, 4, m)
    S = _sigma(model)
    for b in range(3):
        J = _dense_jac(model, Xq[b])
        ref = J @ S @ J.T  # (4m, 4m), interleaved
        torch.testing.assert_close(mvn.covariance_matrix[b], ref, rtol=1e-6, atol=1e-9)
        want = model.net(Xq[b])
        if model.glm is not None:  # evidence="linearized": the linear model's posterior mean
            want = want + (J @ (model.theta_bar - model.la.mean)).reshape(4, m)
        torch.testing.assert_close(post.mean[b], want, rtol=1e-9, atol=1e-9)


def test_output_indices_and_noise(case_model):
    model = case_model
    m = model.num_outputs
    Xq = torch.rand(2, 3, 2, dtype=DT)
    full = model.posterior(Xq).distribution.covariance_matrix
    s2 = model.la.sigma_noise ** 2
    noisy = model.posterior(Xq, observation_noise=True).distribution.covariance_matrix
    torch.testing.assert_close(noisy - full, s2 * torch.eye(3 * m, dtype=DT).expand(2, -1, -1))
    nz = torch.rand(2, 3, m, dtype=DT)
    given = model.posterior(Xq, observation_noise=nz).distribution.covariance_matrix
    torch.testing.assert_close(given - full, torch.diag_embed(nz.reshape(2, 3 * m)))
    if m > 1:
        sub = model.posterior(Xq, output_indices=[1])
        assert sub.mean.shape == (2, 3, 1)
        torch.testing.assert_close(sub.distribution.covariance_matrix, full[:, 1::m, 1::m])


def test_gradients_wrt_X(model_1d):
    def fn(x):
        p = model_1d.posterior(x)
        return p.mean.sum() + p.distribution.covariance_matrix.sum()

    x = torch.rand(2, 3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    p = model_1d.posterior(x)
    (g,) = torch.autograd.grad(p.variance.sum(), x)
    assert g.abs().sum() > 0


def test_joint_samples_have_the_joint_covariance(model_1d):
    Xq = torch.rand(5, 2, dtype=DT)
    post = model_1d.posterior(Xq)
    torch.manual_seed(0)
    s = post.rsample(torch.Size([20000])).squeeze(-1)  # (S, 5)
    emp = torch.cov(s.T)
    ref = post.distribution.covariance_matrix
    assert (emp - ref).abs().max() < 0.05 * ref.diagonal().max()
    assert post.distribution.covariance_matrix[0, 1].abs() > 0  # joint, not marginal


def test_transforms():
    X, Y = _data(n=15)
    X, Y = 3 * X + 2, 50 * Y - 7
    model = LaplaceModel(X, Y, input_transform=Normalize(2), outcome_transform=Standardize(1),
                         seed=0, **FAST)
    Xq = 3 * torch.rand(4, 1, 2, dtype=DT) + 2
    post = model.posterior(Xq)
    xt = model.input_transform(Xq.reshape(4, 2))
    f, c = model.la.functional(xt)
    f = _lin_mean(model, xt)
    std, mu = model.outcome_transform.stdvs, model.outcome_transform.means
    torch.testing.assert_close(post.mean.reshape(4), (f.reshape(4) * std + mu).reshape(4))
    torch.testing.assert_close(post.variance.reshape(4), c.reshape(4) * std.reshape(()) ** 2)
    assert model.train_X.min() >= -1e-12 and model.train_X.max() <= 1 + 1e-12


# conditioning ------------------------------------------------------------------------------
def test_fantasy_equals_weight_space_update(model_1d):
    """Function-space conditioning == exact Bayesian update of the linearized model in weight
    space: Λ' = Λ + J'ᵀJ'/σ², θ' = θ* + Λ'⁻¹J'ᵀ(y - f)/σ²."""
    torch.manual_seed(3)
    Xn = torch.rand(2, 2, dtype=DT)
    sampler = SobolQMCNormalSampler(torch.Size([3]), seed=0)
    fm = model_1d.fantasize(Xn, sampler)
    assert isinstance(fm, ConditionedLaplaceModel) and fm.batch_shape == torch.Size([3])
    Xq = torch.rand(3, 4, 2, dtype=DT)
    post = fm.posterior(Xq)
    s2 = model_1d.la.sigma_noise ** 2
    Jn = _dense_jac(model_1d, Xn)
    lam = model_1d.la.posterior_precision.to_dense() + Jn.T @ Jn / s2
    S = torch.linalg.inv(lam)
    fn = _lin_mean(model_1d, Xn).reshape(-1)
    for k in range(3):
        y = fm.Y_cond[k].reshape(-1)
        dtheta = S @ Jn.T @ (y - fn) / s2
        J = _dense_jac(model_1d, Xq[k])
        torch.testing.assert_close(post.mean[k].reshape(-1), _lin_mean(model_1d, Xq[k])
                                   .reshape(-1) + J @ dtheta, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(post.distribution.covariance_matrix[k], J @ S @ J.T,
                                   rtol=1e-6, atol=1e-9)
    # chaining equals conditioning on everything at once
    Xm, Ym = torch.rand(1, 2, dtype=DT), torch.zeros(3, 1, 1, dtype=DT)
    two = fm.condition_on_observations(Xm, Ym)
    one = model_1d.condition_on_observations(torch.cat([Xn, Xm]).expand(3, 3, 2),
                                             torch.cat([fm.Y_cond, Ym], -2))
    torch.testing.assert_close(two.posterior(Xq).mean, one.posterior(Xq).mean)


def test_condition_refines_without_retraining():
    X, Y = _data(n=12)
    model = LaplaceModel(X, Y, seed=0, **FAST)
    Xn = torch.rand(4, 2, dtype=DT)
    Yn = torch.full((4, 1), 3.0, dtype=DT)
    new = model.condition_on_observations(Xn, Yn)
    assert isinstance(new, LaplaceModel) and new.train_X.shape[0] == 16
    assert new.net is not model.net
    # the old model is untouched, the new one moved towards the new targets
    assert (model.posterior(Xn[:, None]).mean - 3).abs().mean() > \
        (new.posterior(Xn[:, None]).mean - 3).abs().mean()
    torch.testing.assert_close(model.net(X), model.net(X))
    with pytest.raises(BotorchTensorDimensionError):
        model.condition_on_observations(Xn, Yn.expand(2, 4, 1), refine=True)


# kernel --------------------------------------------------------------------------------
def _lin_mean(model, x):
    """The linearized posterior mean: f(x; θ*) (+ J(x)(θ̄ - θ*) with evidence="linearized")."""
    off = model._mean_offset(x[None])
    return model.net(x) + (off[0] if torch.is_tensor(off) else off)


class _NetMean(gpytorch.means.Mean):
    def __init__(self, model):
        super().__init__()
        self.model, self.m = model, model.num_outputs

    def forward(self, x):
        f = _lin_mean(self.model, x)
        return f.squeeze(-1) if self.m == 1 else f


class _PriorGP(gpytorch.models.GP):
    """No ExactGP: the GP prior with mean f(x; θ*) and the NTK kernel."""

    def __init__(self, model):
        super().__init__()
        self.m = model.num_outputs
        self.mean_module = _NetMean(model)
        self.covar_module = NTKKernel(model.la)

    def forward(self, x):
        mean, cov = self.mean_module(x), self.covar_module(x)
        if self.m == 1:
            return MultivariateNormal(mean, cov)
        return MultitaskMultivariateNormal(mean, cov, interleaved=True)


def test_ntk_kernel_is_the_glm_predictive(case_model):
    model = case_model
    gp = _PriorGP(model)
    x = torch.rand(6, 2, dtype=DT)
    dist = gp(x)
    J = _dense_jac(model, x)
    S = _sigma(model)
    torch.testing.assert_close(dist.covariance_matrix, J @ S @ J.T, rtol=1e-6, atol=1e-9)
    # and it is the BoTorch posterior of q = 6 points
    torch.testing.assert_close(dist.covariance_matrix,
                               model.posterior(x).distribution.covariance_matrix)
    torch.testing.assert_close(dist.mean, model.posterior(x).mean.squeeze(-1)
                               if model.num_outputs == 1 else model.posterior(x).mean)
    # cross-covariance, diag and blockwise evaluation
    k = gp.covar_module
    x2 = torch.rand(3, 2, dtype=DT)
    J2 = _dense_jac(model, x2)
    torch.testing.assert_close(k(x, x2).to_dense(), J @ S @ J2.T, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(k(x, diag=True), (J @ S @ J.T).diagonal(), rtol=1e-6,
                               atol=1e-9)
    small = NTKKernel(model.la, max_points=2)
    torch.testing.assert_close(small(x, x2).to_dense(), J @ S @ J2.T, rtol=1e-6, atol=1e-9)
    xb = torch.rand(2, 3, 2, dtype=DT)
    kb = k(xb).to_dense()
    for b in range(2):
        Jb = _dense_jac(model, xb[b])
        torch.testing.assert_close(kb[b], Jb @ S @ Jb.T, rtol=1e-6, atol=1e-9)


# bad input -----------------------------------------------------------------------------
def test_bad_input():
    X, Y = _data(n=6)
    Yn = Y.clone()
    Yn[2, 0] = math.nan
    with pytest.raises(InputDataError, match="NaN"):
        LaplaceModel(X, Yn, **FAST)
    with pytest.raises(BotorchTensorDimensionError, match="explicit output dimension"):
        LaplaceModel(X, Y.squeeze(-1), **FAST)
    with pytest.raises(BotorchTensorDimensionError):
        LaplaceModel(X, Y[:5], **FAST)
    with pytest.raises(InputDataError, match="dtype"):
        LaplaceModel(X.float(), Y, **FAST)
    model = LaplaceModel(X, Y, **FAST)
    with pytest.raises(BotorchTensorDimensionError):
        model.posterior(torch.rand(2, 3, dtype=DT))
    with pytest.raises(InputDataError, match="dtype"):
        model.posterior(torch.rand(2, 2))
    with pytest.raises(InputDataError, match="NaN"):
        model.condition_on_observations(X[:1], Yn[2:3])
    with pytest.raises(BotorchTensorDimensionError):
        model.condition_on_observations(X[:2], Y[:3])
    with pytest.raises(BotorchTensorDimensionError):
        model.posterior(torch.rand(2, 3, 2, dtype=DT), observation_noise=torch.rand(4, 1,
                                                                                   dtype=DT))


# acquisitions with optimize_acqf ----------------------------------------------------------
BOUNDS = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)


@pytest.fixture(scope="module")
def bo_model():
    X, Y = _data(n=10)
    return LaplaceModel(X, Y, seed=0, **FAST)


def _check_candidate(acqf, cand, q):
    assert cand.shape == (q, 2) and cand.dtype == DT
    assert (cand >= 0).all() and (cand <= 1).all()
    with torch.no_grad():
        value = acqf(cand[None])
        rand = acqf(torch.rand(64, q, 2, dtype=DT, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(value).all()
    # the optimizer must beat the median of random candidates
    assert value.item() >= rand.median().item()


def _acqfs(model):
    from botorch.acquisition import (
        ExpectedImprovement,
        LogExpectedImprovement,
        UpperConfidenceBound,
        qLogNoisyExpectedImprovement,
        qUpperConfidenceBound,
    )

    best = model.train_Y.max()
    sampler = SobolQMCNormalSampler(torch.Size([32]), seed=0)
    return {
        "EI": (ExpectedImprovement(model, best_f=best), 1),
        "LogEI": (LogExpectedImprovement(model, best_f=best), 1),
        "UCB": (UpperConfidenceBound(model, beta=2.0), 1),
        "qLogNEI": (qLogNoisyExpectedImprovement(model, X_baseline=model.train_X,
                                                 sampler=sampler, prune_baseline=False), 2),
        "qUCB": (qUpperConfidenceBound(model, beta=2.0, sampler=sampler), 2),
    }


@pytest.mark.parametrize("name", ["EI", "LogEI", "UCB", "qLogNEI", "qUCB"])
def test_optimize_acqf(bo_model, name):
    from botorch.optim import optimize_acqf

    acqf, q = _acqfs(bo_model)[name]
    x = torch.rand(4, q, 2, dtype=DT, requires_grad=True)
    acqf(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    cand, _ = optimize_acqf(acqf, bounds=BOUNDS, q=q, num_restarts=2, raw_samples=16,
                            options={"maxiter": 20})
    _check_candidate(acqf, cand, q)


def test_knowledge_gradient(bo_model):
    from botorch.acquisition import qKnowledgeGradient
    from botorch.optim import optimize_acqf

    acqf = qKnowledgeGradient(bo_model, num_fantasies=4)
    cand, value = optimize_acqf(acqf, bounds=BOUNDS, q=1, num_restarts=2, raw_samples=16,
                                options={"maxiter": 10})
    assert cand.shape == (1, 2) and torch.isfinite(value)
    assert (cand >= 0).all() and (cand <= 1).all()
    # the one-shot KG value is differentiable through the fantasies
    x = torch.rand(3, 1 + 4, 2, dtype=DT, requires_grad=True)
    acqf(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[:, 0].abs().sum() > 0


def test_thompson_sampling(bo_model):
    from botorch.generation import MaxPosteriorSampling

    cands = torch.rand(64, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    ts = MaxPosteriorSampling(bo_model, replacement=False)
    torch.manual_seed(0)
    picks = ts(cands, num_samples=8)
    assert picks.shape == (8, 2)
    assert all(any(torch.equal(p, c) for c in cands) for p in picks)
    # joint samples of a long q-batch: their covariance is the joint posterior
    post = bo_model.posterior(cands[:6])
    s = post.rsample(torch.Size([8000])).squeeze(-1)
    ref = post.distribution.covariance_matrix
    assert (torch.cov(s.T) - ref).abs().max() < 0.1 * ref.diagonal().max()


@pytest.mark.parametrize("noise", ["residual", 0.05])
def test_noise_modes(noise):
    X, Y = _data(n=10)
    model = LaplaceModel(X, Y, noise=noise, seed=0, **FAST)
    if noise == "residual":
        mse = (model.net(X) - Y).square().mean()
        torch.testing.assert_close(model.la.sigma_noise ** 2, mse.clamp_min(1e-6).detach())
    else:
        torch.testing.assert_close(model.la.sigma_noise, torch.tensor(0.05, dtype=DT))
    with pytest.raises(ValueError):
        LaplaceModel(X, Y, noise="nope", **FAST)


def test_fantasize_all_structures(case_model):
    """Fantasy models of every structure / output count: shapes, and conditioning shrinks the
    variance at the fantasy points (to below the noise level)."""
    model = case_model
    m = model.num_outputs
    Xn = torch.rand(4, 2, 2, dtype=DT)  # 4 t-batches of 2 points
    fm = model.fantasize(Xn, SobolQMCNormalSampler(torch.Size([3]), seed=0))
    assert fm.batch_shape == torch.Size([3, 4]) and fm.num_outputs == m
    post = fm.posterior(Xn.expand(3, 4, 2, 2))
    assert post.mean.shape == (3, 4, 2, m)
    prior_var = model.posterior(Xn).variance
    s2 = model.la.sigma_noise ** 2
    assert (post.variance <= prior_var + 1e-10).all()
    assert (post.variance <= s2 + 1e-10).all()


def test_noise_hyperprior_map2():
    """MAP-II noise tuning: the objective is the Laplace evidence plus the LogNormal log density
    of σ² (hand-computed), and the tuned (δ, σ) is at least as good as the start."""
    from bayescurv.bo.hyperparameters import (
        default_noise_prior,
        noise_log_prior,
        tune_hyperparameters,
    )

    X, Y = _data(n=10)
    model = LaplaceModel(X, Y, seed=0, **{**FAST, "marglik_steps": 0})
    la = model.la
    sigma = torch.tensor(0.3, dtype=DT)
    prior = default_noise_prior(DT)
    s2 = sigma**2
    ref = -torch.log(s2) - math.log(1.0) - 0.5 * math.log(2 * math.pi) - 0.5 * (
        (torch.log(s2) + 4.0) / 1.0) ** 2
    torch.testing.assert_close(noise_log_prior(prior, sigma), ref)
    assert noise_log_prior(None, sigma) == 0
    start = (la.log_marginal_likelihood() + noise_log_prior(prior, la.sigma_noise)).item()
    best = tune_hyperparameters(la, "layer", 30, tune_sigma=True, noise_prior=prior)
    after = (la.log_marginal_likelihood() + noise_log_prior(prior, la.sigma_noise)).item()
    assert best >= start - 1e-9
    assert math.isclose(after, best, rel_tol=1e-9, abs_tol=1e-9)
    assert la.prior_precision.shape == (la.num_layers,)
    # the prior pulls σ down relative to the evidence alone
    la.sigma_noise, la.prior_precision = 1.0, 1.0
    tune_hyperparameters(la, "layer", 200, tune_sigma=True, noise_prior=None)
    s_ml = la.sigma_noise.item()
    la.sigma_noise, la.prior_precision = 1.0, 1.0
    tune_hyperparameters(la, "layer", 200, tune_sigma=True, noise_prior=prior)
    assert la.sigma_noise.item() < s_ml


def test_tuning_keeps_the_noise_floor_and_survives_an_indefinite_trial_point():
    """The floor is part of the parametrization (σ² = min_noise² + eˢ), and a NumericalError
    at an extreme trial point is a failed line-search step, not a failed fit (a BO run
    stopped on one: 'Dense.solve: not positive definite' at a tiny trial σ)."""
    from bayescurv.bo.hyperparameters import tune_hyperparameters
    from bayescurv.errors import NumericalError

    X, Y = _data(n=10)
    la = LaplaceModel(X, Y, seed=0, **{**FAST, "marglik_steps": 0}).la
    calls = {"raised": 0}

    def evidence(prior, sigma):  # increases as σ -> 0; "indefinite" below σ = 0.02
        if sigma < 0.02:
            calls["raised"] += 1
            raise NumericalError("not positive definite")
        return -torch.log(sigma) - 1e-3 * torch.log(prior).square().sum()

    la.sigma_noise, la.prior_precision = 1.0, 1.0
    best = tune_hyperparameters(la, "scalar", 50, evidence=evidence, min_noise=1e-3)
    assert calls["raised"] > 0 and math.isfinite(best)
    assert 0.02 <= la.sigma_noise.item() < 0.2  # moved down towards the failing region
    # the floor holds inside the tuning: the optimum is at σ = min_noise, not below
    la.sigma_noise, la.prior_precision = 1.0, 1.0
    tune_hyperparameters(la, "scalar", 200, evidence=lambda p, s: -torch.log(s), min_noise=0.05)
    assert 0.05 <= la.sigma_noise.item() < 0.051


# default surrogate: Fourier features selected by the linearized evidence -------------------
def test_fourier_features_approximate_the_rbf_kernel():
    from bayescurv.bo.features import FourierFeatures

    g = torch.Generator().manual_seed(0)
    ff = FourierFeatures(3, 20000, lengthscale=0.4, generator=g).to(DT)
    x = torch.rand(6, 3, dtype=DT, generator=g)
    K = ff(x) @ ff(x).T
    ref = torch.exp(-torch.cdist(x, x).square() / (2 * 0.4**2))
    torch.testing.assert_close(K, ref, atol=0.03, rtol=0)  # Monte Carlo error ~ 1/sqrt(F)
    assert not any(p.requires_grad for p in ff.parameters())  # frozen: buffers only
    ard = FourierFeatures(2, 8, lengthscale=[0.5, 2.0], generator=g)
    assert ard.weight.shape == (8, 2)
    with pytest.raises(ValueError, match="lengthscale"):
        FourierFeatures(2, 8, lengthscale=[0.5, 1.0, 2.0])


def test_default_model_is_exact_bayesian_linear_regression_on_the_selected_features():
    """Theorem: the default surrogate is linear in its trainable weights, so its posterior is
    Bayesian linear regression on the features; mean, covariance and evidence are checked
    against the closed forms, and the kept lengthscale has the best MAP-II objective."""
    X, Y = _data(n=15)
    grid = (0.1, 0.3, 1.0)
    model = LaplaceModel(X, Y, seed=0, num_features=64, lengthscales=grid)
    feats, head = model.net[0], model.net[1]
    Phi = torch.cat([feats(X), torch.ones(15, 1, dtype=DT)], 1)  # weight then bias order
    delta, s2 = model.la.prior_precision.reshape(()), model.la.sigma_noise ** 2
    A = Phi.T @ Phi / s2 + delta * torch.eye(65, dtype=DT)
    w = torch.linalg.solve(A, Phi.T @ Y / s2).squeeze(-1)
    Xq = torch.rand(5, 2, dtype=DT)
    Pq = torch.cat([feats(Xq), torch.ones(5, 1, dtype=DT)], 1)
    post = model.posterior(Xq[:, None])
    torch.testing.assert_close(post.mean.reshape(5), Pq @ w, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(post.variance.reshape(5),
                               (Pq @ torch.linalg.solve(A, Pq.T)).diagonal(), rtol=1e-6, atol=1e-9)
    cov = Phi @ Phi.T / delta + s2 * torch.eye(15, dtype=DT)
    ev = torch.distributions.MultivariateNormal(torch.zeros(15, dtype=DT), cov).log_prob(Y[:, 0])
    from bayescurv.bo.hyperparameters import default_noise_prior, noise_log_prior

    objective = ev + noise_log_prior(default_noise_prior(), model.la.sigma_noise)
    torch.testing.assert_close(torch.as_tensor(model.log_evidence, dtype=DT), objective,
                               rtol=1e-8, atol=1e-8)
    assert head.weight.requires_grad and not feats.weight.requires_grad
    scores = [LaplaceModel(X, Y, seed=0, num_features=64, lengthscales=(ell,)).log_evidence
              for ell in grid]
    assert model.log_evidence == pytest.approx(max(scores))


def test_noiseless_objective_is_interpolated():
    """The linearized evidence re-solves the mean for every noise level, so a smooth noiseless
    function gets a small noise and a near-interpolating mean."""
    X, Y = _data(n=25)
    model = LaplaceModel(X, Y, seed=0, noise_prior=None)
    assert model.la.sigma_noise < 0.05
    resid = model.posterior(X[:, None]).mean.reshape(-1) - Y.reshape(-1)
    assert resid.abs().max() < 0.1 * Y.std()


def test_evidence_argument_is_checked():
    X, Y = _data(n=8)
    with pytest.raises(ValueError, match="evidence"):
        LaplaceModel(X, Y, evidence="exact")
    with pytest.raises(ValueError, match="structure='full'"):
        LaplaceModel(X, Y, evidence="linearized", **{**FAST, "structure": "kfac"})
    with pytest.raises(InputDataError, match="empty"):
        LaplaceModel(X, Y, network=[])


def test_output_indices_and_subset_output_with_an_outcome_transform():
    """Marginals of the joint posterior, untransformed with the selected outputs' scales."""
    from botorch.models import ModelList
    from botorch.models.transforms import Standardize

    from bayescurv.bo.subset import OutputSubsetModel

    X, Y = _data(n=20, m=3)
    Y = Y * torch.tensor([1.0, 10.0, 0.1], dtype=DT) + torch.tensor([0.0, 100.0, -5.0], dtype=DT)
    model = LaplaceModel(X, Y, seed=0, num_features=32, outcome_transform=Standardize(3))
    Xq = torch.rand(2, 3, 2, dtype=DT)
    full = model.posterior(Xq)
    cov = full.distribution.covariance_matrix  # interleaved (q m) x (q m)
    for idcs in ([1], [2, 0]):
        for post in (model.posterior(Xq, output_indices=idcs),
                     model.subset_output(idcs).posterior(Xq)):
            torch.testing.assert_close(post.mean, full.mean[..., idcs])
            rows = (torch.arange(3)[:, None] * 3 + torch.tensor(idcs)[None]).reshape(-1)
            torch.testing.assert_close(post.distribution.covariance_matrix,
                                       cov[..., rows[:, None], rows[None, :]])
    sub = model.subset_output([2, 1])
    assert isinstance(sub, OutputSubsetModel) and sub.num_outputs == 2
    torch.testing.assert_close(sub.subset_output([1]).posterior(Xq).mean, full.mean[..., [1]])
    noise = torch.full((2, 3, 2), 0.5, dtype=DT)  # outcome-transformed units
    noisy = sub.posterior(Xq, observation_noise=noise).variance
    scale2 = model.outcome_transform.stdvs.squeeze(0)[[2, 1]] ** 2
    torch.testing.assert_close(noisy - sub.posterior(Xq).variance, 0.5 * scale2.expand(2, 3, 2))
    # a ModelList of the multi-output model and a single-output one subsets through it
    other = LaplaceModel(X, Y[:, :1], seed=0, num_features=32)
    listed = ModelList(model, other).subset_output([1, 3])
    torch.testing.assert_close(listed.posterior(Xq).mean[..., 0], full.mean[..., 1])
    with pytest.raises(BotorchTensorDimensionError):
        model.subset_output([3])
    with pytest.raises(NotImplementedError, match="condition the full model"):
        sub.condition_on_observations(X[:2], Y[:2, :2])
