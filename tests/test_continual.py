"""Continual learning: predict/update algebra, filter and smoother against dense float64
Kalman filtering/RTS smoothing on linear-Gaussian models, and the special cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.continual import (
    DiagonalFilter,
    KFACFilter,
    LaplaceFilter,
    Transition,
    add_low_rank,
    predict_precision,
)
from bayescurv.curvature import compute
from bayescurv.errors import InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.likelihoods import Gaussian
from bayescurv.linalg import LowRankPlusDiagonal

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_lowrank(P: int, k: int, seed: int = 0) -> LowRankPlusDiagonal:
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=DT))
    s = torch.rand(k, generator=g, dtype=DT) * 10
    d = 0.5 + 1.5 * torch.rand(P, generator=g, dtype=DT)
    return LowRankPlusDiagonal(U, s, d)


def rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).abs().max() / B.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------
# predict step
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_predict_equals_dense(decay):
    P, k = 500, 20
    prec = random_lowrank(P, k)
    g = gen(1)
    # "layers": blocks of 100 with their own scale; noise per parameter, zero on two blocks
    a = torch.repeat_interleave(torch.tensor([1.0, 0.9, 1.1, 0.5, 1.0], dtype=DT), 100)
    q = torch.rand(P, generator=g, dtype=DT) * 0.5
    q[:200] = 0.0
    out = predict_precision(prec, a, q, decay)
    Sigma = torch.diag(a) @ torch.linalg.inv(prec.to_dense()) @ torch.diag(a) + torch.diag(q)
    ref = decay * torch.linalg.inv(Sigma)
    assert out.rank == k
    assert rel_err(out.to_dense(), ref) < 1e-8
    # canonical form: orthonormal U, descending s
    assert torch.allclose(out.U.mT @ out.U, torch.eye(k, dtype=DT), atol=1e-10)
    assert bool((out.s[:-1] >= out.s[1:]).all())


def test_predict_identity_and_reset():
    prec = random_lowrank(60, 5, seed=3)
    same = predict_precision(prec)  # A = I, Q = 0
    assert rel_err(same.to_dense(), prec.to_dense()) < 1e-12
    a = torch.ones(60, dtype=DT)
    q = torch.zeros(60, dtype=DT)
    a[:10], q[:10] = 0.0, 2.0  # a reset layer: fresh prior N(0, 2)
    out = predict_precision(prec, a, q).to_dense()
    ref = torch.linalg.inv(torch.diag(a) @ torch.linalg.inv(prec.to_dense()) @ torch.diag(a)
                           + torch.diag(q))
    assert rel_err(out, ref) < 1e-10
    assert torch.allclose(out[:10, :10], 0.5 * torch.eye(10, dtype=DT))


# ------------------------------------------------------------------------------------------
# update / truncation
# ------------------------------------------------------------------------------------------
def test_update_truncation_as_documented():
    P, k, r = 80, 6, 5
    prec = random_lowrank(P, k, seed=4)
    g = gen(5)
    V, _ = torch.linalg.qr(torch.randn(P, r, generator=g, dtype=DT))
    lam = torch.rand(r, generator=g, dtype=DT) * 5
    exact = prec.to_dense() + (V * lam) @ V.mT
    # no truncation when the rank suffices
    full, disc = add_low_rank(prec, V, lam, rank=k + r)
    assert disc.numel() == 0 and rel_err(full.to_dense(), exact) < 1e-12
    # dropped: Λ_k ⪯ Λ and ‖Λ − Λ_k‖₂ = σ_{k+1}²
    kept, disc = add_low_rank(prec, V, lam, rank=k, fold=False)
    err = exact - kept.to_dense()
    ev = torch.linalg.eigvalsh(err)
    assert float(ev.min()) > -1e-10
    assert abs(float(ev.max()) - float(disc[0])) < 1e-10
    assert disc.numel() == r
    # folded: diagonal and trace exact
    folded, _ = add_low_rank(prec, V, lam, rank=k, fold=True)
    assert torch.allclose(folded.diagonal(), exact.diagonal(), atol=1e-10)
    assert abs(float(folded.to_dense().trace() - exact.trace())) < 1e-9


# ------------------------------------------------------------------------------------------
# linear-Gaussian models: dense Kalman filter and RTS smoother
# ------------------------------------------------------------------------------------------
def make_tasks(num_tasks, n, d, out, seed=0):
    g = gen(seed)
    tasks = []
    for _ in range(num_tasks):
        X = torch.randn(n, d, generator=g, dtype=DT)
        Y = torch.randn(n, out, generator=g, dtype=DT)
        tasks.append((X, Y))
    return tasks


def jac(model, pset, X):
    """``Φ`` ``(N·C, P)``: the Jacobian of the (linear) model's outputs in flat order."""
    theta = pset.vector()
    return torch.func.jacrev(lambda v: pset.functional_call(v, X).reshape(-1))(theta)


