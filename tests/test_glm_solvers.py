"""IterGLM (bayescurv.glm) against ground truth: Cholesky Laplace, Rasmussen & Williams
Alg. 3.1/3.3, the linearized Laplace of a network, and statsmodels GLM fits."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.errors import InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.glm import EmpiricalNTK, FeatureKernel, IterGLM, KernelFunction, OperatorKernel
from bayescurv.glm.solver import ActionState, Policy, solve

DT = torch.float64


def rbf():
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DT)
    k.base_kernel.lengthscale = 0.8
    k.outputscale = 1.5
    return k


def data(likelihood, N=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 2, generator=g, dtype=DT)
    noise = torch.randn(N, generator=g, dtype=DT)
    offset = None
    if likelihood == "binary":
        y = (X[:, 0] + 0.5 * noise > 0).to(DT)
    elif likelihood == "poisson":
        offset = 0.3 * torch.rand(N, generator=g, dtype=DT)
        y = torch.poisson(torch.exp(0.6 * X[:, 0] + offset), generator=g)
    elif likelihood == "binomial":
        n = torch.randint(1, 8, (N,), generator=g).to(DT)
        k = torch.binomial(n, torch.sigmoid(X[:, 0]), generator=g)
        y = torch.stack([k, n - k], -1)
    elif likelihood == "classification":
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.3).long()
    else:
        y = torch.sin(2 * X[:, 0]) + 0.2 * noise
    return X, y, offset


LIKELIHOODS = ["binary", "poisson", "binomial", "classification", "regression"]
XS = torch.randn(9, 2, generator=torch.Generator().manual_seed(5), dtype=DT)


@pytest.fixture(scope="module")
def references():
    out = {}
    for lik in LIKELIHOODS:
        X, y, o = data(lik)
        out[lik] = (X, y, o, IterGLM(lik, rbf(), solver="cholesky", sigma_noise=0.5).fit(X, y, o))
    return out


# ------------------------------------------------------------------------------------------
# spanning actions reproduce the exact Laplace
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("policy", ["unit", "random"])
def test_spanning_actions_equal_cholesky(references, likelihood, policy):
    X, y, o, ref = references[likelihood]
    model = IterGLM(likelihood, rbf(), policy=policy, block=7, tol=0.0, sigma_noise=0.5)
    model.fit(X, y, o)
    assert model.state_.rank == X.shape[0] * model.C_  # the actions span R^{NC}
    p, q = model.predict(XS), ref.predict(XS)
    torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(p.covariance, q.covariance, rtol=0, atol=1e-8)
    assert p.computational.abs().max() < 1e-8
    torch.testing.assert_close(model.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("cached", [True, False])
def test_unit_policy_is_a_subset_laplace_from_kernel_columns(cached):
    """Unit actions on n of N points give exactly the Laplace of that subset (mean and
    covariance), and only the subset's kernel columns are ever evaluated: no product with the
    full N x N kernel, no dense one-hot products."""
    N, n, C = 120, 12, 3
    g = torch.Generator().manual_seed(5)
    X = torch.randn(N, 2, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    entries = []

    def k(X1, X2):
        entries.append(X1.shape[0] * X2.shape[0])
        return rbf()(X1, X2).to_dense().detach()

    kf = KernelFunction(k, max_cached=N * N if cached else 0)
    model = IterGLM("classification", kf, policy="unit", block=4, max_actions=n * C,
                    tol=0.0, num_classes=C).fit(X, y)
    fit_entries = sum(entries)
    sub = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:n]
    ref = IterGLM("classification", rbf(), solver="cholesky", num_classes=C).fit(X[sub], y[sub])
    p, q = model.predict(XS, computational=False), ref.predict(XS)
    torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(p.covariance, q.covariance, rtol=0, atol=1e-8)
    if cached:
        assert fit_entries == N * N  # the cache; afterwards only gathers
    else:
        assert fit_entries <= 2 * N * n * (len(model.history) + 2), fit_entries
        assert max(entries) <= 2048 * n  # blocks of subset columns, never (N, N)


@pytest.mark.parametrize("likelihood,C", [("binary", 1), ("classification", 3)])
def test_coverage_of_the_true_latent_when_well_specified(likelihood, C):
    """The latent truth drawn from the GP prior: exact Laplace's 95 % intervals cover it at
    about the nominal rate (of the identifiable contrasts f_c - mean(f) for softmax), and an
    early-stopped solver's combined intervals cover at least as often (measured: Cholesky
    0.957 / 0.932, CG with 10 actions 1.0 / 0.996)."""
    g = torch.Generator().manual_seed(0)
    N, B = 300, 300
    k = rbf()
    k.base_kernel.lengthscale, k.outputscale = 0.5, 2.0
    k.requires_grad_(False)
    Xa = 4 * torch.rand(N + B, 2, generator=g, dtype=DT) - 2
    L = torch.linalg.cholesky(k(Xa).to_dense() + 1e-8 * torch.eye(N + B, dtype=DT))
    F = L @ torch.randn(N + B, C, generator=g, dtype=DT)
    y = (torch.bernoulli(torch.sigmoid(F[:N, 0]), generator=g) if C == 1 else
         torch.multinomial(torch.softmax(F[:N], -1), 1, generator=g).squeeze(-1))
    P = torch.eye(C, dtype=DT) - (1.0 / C if C > 1 else 0.0)
    cover = {}
    for name, kw in (("exact", dict(solver="cholesky")), ("cg", dict(max_actions=10))):
        pred = IterGLM(likelihood, k, num_classes=C if C > 1 else None, **kw).fit(
            Xa[:N], y).predict(Xa[N:], computational=False)
        v = torch.einsum("ij,bjk,ik->bi", P, pred.covariance, P)
        err = (F[N:] - pred.mean) @ P
        cover[name] = float((err.abs() <= 1.96 * v.sqrt()).double().mean())
    assert 0.92 <= cover["exact"] <= 0.99, cover
    assert cover["cg"] >= cover["exact"], cover


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_cg_converged_mean_equals_cholesky(references, likelihood):
    X, y, o, ref = references[likelihood]
    model = IterGLM(likelihood, rbf(), policy="cg", tol=1e-12, sigma_noise=0.5).fit(X, y, o)
    torch.testing.assert_close(model.predict(XS).mean, ref.predict(XS).mean, rtol=0, atol=1e-8)
    assert model.num_actions < X.shape[0] * model.C_ * len(model.history)


def test_operator_kernel_matches_kernel_function(references):
    X, y, o, ref = references["binary"]
    allX = torch.cat([X, XS])
    K = rbf()(allX).to_dense().detach()
    idx = torch.arange(X.shape[0])
    model = IterGLM("binary", OperatorKernel(K), policy="unit", block=10, tol=0.0).fit(idx, y)
    p = model.predict(torch.arange(X.shape[0], allX.shape[0]))
    q = ref.predict(XS)
    torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(p.covariance, q.covariance, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------
# Rasmussen & Williams, Algorithms 3.1-3.4, written out independently
# ------------------------------------------------------------------------------------------
def rw_binary(K, y, Ks, kss):
    """Alg. 3.1 (mode, evidence) and 3.2 (latent predictive) with the logistic likelihood;
    ``y`` in {-1, +1}."""
    N = K.shape[0]
    f = torch.zeros(N, dtype=DT)
    for _ in range(100):
        pi = torch.sigmoid(f)
        W = pi * (1 - pi)
        sW = W.sqrt()
        L = torch.linalg.cholesky(torch.eye(N, dtype=DT) + sW[:, None] * K * sW[None, :])
        b = W * f + (y + 1) / 2 - pi
        a = b - sW * torch.cholesky_solve((sW * (K @ b)).unsqueeze(-1), L).squeeze(-1)
        f = K @ a
    pi = torch.sigmoid(f)
    W = pi * (1 - pi)
    sW = W.sqrt()
    L = torch.linalg.cholesky(torch.eye(N, dtype=DT) + sW[:, None] * K * sW[None, :])
    logq = -0.5 * a @ f + torch.nn.functional.logsigmoid(y * f).sum() - torch.log(
        torch.diagonal(L)).sum()
    mean = Ks @ ((y + 1) / 2 - pi)
    v = torch.linalg.solve_triangular(L, (sW[:, None] * Ks.T), upper=False)
    var = kss - (v * v).sum(0)
    return f, logq, mean, var


def rw_softmax(K, Y, Ks):
    """Alg. 3.3 (mode, evidence) and 3.4 (latent predictive covariance) for C classes
    sharing the kernel ``K``; ``f`` is stored class-major as in the book."""
    N, C = Y.shape
    f = torch.zeros(C * N, dtype=DT)
    y = Y.T.reshape(-1)
    for _ in range(100):
        F = f.reshape(C, N)
        pi = torch.softmax(F, 0).reshape(-1)
        Pi = torch.cat([torch.diag(p) for p in pi.reshape(C, N)])  # (CN, N)
        E = []
        for c in range(C):
            sd = pi.reshape(C, N)[c].sqrt()
            L = torch.linalg.cholesky(torch.eye(N, dtype=DT) + sd[:, None] * K * sd[None, :])
            E.append(sd[:, None] * torch.cholesky_solve(torch.diag(sd), L))
        Esum = sum(E)
        Lm = torch.linalg.cholesky(Esum)
        b = (torch.diag(pi) - Pi @ Pi.T) @ f + y - pi
        c_ = torch.cat([E[c] @ K @ b.reshape(C, N)[c] for c in range(C)])
        Rt = torch.cat([torch.eye(N, dtype=DT)] * C)  # R = stacked identities
        a = b - c_ + torch.cat([E[c] @ torch.cholesky_solve((Rt.T @ c_).unsqueeze(-1), Lm
                                                             ).squeeze(-1) for c in range(C)])
        f = torch.cat([K @ a.reshape(C, N)[c] for c in range(C)])
    # Alg. 3.3's z = Σ_c log|L_c| omits the determinant of the ππᵀ coupling; the exact
    # log|I + W K| (W with its off-diagonal blocks) is used instead
    F = f.reshape(C, N)
    pi = torch.softmax(F, 0)
    W = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in pi.T])
    logdet = torch.linalg.slogdet(torch.eye(N * C, dtype=DT) + W @ torch.kron(
        K, torch.eye(C, dtype=DT)))[1]
    logq = -0.5 * a @ f + y @ f - torch.logsumexp(F, 0).sum() - 0.5 * logdet
    mean = torch.stack([Ks @ (Y[:, c] - pi[c]) for c in range(C)], -1)
    return F.T, logq, mean


def test_newton_equals_rasmussen_williams_binary(references):
    X, y01, _, ref = references["binary"]
    k = rbf()
    with torch.no_grad():
        K, Ks = k(X).to_dense(), k(XS, X).to_dense()
        kss = k(XS, diag=True)
    f, logq, mean, var = rw_binary(K, 2 * y01 - 1, Ks, kss)
    torch.testing.assert_close(ref.f_.squeeze(-1), f, rtol=0, atol=1e-10)
    p = ref.predict(XS)
    torch.testing.assert_close(p.mean.squeeze(-1), mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(p.variance.squeeze(-1), var, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.log_marginal_likelihood().detach(), logq, rtol=0, atol=1e-10)


def test_newton_equals_rasmussen_williams_softmax(references):
    X, y, _, ref = references["classification"]
    C = 3
    Y = torch.nn.functional.one_hot(y, C).to(DT)
    k = rbf()
    with torch.no_grad():
        K, Ks = k(X).to_dense(), k(XS, X).to_dense()
    f, logq, mean = rw_softmax(K, Y, Ks)
    torch.testing.assert_close(ref.f_, f, rtol=0, atol=1e-9)
    torch.testing.assert_close(ref.predict(XS).mean, mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(ref.log_marginal_likelihood().detach(), logq, rtol=0, atol=1e-9)
    # Alg. 3.4's covariance: k** I - Q with Q from (K + W⁻¹)⁻¹, here through W^{1/2}
    p = torch.softmax(f, -1)
    W = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    Kf = torch.kron(K, torch.eye(C, dtype=DT))
    Ksf = torch.kron(Ks, torch.eye(C, dtype=DT))
    M = torch.eye(K.shape[0] * C, dtype=DT) + W @ Kf
    cov = torch.kron(torch.diag(k(XS, diag=True).detach()), torch.eye(C, dtype=DT)) \
        - Ksf @ torch.linalg.solve(M, W) @ Ksf.T
    blocks = torch.stack([cov[i * C:(i + 1) * C, i * C:(i + 1) * C] for i in range(XS.shape[0])])
    torch.testing.assert_close(ref.predict(XS).covariance, blocks, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------
# the combined covariance
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["binary", "classification", "poisson"])
@pytest.mark.parametrize("policy", ["cg", "unit", "random"])
def test_variance_above_exact_and_nonincreasing(references, likelihood, policy):
    X, y, o, ref = references[likelihood]
    exact = ref.predict(XS)
    # at the exact mode's operator A, add actions one block at a time (nested actions)
    model = IterGLM(likelihood, rbf(), policy=policy, block=3, tol=0.0, sigma_noise=0.5)
    model.fit(X, y, o)
    S, C = ref.S_, ref.C_
    K_mv = model.kernel.train(X, C)
    A = model._A(K_mv, S)
    z = torch.randn(X.shape[0] * C, 1, dtype=DT)
    state = ActionState(z.shape[0], DT, z.device)
    pol = Policy(policy, X.shape[0], C, 3, None, torch.Generator().manual_seed(1))
    model.S_, model.state_ = S, state
    prev = None
    for j in range(0, X.shape[0] * C + 1, 6):
        if j:
            with torch.no_grad():
                solve(A, z, state, pol, j, 0.0)
        pred = model.predict(XS)
        assert (pred.variance >= exact.variance - 1e-10).all()
        gap = pred.variance - exact.variance
        assert (gap <= pred.computational + 1e-9).all()  # the computational bound holds
        if prev is not None:
            assert (pred.variance <= prev + 1e-10).all()
        prev = pred.variance
        pol.pos = state.rank // C if policy == "unit" else pol.pos


def test_truncated_solver_is_conservative(references):
    X, y, o, ref = references["classification"]
    exact = ref.predict(XS)
    for m in (3, 10, 30):
        pred = IterGLM("classification", rbf(), policy="cg", max_actions=m).fit(X, y).predict(XS)
        assert (pred.variance >= exact.variance - 1e-10).all()
        assert pred.computational.max() > 0


@pytest.mark.parametrize("rank", [2, 8])
def test_compression_never_below_exact(references, rank):
    X, y, o, ref = references["binary"]
    exact = ref.predict(XS)
    model = IterGLM("binary", rbf(), policy="cg", rank=rank, max_actions=20, max_newton=6)
    model.fit(X, y)
    assert model.state_.rank <= rank
    pred = model.predict(XS)
    assert (pred.variance >= exact.variance - 1e-10).all()
    # compression itself only removes precision: C_r ⪯ C
    state = ActionState(X.shape[0], DT, X.device)
    A = model._A(model.kernel.train(X, 1), ref.S_)
    U = torch.randn(X.shape[0], 12, dtype=DT)
    state.add(U, A(U))
    full = state.apply_C(torch.eye(X.shape[0], dtype=DT))
    state.compress(rank)
    diff = full - state.apply_C(torch.eye(X.shape[0], dtype=DT))
    assert torch.linalg.eigvalsh(0.5 * (diff + diff.T)).min() > -1e-10
    torch.testing.assert_close(state.AD, A(state.D))  # A D stays consistent, no products


@pytest.mark.parametrize("likelihood", ["binary", "poisson", "classification"])
def test_recycling_same_answer_fewer_actions(likelihood):
    X, y, o = data(likelihood, N=60)
    kw = dict(policy="cg", tol=1e-12)
    fresh = IterGLM(likelihood, rbf(), recycle=False, **kw).fit(X, y, o)
    rec = IterGLM(likelihood, rbf(), recycle=True, **kw).fit(X, y, o)
    torch.testing.assert_close(rec.predict(XS).mean, fresh.predict(XS).mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(rec.f_, fresh.f_, rtol=0, atol=1e-8)
    assert rec.num_actions < fresh.num_actions


# ------------------------------------------------------------------------------------------
# weight space, summary, evidence gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["binary", "poisson", "classification"])
def test_weight_space_equals_function_space(likelihood):
    X, y, o = data(likelihood, N=25)
    Phi = torch.cat([torch.ones(25, 1, dtype=DT), X, X[:, :1] ** 2], 1)
    prec = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=DT)
    w = IterGLM(likelihood, FeatureKernel(prec), solver="cholesky").fit(Phi, y, o)
    f = IterGLM(likelihood, FeatureKernel(prec), policy="unit", block=5, tol=0.0).fit(Phi, y, o)
    assert w.state_ is None and f.state_ is not None
    Ps = torch.cat([torch.ones(9, 1, dtype=DT), XS, XS[:, :1] ** 2], 1)
    pw, pf = w.predict(Ps), f.predict(Ps)
    torch.testing.assert_close(pw.mean, pf.mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(pw.covariance, pf.covariance, rtol=0, atol=1e-8)
    (mw, cw), (mf, cf) = w.coefficients(), f.coefficients()
    torch.testing.assert_close(mw, mf, rtol=0, atol=1e-8)
    torch.testing.assert_close(cw, cf, rtol=0, atol=1e-8)
    torch.testing.assert_close(w.log_marginal_likelihood(), f.log_marginal_likelihood(),
                               rtol=0, atol=1e-8)
    table = w.summary(["const", "a", "b", "a2"])
    assert "const" in table and "deviance" in table


def test_evidence_gradient_matches_finite_differences():
    X, y, _ = data("binary", N=20)
    ls = torch.tensor(0.7, dtype=DT)

    def lml(value, grad=False):
        k = rbf()
        k.base_kernel.lengthscale = value
        model = IterGLM("binary", k, solver="cholesky").fit(X, y)
        if not grad:
            return model.log_marginal_likelihood().item()
        out = model.log_marginal_likelihood()
        (g,) = torch.autograd.grad(out, k.base_kernel.raw_lengthscale)
        dls = torch.sigmoid(k.base_kernel.raw_lengthscale)  # softplus'
        return (g / dls).item()

    h = 1e-5
    fd = (lml(ls + h) - lml(ls - h)) / (2 * h)
    assert abs(lml(ls, grad=True) - fd) < 1e-6 * (1 + abs(fd))
    # prior precision of a feature model
    Phi = torch.cat([torch.ones(20, 1, dtype=DT), X], 1)
    for solver, extra in (("cholesky", {}), ("iterative", dict(policy="unit", tol=0.0))):
        def ev(d, solver=solver, extra=extra):
            return IterGLM("binary", FeatureKernel(d), solver=solver, **extra).fit(
                Phi, y).log_marginal_likelihood()

        d = torch.tensor(0.8, dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(ev(d), d)
        fd = (ev(torch.tensor(0.8 + h, dtype=DT)) - ev(torch.tensor(0.8 - h, dtype=DT))) / (2 * h)
        assert abs(g.item() - fd.item()) < 1e-6


def test_predict_proba_shapes(references):
    X, y, _, ref = references["classification"]
    p = ref.predict_proba(XS)
    assert p.shape == (9, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(9, dtype=DT))
    X, y, _, ref = references["binary"]
    assert ref.predict_proba(XS).shape == (9,)
    with pytest.raises(InvalidArgumentError):
        references["poisson"][3].predict_proba(XS)


def test_errors():
    with pytest.raises(InvalidArgumentError):
        IterGLM("binary", rbf(), policy="lanczos")
    with pytest.raises(InvalidArgumentError):
        IterGLM("binary", rbf(), solver="qr")
    with pytest.raises(NotFittedError):
        IterGLM("binary", rbf()).predict(XS)
    X, y, _ = data("poisson")
    with pytest.raises(ShapeError):
        IterGLM("poisson", rbf()).fit(X, y, offset=torch.zeros(3))
    with pytest.raises(InvalidArgumentError):
        IterGLM("binary", FeatureKernel(-1.0))
    with pytest.raises(InvalidArgumentError):
        IterGLM("binary", rbf(), policy="pcg", preconditioner="nope").fit(*data("binary")[:2])


def test_progress_bar_and_pcg(references):
    X, y, o, ref = references["poisson"]
    model = IterGLM("poisson", rbf(), policy="pcg", tol=1e-12, progress=True).fit(X, y, o)
    torch.testing.assert_close(model.predict(XS).mean, ref.predict(XS).mean, rtol=0, atol=1e-7)


def test_float32_close_to_float64(references):
    X, y, o, ref = references["binary"]
    k = rbf().float()
    model = IterGLM("binary", KernelFunction(k), policy="cg", tol=1e-6).fit(X.float(), y.float())
    p = model.predict(XS.float())
    assert p.mean.dtype == torch.float32
    torch.testing.assert_close(p.mean.double(), ref.predict(XS).mean, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------
# the empirical NTK of a fitted Laplace: the GLM posterior is the linearized Laplace
# ------------------------------------------------------------------------------------------
def trained_net(likelihood, delta):
    torch.manual_seed(0)
    C = 3 if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, C)).to(DT)
    X, y, _ = data(likelihood, N=24)
    if likelihood == "regression":
        loss_fn = lambda out: 0.5 * ((out.squeeze(-1) - y) ** 2).sum()  # noqa: E731
    else:
        loss_fn = lambda out: nn.functional.cross_entropy(out, y, reduction="sum")  # noqa: E731
    opt = torch.optim.LBFGS(net.parameters(), max_iter=2000, tolerance_grad=1e-13,
                            tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(X)) + 0.5 * delta * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return net, X, y


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_empirical_ntk_equals_linearized_laplace(likelihood):
    delta = 2.0
    net, X, y = trained_net(likelihood, delta)
    la = Laplace(net, likelihood, structure="full", prior_precision=delta)
    la.fit([(X, y)], progress=False)
    model = IterGLM(likelihood, EmpiricalNTK(la), policy="unit", block=8, tol=0.0,
                    max_newton=20).fit(X, y)
    pred = model.predict(XS)
    mean, cov = la.functional(XS)
    torch.testing.assert_close(pred.mean, mean.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pred.covariance, cov.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.log_marginal_likelihood().detach(),
                               la.log_marginal_likelihood().detach(), rtol=0, atol=1e-5)
    # the Laplace's own K-FAC curvature as preconditioner
    lak = Laplace(net, likelihood, structure="kfac", prior_precision=delta)
    lak.fit([(X, y)], progress=False)
    pcg = IterGLM(likelihood, EmpiricalNTK(lak), policy="pcg", preconditioner="laplace",
                  tol=1e-10).fit(X, y)
    cg = IterGLM(likelihood, EmpiricalNTK(lak), policy="cg", tol=1e-10).fit(X, y)
    torch.testing.assert_close(pcg.predict(XS).mean, mean.detach(), rtol=0, atol=1e-5)
    assert pcg.num_actions <= cg.num_actions


# ------------------------------------------------------------------------------------------
# statsmodels GLM on its bundled datasets: MAP with a vanishing prior = the MLE
# ------------------------------------------------------------------------------------------
sm = pytest.importorskip("statsmodels.api")


def _t(a):
    return torch.tensor(a.to_numpy() if hasattr(a, "to_numpy") else a, dtype=DT)


def _sm_case(name):
    import numpy as np

    if name == "cpunish":
        d = sm.datasets.cpunish.load_pandas()
        exog = d.exog.drop(columns=["VC100k96"]).copy()
        exog["INCOME"] = np.log(exog["INCOME"])
        exog = sm.add_constant(exog)
        exposure = d.exog["VC100k96"].to_numpy()
        res = sm.GLM(d.endog, exog, family=sm.families.Poisson(), exposure=exposure).fit(
            tol=1e-13)
        return "poisson", _t(exog), _t(d.endog), dict(exposure=_t(exposure)), res
    if name == "star98":
        d = sm.datasets.star98.load_pandas()
        exog = sm.add_constant(d.exog)
        res = sm.GLM(d.endog, exog, family=sm.families.Binomial()).fit(tol=1e-13)
        return "binomial", _t(exog), _t(d.endog), {}, res
    if name == "spector":
        d = sm.datasets.spector.load_pandas()
        exog = sm.add_constant(d.exog)
        res = sm.GLM(d.endog, exog, family=sm.families.Binomial()).fit(tol=1e-13)
        return "binary", _t(exog), _t(d.endog), {}, res
    if name == "randhie":
        d = sm.datasets.randhie.load_pandas()
        exog = sm.add_constant(d.exog)
        res = sm.GLM(d.endog, exog, family=sm.families.Poisson()).fit(tol=1e-13)
        return "poisson", _t(exog), _t(d.endog), {}, res
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    x = bc.data[:, :8]
    x = (x - x.mean(0)) / x.std(0)
    exog = sm.add_constant(x)
    res = sm.GLM(bc.target, exog, family=sm.families.Binomial()).fit(tol=1e-13)
    return "binary", _t(exog), _t(bc.target), {}, res


@pytest.mark.parametrize("name", ["cpunish", "star98", "spector", "randhie", "breast_cancer"])
def test_map_equals_statsmodels_glm(name):
    lik, X, y, kw, res = _sm_case(name)
    model = IterGLM(lik, FeatureKernel(0.0), solver="cholesky").fit(X, y, **kw)
    mean, cov = model.coefficients()
    params = _t(res.params)
    bse = _t(res.bse)
    rel = ((mean.squeeze(-1) - params).abs() / bse).max().item()
    assert rel < 1e-8, rel  # in units of the standard error (measured: <= 3e-12)
    torch.testing.assert_close(torch.diagonal(cov).sqrt(), bse, rtol=1e-8, atol=0)
    assert math.isclose(model.deviance(), res.deviance, rel_tol=1e-8)
