"""Continual learning, issue 28: the one-pass K-FAC eigenbasis update against dense float64
algebra on the architecture matrix, the Gram-based canonical form in float32, the
evidence-chosen process noise, and the data/model validation of the filters."""

from __future__ import annotations

import pytest
import torch
from architectures import case, rel_err
from torch import nn

from bayescurv.continual import (
    EvidenceNoise,
    KFACFilter,
    LaplaceFilter,
    Transition,
    canonical,
    evidence_noise,
    kfac_topk,
)
from bayescurv.curvature import compute
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Gaussian
from bayescurv.params import select

DT = torch.float64


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention", "conv1d", "embedding"])
def test_kfac_topk_are_eigenpairs_of_dense_kfac(name):
    """The chosen columns are the top eigenpairs of the dense K-FAC matrix (float64 ``eigh``
    as ground truth), the diagonal is K-FAC's, and all of them rebuild the matrix."""
    c = case(name)
    K = compute(c.model, c.arch.likelihood, c.batches, structure="kfac").matrix
    dense = K.to_dense()
    ref = torch.linalg.eigvalsh(dense).flip(0)
    k = 7
    V, g, diag = kfac_topk(K, k)
    assert V.shape == (K.size, k) and torch.all(g[:-1] >= g[1:])
    assert rel_err(g, ref[:k]) < 1e-10
    assert rel_err(dense @ V, V * g) < 1e-10
    assert torch.allclose(V.mT @ V, torch.eye(k, dtype=DT), atol=1e-10)
    assert rel_err(diag, dense.diagonal()) < 1e-12
    V, g, _ = kfac_topk(K, K.size)
    assert rel_err((V * g) @ V.mT, dense) < 1e-10


def test_kfac_route_at_full_rank_equals_kfac_online_laplace():
    """rank = P, no truncation: the low-rank filter's precision after three tasks (weights
    moved between them) is δ I + Σ_t K_t, KFACFilter's, to float64 round-off."""
    c = case("cnn")
    model = c.model
    P = select(model, "all").numel
    lr = LaplaceFilter(model, "classification", rank=P, eigensolver="kfac", prior_precision=0.3)
    kf = KFACFilter(model, "classification", prior_precision=0.3)
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
        batches = c.batches[t:] + c.batches[:t]
        for f in (lr, kf):
            f.predict()
            f.update(batches)
    lr.predict()
    kf.predict()
    assert rel_err(lr.precision.to_dense(), kf.to_dense()) < 1e-9


def test_canonical_float32_ill_conditioned():
    """diag(d) + B Bᵀ with σ² spanning 1e-2 .. 1e6: the float32 canonical form (Gram in
    float32, eigh in float64) matches the float64 one and stays orthonormal."""
    g = torch.Generator().manual_seed(0)
    P, r = 3000, 24
    Q, _ = torch.linalg.qr(torch.randn(P, r, generator=g, dtype=DT))
    B = Q * torch.logspace(-1, 3, r, dtype=DT) @ torch.linalg.qr(
        torch.randn(r, r, generator=g, dtype=DT))[0]
    d = 0.5 + torch.rand(P, generator=g, dtype=DT)
    exact = torch.diag(d) + B @ B.mT
    ref, _ = canonical(B, d)
    assert rel_err(ref.to_dense(), exact) < 1e-12
    got, _ = canonical(B.float(), d.float())
    assert rel_err(got.to_dense().double(), exact) < 1e-5
    # the kept directions: eigenvalues to float32 accuracy relative to the largest; only
    # those under the Gram matrix's rounding (ε σ²_max r) are dropped
    k = got.rank
    assert rel_err(got.s.double(), ref.s[:k]) < 1e-5
    assert float(ref.s[k]) < 1.2e-7 * float(ref.s[0]) * r < float(ref.s[k - 1])
    assert float((got.U.mT @ got.U - torch.eye(k)).abs().max()) < 1e-3
    # truncation with fold keeps the diagonal exact
    cut, dropped = canonical(B, d, rank=10, fold=True)
    assert cut.rank == 10 and dropped.shape == (r - 10,)
    assert rel_err(cut.diagonal(), exact.diagonal()) < 1e-12


def test_evidence_noise_recovers_the_drift_of_a_linear_gaussian_model():
    """θ_t = θ_{t-1} + N(0, ρ_l) per tensor, data y = θ_t + N(0, G⁻¹): the evidence
    estimate recovers each allowed tensor's ρ within one grid step; masked tensors keep 0."""
    model = nn.Sequential(nn.Linear(100, 80), nn.Linear(80, 1)).to(DT)
    ps = select(model, "all")
    P = ps.numel
    g = torch.Generator().manual_seed(0)
    true = torch.zeros(P, dtype=DT)
    true[ps.slice_of(0)] = 1e-2  # 0.weight
    true[ps.slice_of(1)] = 1e-1  # 0.bias
    true[ps.slice_of(2)] = 1e-3  # 1.weight: drifts, but not allowed to below
    lam = 10 ** (4 * torch.rand(P, generator=g, dtype=DT))
    G = 10 ** (4 * torch.rand(P, generator=g, dtype=DT))
    th1 = torch.randn(P, generator=g, dtype=DT) / lam.sqrt()
    th1 = th1 + torch.randn(P, generator=g, dtype=DT) * true.sqrt()
    y = th1 + torch.randn(P, generator=g, dtype=DT) / G.sqrt()
    pred = lam / (1 + true * lam)
    th_star = G * y / (pred + G)
    one = torch.ones(P, dtype=DT)
    q = evidence_noise(EvidenceNoise(layers=("0",)), ps, th_star, lam, G, one)
    step = 10 ** 0.26
    for i in (0, 1):
        est = float(q[ps.slice_of(i)][0])
        assert true[ps.slice_of(i)][0] / step <= est <= true[ps.slice_of(i)][0] * step
    assert float(q[ps.slice_of(2)].abs().max()) == 0.0
    # without a jump there is no drift
    q0 = evidence_noise(EvidenceNoise(), ps, torch.zeros(P, dtype=DT), lam, G, one)
    assert float(q0.max()) == 0.0