def newton_map(filt, lik, X, Y):
    """Exact MAP of nll + penalty (a quadratic): one Newton step from the current weights;
    also checks filt.penalty against the dense quadratic."""
    pset = filt.params
    mean, Lam = filt.mean, filt.precision
    Lam = Lam.to_dense() if hasattr(Lam, "to_dense") else Lam

    def obj(v):
        diff = v - mean
        return lik.nll(pset.functional_call(v, X), Y) + 0.5 * diff @ Lam @ diff

    theta = pset.vector()
    grad = torch.func.grad(obj)(theta)
    H = torch.func.hessian(obj)(theta)
    pset.assign(theta - torch.linalg.solve(H, grad))
    pen = filt.penalty().detach()
    diff = pset.vector() - mean
    assert abs(float(pen) - float(0.5 * diff @ Lam @ diff)) < 1e-9 * (1 + abs(float(pen)))


def dense_kalman(tasks, model, pset, sigma, delta, a, q, decay=1.0):
    """Filtered/predicted moments and RTS smoother of the linear-Gaussian model, dense."""
    P = pset.numel
    m, Lam = torch.zeros(P, dtype=DT), delta * torch.eye(P, dtype=DT)
    A, Q = torch.diag(a), torch.diag(q)
    pred, filt = [], []
    for t, (X, Y) in enumerate(tasks):
        if t > 0:
            m = A @ m
            Lam = decay * torch.linalg.inv(A @ torch.linalg.inv(Lam) @ A + Q)
        pred.append((m, Lam))
        Phi = jac(model, pset, X)
        f0 = pset.functional_call(torch.zeros(P, dtype=DT), X).reshape(-1)  # 0 for Linear
        Lam_new = Lam + Phi.T @ Phi / sigma**2
        m = torch.linalg.solve(Lam_new, Lam @ m + Phi.T @ (Y.reshape(-1) - f0) / sigma**2)
        Lam = Lam_new
        filt.append((m, Lam))
    # RTS smoother with covariances
    T = len(tasks)
    ms = [None] * T
    Ps = [None] * T
    ms[-1], Ps[-1] = filt[-1][0], torch.linalg.inv(filt[-1][1])
    for t in range(T - 2, -1, -1):
        Pt = torch.linalg.inv(filt[t][1])
        Ppred = torch.linalg.inv(pred[t + 1][1])
        G = Pt @ A @ torch.linalg.inv(Ppred)
        ms[t] = filt[t][0] + G @ (ms[t + 1] - pred[t + 1][0])
        Ps[t] = Pt + G @ (Ps[t + 1] - Ppred) @ G.T
    return pred, filt, ms, Ps


def run_filter(filt, lik, tasks, transition=None):
    for X, Y in tasks:
        filt.predict(transition)
        newton_map(filt, lik, X, Y)
        filt.update([(X, Y)])


