"""IterGLM at its edges (issue 29): CG at full span equals Cholesky with recycling on, the
combined-covariance bound at the same curvature W, Newton's convergence report and line
search, and kernel hyperparameters learned by the computation-aware evidence."""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from sklearn.datasets import load_breast_cancer, make_moons

from bayescurv.errors import ConvergenceWarning, InvalidArgumentError
from bayescurv.glm import IterGLM
from bayescurv.glm.solver import ActionState, trace_gap

DT = torch.float64


def rbf(lengthscale=0.5, outputscale=2.0):
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DT)
    k.base_kernel.lengthscale = lengthscale
    k.outputscale = outputscale
    return k


def rel(a, b):
    return float((a - b).norm() / b.norm())


def moons(n=150):
    X, y = make_moons(n, noise=0.2, random_state=0)
    return torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)


@torch.no_grad()
def joint_cov(model, Xs, exact=False):
    """Joint latent covariance over ``Xs`` (C = 1): the model's combined one, or (``exact``)
    the exact Laplace covariance at the model's own curvature W."""
    X, S = model.X_, model.S_
    Kd = model.kernel.dense(X, X, 1)
    Kx = model.kernel.dense(Xs, X, 1)
    U = model._St(S, Kx.T.unsqueeze(1))  # Sᵀ k(X, x): (N, B)
    if exact:
        red = U.T @ torch.linalg.solve(model._dense_A(Kd, S), U)
    else:
        red = (U.T @ model.state_.D) @ (model.state_.D.T @ U)
    return model.kernel.dense(Xs, Xs, 1) - red


# ------------------------------------------------------------------------------------------
# max_actions >= N C reproduces Cholesky (recycle=True, the default)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cg_full_span_equals_cholesky_breast_cancer():
    Xn, yn = load_breast_cancer(return_X_y=True)
    X = torch.tensor(Xn, dtype=DT)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(yn, dtype=DT)
    ref = IterGLM("binary", "features", solver="cholesky").fit(X, y)
    it = IterGLM("binary", "features", policy="cg", max_actions=X.shape[0], tol=0.0).fit(X, y)
    assert it.recycle and it.converged
    (mi, ci), (mr, cr) = it.coefficients(), ref.coefficients()
    assert rel(mi, mr) < 1e-8 and rel(ci, cr) < 1e-8
    lml, lml_ref = it.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs(float(lml - lml_ref)) < 1e-8 * abs(float(lml_ref))


@pytest.mark.parametrize("likelihood", ["binary",
                                        pytest.param("classification", marks=pytest.mark.slow)])
def test_cg_full_span_equals_cholesky_gp_classifier(likelihood):
    X, y = moons()
    if likelihood == "classification":
        y = (y + (X[:, 0] > 1.0)).long()  # three classes
    ref = IterGLM(likelihood, rbf(), solver="cholesky").fit(X, y)
    N = X.shape[0] * ref.C_
    it = IterGLM(likelihood, rbf(), policy="cg", max_actions=N, tol=0.0).fit(X, y)
    Xs = X[:40] + 0.05
    p, q = it.predict(Xs), ref.predict(Xs)
    assert rel(p.mean, q.mean) < 1e-8
    assert rel(p.covariance, q.covariance) < 1e-8
    lml, lml_ref = it.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs(float(lml.detach() - lml_ref.detach())) < 1e-8 * abs(float(lml_ref.detach()))
    assert it.trace_gap <= 1e-10 * max(1.0, float(it.S_.square().sum()) * 2.0)