def test_evidence_filter_is_the_kalman_filter_with_the_chosen_noise():
    """Linear-Gaussian tasks: each filtered precision is (Λ_{t-1}⁻¹ + Q_t)⁻¹ + ΦᵀΦ/σ² for
    the Q_t the evidence chose (dense float64), and the next predict uses that Q_t."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2).to(DT)
    sigma, P = 0.5, 14
    lik = Gaussian(sigma)
    g = torch.Generator().manual_seed(1)
    filt = LaplaceFilter(model, lik, rank=P, prior_precision=1.0, eigensolver="dense",
                         transition=Transition(noise=EvidenceNoise()))
    shift = torch.zeros(6, 2, dtype=DT)
    chosen = []
    for t in range(4):
        X = torch.randn(30, 6, generator=g, dtype=DT)
        shift = shift + 0.5 * torch.randn(6, 2, generator=g, dtype=DT)  # drifting tasks
        Y = X @ shift + sigma * torch.randn(30, 2, generator=g, dtype=DT)
        _, prec_pred = filt.predict()
        if t > 1:  # the next predict uses the last estimate
            last = filt.steps[-1].precision.to_dense()
            ref = torch.linalg.inv(torch.linalg.inv(last) + torch.diag(chosen[-1]))
            assert rel_err(prec_pred.to_dense(), ref) < 1e-9
        with torch.no_grad():  # the exact MAP under the predicted prior
            Phi = torch.func.jacrev(lambda v, X=X: filt.params.functional_call(v, X).reshape(-1))(
                filt.params.vector())
            Lam = prec_pred.to_dense()
            H = Lam + Phi.T @ Phi / sigma**2
            filt.params.assign(torch.linalg.solve(H, Lam @ filt.mean
                                                  + Phi.T @ Y.reshape(-1) / sigma**2))
        step = filt.update([(X, Y)])
        chosen.append(filt.noise.clone())
        if t > 0:
            prev = filt.steps[-2].precision.to_dense()
            ref = torch.linalg.inv(torch.linalg.inv(prev) + torch.diag(chosen[-1]))
            assert rel_err(step.predicted.to_dense(), ref) < 1e-9
            assert rel_err(step.precision.to_dense(), ref + Phi.T @ Phi / sigma**2) < 1e-9
    assert float(torch.stack(chosen[1:]).max()) > 0  # drifting tasks: some drift found


# ------------------------------------------------------------------------------------------
# validation (issue 28, item 4)
# ------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)


def _data(width: int = 4, n: int = 10) -> list:
    g = torch.Generator().manual_seed(width)
    return [(torch.randn(n, width, generator=g, dtype=DT), torch.randint(0, 3, (n,)))]


@pytest.mark.parametrize("make", [
    lambda m: LaplaceFilter(m, "classification", rank=2, eigensolver="kfac"),
    lambda m: LaplaceFilter(m, "classification", rank=2, eigensolver="randomized"),
    lambda m: KFACFilter(m, "classification"),
])
def test_update_with_wrong_inputs_raises_a_library_error(make):
    filt = make(_mlp())
    filt.predict()
    with pytest.raises(ShapeError, match="cannot run on the data"):
        filt.update(_data(width=5))  # the first task: torch's error, named
    filt.update(_data())
    filt.predict()
    with pytest.raises(ShapeError, match=r"per-example shape \(6,\).*built on inputs of shape "
                                         r"\(4,\)"):
        filt.update(_data(width=6))
    filt.update(_data())  # the filter still works after the refusal


def test_predict_and_penalty_validate_their_arguments():
    filt = LaplaceFilter(_mlp(), "classification", rank=2, eigensolver="kfac")
    filt.predict()
    with pytest.raises(ShapeError, match="does not match the one the filter was built for"):
        filt.penalty(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT))
    filt.update(_data())
    with pytest.raises(InvalidArgumentError, match="Transition"):
        filt.predict(transition=0.1)
    with pytest.raises(InvalidArgumentError, match="EvidenceNoise to the filter"):
        filt.predict(transition=Transition(noise=EvidenceNoise()))
    with pytest.raises(InvalidArgumentError, match="neither a parameter nor a module"):
        LaplaceFilter(_mlp(), "classification", transition=Transition(
            noise=EvidenceNoise(layers=("head",))))
    with pytest.raises(InvalidArgumentError, match="sequence of names"):
        EvidenceNoise(layers="2")
    with pytest.raises(InvalidArgumentError, match="Transition"):
        LaplaceFilter(_mlp(), "classification", transition=1e-3)
    with pytest.raises(InvalidArgumentError, match="A = I and Q = 0"):
        KFACFilter(_mlp(), "classification", transition=Transition(noise=EvidenceNoise()))