@pytest.mark.parametrize("eigensolver", ["dense", "randomized", "lanczos", "kfac"])
def test_static_filter_equals_batch_posterior(eigensolver):
    """A = I, Q = 0: the filter after T tasks is the batch posterior over all data, even with
    k < P as long as k ≥ the total rank of the data (no truncation). K-FAC is exact for one
    Linear layer under a Gaussian likelihood, so the one-pass ``"kfac"`` route is too."""
    torch.manual_seed(0)
    model = nn.Linear(12, 2).to(DT)  # P = 26
    sigma, delta = 0.7, 2.0
    lik = Gaussian(sigma)
    tasks = make_tasks(3, 4, 12, 2, seed=1)  # rank 8 per task, 24 in total
    filt = LaplaceFilter(model, lik, rank=24, curvature_rank=8, prior_precision=delta,
                         eigensolver=eigensolver, generator=gen(2), add_diagonal=False)
    run_filter(filt, lik, tasks)
    X = torch.cat([t[0] for t in tasks])
    Y = torch.cat([t[1] for t in tasks])
    Phi = jac(model, filt.params, X)
    Lam = delta * torch.eye(26, dtype=DT) + Phi.T @ Phi / sigma**2
    m = torch.linalg.solve(Lam, Phi.T @ Y.reshape(-1) / sigma**2)
    tol = 1e-8 if eigensolver == "dense" else 1e-6
    assert rel_err(filt.precision.to_dense(), Lam) < tol
    assert rel_err(filt.mean, m) < tol
    # with Q = 0 the smoother returns the last filtered mean for every task
    for ms in filt.smooth().means:
        assert torch.allclose(ms, filt.mean, atol=1e-10)