def test_trace_gap_bounds_the_projected_logdet():
    """0 <= log det A - log det QᵀAQ <= τ for any action space (random, growing)."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(40, 40, generator=g, dtype=DT) / 3
    A = torch.eye(40, dtype=DT) + B @ B.T
    trace = float(torch.trace(A) - 40)
    state = ActionState(40, DT, A.device)
    exact = float(torch.linalg.slogdet(A)[1])
    for _ in range(6):
        S = torch.randn(40, 5, generator=g, dtype=DT)
        state.add(S, A @ S)
        D = state.D
        proj = float(torch.linalg.slogdet(D.T @ A @ D)[1] - torch.linalg.slogdet(D.T @ D)[1])
        tau = trace_gap(state, trace)
        assert -1e-10 <= exact - proj <= tau + 1e-10
    assert state.rank == 30


# ------------------------------------------------------------------------------------------
# the covariance bound holds at the same W (and only there)
# ------------------------------------------------------------------------------------------
def poisson_data(n=60, slope=0.8, level=1.0):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g, dtype=DT)
    y = torch.poisson(torch.exp(slope * X[:, 0] + level), generator=g)
    return X, y


@pytest.mark.parametrize("actions", [2, 10])
@pytest.mark.parametrize("level", [1.0, 2.0])
def test_combined_covariance_above_exact_at_the_same_w(actions, level):
    X, y = poisson_data(slope=0.8 * level, level=level)
    Xs = torch.randn(25, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        it = IterGLM("poisson", rbf(0.8, 1.5), policy="cg", max_actions=actions).fit(X, y)
    gap = joint_cov(it, Xs) - joint_cov(it, Xs, exact=True)
    scale = float(joint_cov(it, Xs, exact=True).diagonal().max())
    assert float(torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min()) > -1e-10 * scale


def test_combined_covariance_not_above_exact_at_another_w():
    """The condition matters: with 2 actions the iterate is far from the MAP, where W = exp(f)
    differs, and the combined covariance is not above the MAP's exact Laplace covariance."""
    X, y = poisson_data(slope=1.5, level=2.0)
    Xs = torch.randn(25, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    ref = IterGLM("poisson", rbf(0.8, 1.5), solver="cholesky").fit(X, y)
    with pytest.warns(ConvergenceWarning):
        it = IterGLM("poisson", rbf(0.8, 1.5), policy="cg", max_actions=2).fit(X, y)
    with torch.no_grad():
        K = ref.kernel.dense(X, X, 1)
        Kx = ref.kernel.dense(Xs, X, 1)
        U = ref._St(ref.S_, Kx.T.unsqueeze(1))
        exact_map = ref.kernel.dense(Xs, Xs, 1) - U.T @ torch.linalg.solve(
            ref._dense_A(K, ref.S_), U)
        gap = joint_cov(it, Xs) - exact_map
    assert float(torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min()) < 0


# ------------------------------------------------------------------------------------------
# Newton's report and line search
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["poisson", "binary"])
def test_few_actions_newton_reports_and_warns(likelihood):
    X, y = poisson_data() if likelihood == "poisson" else moons(80)
    kern = rbf(0.8, 1.5) if likelihood == "poisson" else rbf()
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        it = IterGLM(likelihood, kern, policy="cg", max_actions=2).fit(X, y)
    assert it.converged is False
    assert it.newton_steps == len(it.history) < it.max_newton
    assert it.grad_norm > 1e-3
    psi = [h["psi"] for h in it.history]
    assert all(b >= a - 1e-12 * abs(a) for a, b in zip(psi, psi[1:]))  # never a lower step


@pytest.mark.parametrize("solver", ["iterative", "cholesky"])
def test_converged_fit_reports_converged(solver):
    X, y = poisson_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        it = IterGLM("poisson", rbf(0.8, 1.5), solver=solver).fit(X, y)
        wt = IterGLM("poisson", "features", solver="cholesky").fit(X, y)  # weight space
    assert it.converged and wt.converged
    assert 0 < it.newton_steps < it.max_newton
    assert it.grad_norm < 1e-6 and wt.grad_norm < 1e-6


def test_max_newton_exhausted_warns():
    X, y = poisson_data()
    with pytest.warns(ConvergenceWarning, match="max_newton=2"):
        it = IterGLM("poisson", rbf(0.8, 1.5), solver="cholesky", max_newton=2).fit(X, y)
    assert not it.converged and it.newton_steps == 2


# ------------------------------------------------------------------------------------------
# kernel hyperparameters by the (computation-aware) evidence
# ------------------------------------------------------------------------------------------
def test_fit_hyperparameters_raises_evidence_and_matches_cholesky():
    X, y = moons(40)
    start = rbf(2.0, 0.5)
    before = float(IterGLM("binary", rbf(2.0, 0.5), solver="cholesky").fit(X, y)
                   .log_marginal_likelihood())
    runs = {}
    for solver in ("cholesky", "iterative"):
        k = rbf(2.0, 0.5)
        m = IterGLM("binary", k, solver=solver, tol=0.0).fit_hyperparameters(
            X, y, n_steps=8, lr=0.15)
        runs[solver] = (float(k.base_kernel.lengthscale), float(k.outputscale),
                        float(m.log_marginal_likelihood()))
        assert m.hyper_history[-1] > m.hyper_history[0]
    assert runs["cholesky"][2] > before + 1.0
    # at full span the computation-aware evidence is the exact one: the same path
    for a, b in zip(runs["iterative"], runs["cholesky"]):
        assert math.isclose(a, b, rel_tol=1e-6)
    assert float(start.base_kernel.lengthscale) == pytest.approx(2.0)  # a copy was not used


def test_fit_hyperparameters_errors():
    X, y = moons(30)
    with pytest.raises(InvalidArgumentError, match="nn.Module"):
        IterGLM("binary", "features").fit_hyperparameters(X, y)
    with pytest.raises(InvalidArgumentError, match="n_steps"):
        IterGLM("binary", rbf()).fit_hyperparameters(X, y, n_steps=0)