def test_filter_and_smoother_equal_dense_rts():
    """Per-layer scaling, per-parameter noise and decay: every predicted / filtered moment,
    the smoothed means and the smoothed covariances equal the dense Kalman/RTS ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)  # P = 18
    P = 18
    sigma, delta = 0.5, 1.5
    lik = Gaussian(sigma)
    tasks = make_tasks(4, 7, 5, 3, seed=3)
    q = torch.linspace(0.0, 0.3, P, dtype=DT)
    transition = Transition(scale={"0.weight": 0.95}, noise=q, decay=0.9)
    filt = LaplaceFilter(model, lik, rank=P, prior_precision=delta, transition=transition,
                         eigensolver="dense")
    run_filter(filt, lik, tasks)
    a, _, _ = transition.resolve(filt.params)
    pred, filtd, ms, Ps = dense_kalman(tasks, model, filt.params, sigma, delta, a, q, 0.9)
    for t, step in enumerate(filt.steps):
        assert rel_err(step.predicted.to_dense(), pred[t][1]) < 1e-9
        assert rel_err(step.predicted_mean, pred[t][0]) < 1e-9
        assert rel_err(step.precision.to_dense(), filtd[t][1]) < 1e-9
        assert rel_err(step.mean, filtd[t][0]) < 1e-9
    sm = filt.smooth()
    for t in range(4):
        assert rel_err(sm.means[t], ms[t]) < 1e-9
        assert rel_err(sm.covariance(t).to_dense(), Ps[t]) < 1e-9
    # smoothing changes the early tasks' weights (information flows back)
    assert float((sm.means[0] - filt.steps[0].mean).abs().max()) > 1e-3
    # task-specific model
    filt.assign(model, sm.means[1])
    assert torch.equal(filt.params.vector(), sm.means[1])


def test_low_rank_filter_with_drift_exact_without_truncation():
    """Q > 0 keeps the rank (exact predict): rank = total data rank reproduces dense KF."""
    model = nn.Linear(20, 1).to(DT)  # P = 21
    sigma, delta = 1.0, 1.0
    lik = Gaussian(sigma)
    tasks = make_tasks(3, 3, 20, 1, seed=7)
    q = torch.full((21,), 0.05, dtype=DT)
    tr = Transition(noise=q)
    filt = LaplaceFilter(model, lik, rank=9, curvature_rank=3, prior_precision=delta,
                         transition=tr, eigensolver="dense", add_diagonal=False)
    run_filter(filt, lik, tasks)
    _, filtd, ms, _ = dense_kalman(tasks, model, filt.params, sigma, delta,
                                   torch.ones(21, dtype=DT), q)
    assert filt.precision.rank == 9
    assert rel_err(filt.precision.to_dense(), filtd[-1][1]) < 1e-9
    for t, m in enumerate(filt.smooth().means):
        assert rel_err(m, ms[t]) < 1e-9


# ------------------------------------------------------------------------------------------
# special cases
# ------------------------------------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def cls_data(seed, n=20):
    g = gen(seed)
    return [(torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))]


def perturb(model, seed):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_diagonal_filter_is_online_ewc(decay):
    model = mlp()
    filt = DiagonalFilter(model, "classification", prior_precision=0.5,
                          transition=Transition(decay=decay))
    fisher = torch.zeros(filt.num_params, dtype=DT)
    for t in range(3):
        filt.predict()
        perturb(model, t)  # "training"
        data = cls_data(t)
        filt.update(data)
        diag = compute(model, "classification", data, structure="diag").matrix.diagonal()
        fisher = decay * fisher + diag if t else diag
    filt.predict()
    perturb(model, 9)
    # online EWC: γ-decayed sum of GGN diagonals (prior decays alike), centred at last MAP
    expected = decay**3 * 0.5 + decay * fisher
    assert filt.precision.rank == 0
    assert torch.allclose(filt.precision.d, expected, rtol=1e-12)
    diff = filt.params.vector() - filt.steps[-1].mean
    assert torch.allclose(filt.penalty(), 0.5 * (expected * diff**2).sum(), rtol=1e-12)


def test_low_rank_filter_residual_diagonal_is_exact():
    """add_diagonal: top-k eigendirections plus the residual diagonal reproduce the GGN's
    diagonal exactly; with k = P (dense solver) the full GGN."""
    model = mlp()
    data = cls_data(0)
    G = compute(model, "classification", data, structure="full").matrix.to_dense()
    for rank in (5, 43):
        filt = LaplaceFilter(model, "classification", rank=rank, prior_precision=1.0,
                             eigensolver="dense")
        filt.predict()
        filt.update(data)
        Lam = filt.precision.to_dense()
        ref = G + torch.eye(43, dtype=DT)
        assert torch.allclose(Lam.diagonal(), ref.diagonal(), atol=1e-10)
        if rank == 43:
            assert rel_err(Lam, ref) < 1e-10


def test_randomized_eigensolver_on_mlp_matches_dense():
    model = mlp()
    data = cls_data(1)
    out = {}
    for solver in ("dense", "randomized"):
        filt = LaplaceFilter(model, "classification", rank=10, eigensolver=solver,
                             generator=gen(0), add_diagonal=False)
        filt.predict()
        filt.update(data)
        out[solver] = filt.precision
    assert torch.allclose(out["randomized"].s, out["dense"].s, rtol=1e-3)
    assert rel_err(out["randomized"].to_dense(), out["dense"].to_dense()) < 1e-3


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_kfac_filter_is_sum_of_kfac_terms(decay):
    model = mlp()
    filt = KFACFilter(model, "classification", prior_precision=0.3,
                      transition=Transition(decay=decay))
    terms = []
    for t in range(2):
        filt.predict()
        perturb(model, t)
        filt.update(cls_data(t))
        terms.append(compute(model, "classification", cls_data(t),
                             structure="kfac").matrix.to_dense())
    filt.predict()
    expected = decay * (decay * 0.3 * torch.eye(43, dtype=DT) + decay * terms[0] + terms[1])
    assert rel_err(filt.to_dense(), expected) < 1e-12
    perturb(model, 5)
    diff = filt.params.vector() - filt.mean
    assert abs(float(filt.penalty() - 0.5 * diff @ expected @ diff)) < 1e-10
    pen = filt.penalty()
    pen.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(grads, expected @ diff, atol=1e-10)


def test_kfac_filter_exact_for_linear_gaussian():
    """One Linear layer, Gaussian likelihood: K-FAC is the exact GGN, so the K-FAC online
    Laplace equals the batch posterior."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2).to(DT)
    sigma, delta = 0.8, 1.0
    lik = Gaussian(sigma)
    tasks = make_tasks(3, 5, 6, 2, seed=11)
    filt = KFACFilter(model, lik, prior_precision=delta)
    pset = filt.params
    for X, Y in tasks:
        filt.predict()
        mean, Lam = filt.mean, filt.to_dense()

        def obj(v, X=X, Y=Y, mean=mean, Lam=Lam):
            return lik.nll(pset.functional_call(v, X), Y) + 0.5 * (v - mean) @ Lam @ (v - mean)

        theta = pset.vector()
        pset.assign(theta - torch.linalg.solve(torch.func.hessian(obj)(theta),
                                               torch.func.grad(obj)(theta)))
        filt.update([(X, Y)])
    filt.predict()
    X = torch.cat([t[0] for t in tasks])
    Y = torch.cat([t[1] for t in tasks])
    Phi = jac(model, filt.params, X)
    Lam = delta * torch.eye(14, dtype=DT) + Phi.T @ Phi / sigma**2
    assert rel_err(filt.to_dense(), Lam) < 1e-10
    assert rel_err(filt.mean, torch.linalg.solve(Lam, Phi.T @ Y.reshape(-1) / sigma**2)) < 1e-9


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_errors():
    model = mlp()
    with pytest.raises(InvalidArgumentError, match="exceeds the number of parameters"):
        LaplaceFilter(model, "classification", rank=44)
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        LaplaceFilter(model, "classification", rank=5, curvature_rank=100)
    with pytest.raises(InvalidArgumentError, match="PSD"):
        LaplaceFilter(model, "classification", transition=Transition(noise=-0.1))
    with pytest.raises(InvalidArgumentError, match="PSD"):
        Transition(noise={"2": -1.0}).resolve(LaplaceFilter(model, "classification").params)
    with pytest.raises(InvalidArgumentError, match="neither a parameter nor a module"):
        LaplaceFilter(model, "classification", transition=Transition(noise={"head": 1.0}))
    with pytest.raises(InvalidArgumentError, match="decay"):
        LaplaceFilter(model, "classification", transition=Transition(decay=1.5))
    with pytest.raises(InvalidArgumentError, match="point mass"):
        LaplaceFilter(model, "classification", transition=Transition(scale=0.0))
    with pytest.raises(InvalidArgumentError, match="A = I and Q = 0"):
        KFACFilter(model, "classification", transition=Transition(noise=0.1))
    with pytest.raises(InvalidArgumentError, match="prior_precision"):
        LaplaceFilter(model, "classification", prior_precision=-1.0)
    with pytest.raises(InvalidArgumentError, match="eigensolver_options"):
        LaplaceFilter(model, "classification", eigensolver_options={"iters": 3})
    with pytest.raises(InvalidArgumentError, match="rank 0 without add_diagonal"):
        LaplaceFilter(model, "classification", rank=0, add_diagonal=False)

    filt = LaplaceFilter(model, "classification", rank=3, eigensolver="dense")
    with pytest.raises(NotFittedError, match="predict"):
        filt.penalty()
    filt.predict()
    with pytest.raises(NotFittedError, match="already"):
        filt.predict()
    filt.update(cls_data(0))
    with pytest.raises(NotFittedError, match="predict"):
        filt.update(cls_data(0))
    filt.predict()
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(ShapeError, match="does not match"):
        filt.penalty(other)
    with pytest.raises(ShapeError, match="does not match"):
        filt.update(cls_data(1), model=other)
    # the same architecture (a copy) is accepted
    twin = mlp()
    assert torch.isfinite(filt.penalty(twin))


def test_float32_model_and_init_prior():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # float32
    filt = LaplaceFilter(model, "classification", rank=4, prior_mean="init",
                         transition=Transition(noise={"2": 0.1}), generator=gen(0))
    assert torch.equal(filt.mean, filt.params.vector())
    for t in range(2):
        filt.predict()
        if t == 0:  # the prior is centred at the initial weights
            assert float(filt.penalty()) == pytest.approx(0.0, abs=1e-6)
        with torch.no_grad():
            model[2].weight.add_(0.1)  # "training"
        filt.update([(x.float(), y) for x, y in cls_data(t)])
    assert filt.precision.d.dtype == torch.float32 and filt.precision.rank == 4
    assert filt.memory_bytes() == 4 * (43 * 4 + 4 + 43 + 43)
    sm = filt.smooth()
    assert sm.means[0].dtype == torch.float32 and torch.isfinite(sm.means[0]).all()
    assert not torch.allclose(sm.means[0], filt.steps[0].mean)  # the head drifts: q > 0
