"""Wide layers: Kronecker factors truncated to their top eigenpairs (``factor_rank``, issue 26).

- nothing truncated (``factor_rank`` >= every factor size): exactly the untruncated posterior;
- a truncated :class:`KroneckerEigen` (also when only one factor is cut, and under a per-tensor
  column shift) equals its dense definition ``c (A_r ⊗ B_r) + δ I`` in every operation;
- the GLM predictive of a truncated posterior equals ``J Σ Jᵀ`` with ``Σ`` the inverse of its
  own dense precision (MLP, ``nn.Linear`` attention, a tiny Hugging Face BERT);
- the pre-flight estimate counts ``n r + r`` entries per truncated factor.
"""

from __future__ import annotations

import math

import pytest
import torch
from architectures import SelfAttention
from torch import nn

import bayescurv
from bayescurv import Laplace
from bayescurv.curvature import preflight
from bayescurv.errors import InvalidArgumentError, NumericalError
from bayescurv.linalg import KroneckerEigen
from bayescurv.linalg.serialize import from_state, to_state
from bayescurv.params import select

DT = torch.float64


def _psd(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, k, dtype=DT, generator=g)
    return x @ x.T


def _top(F: torch.Tensor, r: int) -> torch.Tensor:
    """The factor with only its top-``r`` eigenpairs (dense)."""
    lam, Q = torch.linalg.eigh(F)
    Q, lam = Q[:, -r:], lam[-r:]
    return (Q * lam) @ Q.T


# ------------------------------------------------------------------------------------------
# the operator against its dense definition
# ------------------------------------------------------------------------------------------
def _ops(p: int, q: int, ra: int, rb: int):
    """A K-FAC operator truncated to ``(ra, rb)`` and the dense truncated factors."""
    g = torch.Generator().manual_seed(p * 10 + q)
    A, B = _psd(p, p + 2, g), _psd(q, q + 2, g)
    la, Qa = torch.linalg.eigh(A)
    lb, Qb = torch.linalg.eigh(B)
    op = KroneckerEigen(Qa[:, -ra:], Qb[:, -rb:], torch.outer(la[-ra:], lb[-rb:]),
                        (la[-ra:], lb[-rb:]))
    return op, _top(A, ra), _top(B, rb)


@pytest.mark.parametrize("ra,rb", [(3, 2), (6, 2), (3, 5), (1, 1)])
def test_truncated_kronecker_equals_its_dense_definition(ra, rb):
    p, q, c, d = 6, 5, 0.7, 0.3
    base, At, Bt = _ops(p, q, ra, rb)
    assert base.truncated and base.factor_ranks == (ra, rb) and base.QA.shape == (p, ra)
    op = base.scale(c).add_diagonal(d)
    ref = c * torch.kron(At, Bt) + d * torch.eye(p * q, dtype=DT)
    inv = torch.linalg.inv(ref)
    v = torch.randn(p * q, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(p * q, dtype=DT)
    R, S = op.inv_sqrt_matvec(eye), op.sqrt_matvec(eye)
    for got, want in [
        (op.to_dense(), ref), (op.matvec(v), ref @ v), (op.solve(v), inv @ v),
        (op.matvec(v[:, 0]), ref @ v[:, 0]), (op.logdet(), torch.logdet(ref)),
        (op.diagonal(), ref.diagonal()), (op.inv_diagonal(), inv.diagonal()),
        (R @ R.T, inv), (S @ S.T, ref), (op.to_linear_operator().to_dense(), ref),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    # the discarded directions hold δ⁻¹ of variance: draws have the covariance A⁻¹
    draws = op.sample_inverse(20000, torch.Generator().manual_seed(0))
    assert (draws.T @ draws / 20000 - inv).abs().max() < 0.05 * inv.abs().max()


def test_truncated_kronecker_column_shift_is_exact():
    """A per-tensor prior (weight δ, bias column δ + Δ) on a truncated block."""
    p, q = 6, 5
    for ra, rb in [(3, 2), (6, 2), (3, 5)]:
        base, At, Bt = _ops(p, q, ra, rb)
        shift = torch.full((p, q), 0.3, dtype=DT)
        shift[:, q - 1] = 1.9
        op = base.scale(0.7).add_diagonal(shift.reshape(-1))
        ref = 0.7 * torch.kron(At, Bt) + torch.diag(shift.reshape(-1))
        inv = torch.linalg.inv(ref)
        v = torch.randn(p * q, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
        eye = torch.eye(p * q, dtype=DT)
        R, S = op.inv_sqrt_matvec(eye), op.sqrt_matvec(eye)
        for got, want in [
            (op.to_dense(), ref), (op.matvec(v), ref @ v), (op.solve(v), inv @ v),
            (op.logdet(), torch.logdet(ref)), (op.inv_diagonal(), inv.diagonal()),
            (R @ R.T, inv), (S @ S.T, ref),
        ]:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_truncate_keeps_the_top_eigenpairs_and_the_modifications():
    g = torch.Generator().manual_seed(3)
    A, B = _psd(7, 9, g), _psd(4, 6, g)
    full = KroneckerEigen.from_factors(A, B)
    assert not full.truncated and full.truncate(7) is full  # nothing to cut
    cut = full.truncate(3)  # only the first factor has more than 3 rows... and the second
    assert cut.factor_ranks == (3, 3) and cut.factor_eigenvalues[0].shape == (3,)
    ref = torch.kron(_top(A, 3), _top(B, 3)) + 0.5 * torch.eye(28, dtype=DT)
    torch.testing.assert_close(cut.add_diagonal(0.5).to_dense(), ref)
    torch.testing.assert_close(full.add_diagonal(0.5).truncate(3).to_dense(), ref)
    one = full.truncate(5)  # only the first factor is cut (mixed truncation)
    assert one.factor_ranks == (5, 4) and one.truncated
    ref = torch.kron(_top(A, 5), B) + 0.5 * torch.eye(28, dtype=DT)
    torch.testing.assert_close(one.add_diagonal(0.5).logdet(), torch.logdet(ref))
    # without factor eigenvalues (EKFAC): the largest marginal sums of Λ, here the same
    lam = full.base_eigenvalues
    ekfac = KroneckerEigen(full.QA, full.QB, lam).truncate(3)
    torch.testing.assert_close(ekfac.add_diagonal(0.5).to_dense(), cut.add_diagonal(0.5).to_dense())
    shifted = ekfac.scale(0.7).add_diagonal(0.5)  # the root route of to_linear_operator
    torch.testing.assert_close(shifted.to_linear_operator().to_dense(), shifted.to_dense())
    # stored: only the kept columns, in fresh storage
    assert cut.QA.shape == (7, 3) and cut.QA.untyped_storage().nbytes() == 7 * 3 * 8


def test_truncated_kronecker_round_trips_and_refuses_a_zero_shift():
    base, *_ = _ops(6, 5, 3, 2)
    back = from_state(to_state(base))
    assert back.truncated and back.factor_ranks == (3, 2)
    torch.testing.assert_close(back.add_diagonal(0.2).to_dense(),
                               base.add_diagonal(0.2).to_dense())
    with pytest.raises(NumericalError, match="positive"):
        base.solve(torch.ones(30, dtype=DT))
    with pytest.raises(NumericalError, match="positive"):
        base.logdet()


# ------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------
def _mlp_data(seed: int = 0, n: int = 24, d: int = 5, c: int = 3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, c)).double().eval()
    x = torch.randn(n, d, dtype=DT)
    y = torch.randint(0, c, (n,))
    return model, x, [(x[:10], y[:10]), (x[10:], y[10:])]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_factor_rank_must_be_a_positive_integer(bad):
    model, _, data = _mlp_data()
    with pytest.raises(InvalidArgumentError, match="factor_rank"):
        bayescurv.compute(model, "classification", data, factor_rank=bad)
    with pytest.raises(InvalidArgumentError, match="factor_rank"):
        Laplace(model, "classification", factor_rank=bad)


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank", "diag+lowrank"])
def test_factor_rank_is_refused_outside_kronecker_structures(structure):
    model, _, data = _mlp_data()
    with pytest.raises(InvalidArgumentError, match="Kronecker"):
        bayescurv.compute(model, "classification", data, structure=structure, factor_rank=4)
    with pytest.raises(InvalidArgumentError, match="Kronecker"):
        Laplace(model, "classification", structure=structure, factor_rank=4)


# ------------------------------------------------------------------------------------------
# posteriors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac"])
def test_no_truncation_is_exactly_the_untruncated_posterior(structure):
    model, x, data = _mlp_data()
    las = [Laplace(model, "classification", structure=structure, prior_precision=0.8,
                   factor_rank=r).fit(data) for r in (None, 8)]  # factors 6, 7, 8, 3
    assert not any(b.truncated for b in las[1].curvature.blocks)
    lml = [la.log_marginal_likelihood() for la in las]
    assert torch.equal(lml[0], lml[1])
    cov = [la.functional(x[:5], joint=True)[1] for la in las]
    assert torch.equal(cov[0], cov[1])
    draws = [la.sample(7, torch.Generator().manual_seed(0)) for la in las]
    assert torch.equal(draws[0], draws[1])


def _call(params, v, x):
    return params.functional_call(v, **x) if isinstance(x, dict) else params.functional_call(v, x)


def _check_against_dense(la, x):
    """Predictive and log determinant of ``la`` against its own dense precision."""
    theta = la.params.vector()
    jac = torch.func.jacrev(lambda v: _call(la.params, v, x))(theta)  # (N, C, P)
    js = jac.reshape(-1, jac.shape[-1])
    prec = la.posterior_precision.to_dense()
    ref = js @ torch.linalg.solve(prec, js.T)
    _, joint = la.functional(x, joint=True)
    assert (joint - ref).abs().max() <= 1e-9 * ref.abs().max()
    _, per_input = la.functional(x)
    n, c = jac.shape[:2]
    blocks = ref.reshape(n, c, n, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert (per_input - blocks).abs().max() <= 1e-9 * ref.abs().max()
    torch.testing.assert_close(la.posterior_precision.logdet(), torch.logdet(prec),
                               rtol=1e-10, atol=1e-8)
    draws = la.posterior_precision.inv_sqrt_matvec(torch.eye(prec.shape[0], dtype=DT))
    torch.testing.assert_close(draws @ draws.T, torch.linalg.inv(prec), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("prior", ["scalar", "tensor"])
def test_truncated_mlp_predictive_equals_dense(structure, prior):
    model, x, data = _mlp_data()
    la = Laplace(model, "classification", structure=structure, factor_rank=3)
    if prior == "tensor":  # per tensor: a bias column shift on the truncated blocks
        la.prior_precision = torch.tensor([0.5, 2.0, 0.9, 3.0], dtype=DT)
    la.fit(data)
    assert all(b.truncated for b in la.curvature.blocks)
    _check_against_dense(la, x[:4])


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac"])
def test_truncated_attention_predictive_equals_dense(structure):
    """``nn.Linear`` q/k/v/o on sequences: weight sharing (per-input residual Jacobians)."""
    torch.manual_seed(0)
    model = SelfAttention(d=6, c=3).double().eval()
    x = torch.randn(12, 4, 6, dtype=DT)
    y = torch.randint(0, 3, (12,))
    la = Laplace(model, "classification", structure=structure, prior_precision=0.6,
                 factor_rank=3).fit([(x[:7], y[:7]), (x[7:], y[7:])])
    assert sum(getattr(b, "truncated", False) for b in la.curvature.blocks) >= 5
    _check_against_dense(la, x[:3])


def test_truncated_hf_bert_predictive_equals_dense():
    zoo_models = pytest.importorskip("zoo_models")
    model, x, loader, opts = zoo_models.build("hf_bert", DT)
    y_key = opts.pop("y_key")
    la = Laplace(model, "classification", structure="kfac", prior_precision=0.5,
                 factor_rank=4, **opts).fit(loader, y_key=y_key)
    assert sum(getattr(b, "truncated", False) for b in la.curvature.blocks) >= 4
    _check_against_dense(la, {k: v[:3] for k, v in x.items()})


def test_truncation_is_conservative_and_tunes():
    """Discarded directions revert to the prior: every marginal variance grows."""
    model, x, data = _mlp_data()
    full = Laplace(model, "classification", prior_precision=0.8).fit(data)
    cut = Laplace(model, "classification", prior_precision=0.8, factor_rank=2).fit(data)
    assert (cut.posterior_variance >= full.posterior_variance - 1e-12).all()
    cut.optimize_prior_precision(n_steps=30)
    assert torch.isfinite(cut.log_marginal_likelihood())
    state = cut.state_dict()
    back = Laplace(model, "classification", factor_rank=2)
    back.load_state_dict(state)
    torch.testing.assert_close(back.log_marginal_likelihood(), cut.log_marginal_likelihood())


# ------------------------------------------------------------------------------------------
# pre-flight
# ------------------------------------------------------------------------------------------
def test_preflight_counts_truncated_factors():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    pset = select(model, "all")
    full = preflight.estimate_bytes(pset, "kfac")
    assert full == 8 * (512**2 + 257**2 + 512**2 + 513**2 + 10**2 + 513**2)
    for r in (8, 32, 128):
        f = [n * r + r if n > r else n * n for n in (512, 257, 512, 513, 10, 513)]
        assert preflight.estimate_bytes(pset, "kfac", factor_rank=r) == 8 * sum(f)
        assert preflight.estimate_bytes(pset, "kfac", factor_rank=r, peak=True) == full
    assert preflight.estimate_bytes(pset, "kfac", factor_rank=32) < full / 10


def test_preflight_estimate_equals_the_stored_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    x, y = torch.randn(16, 40), torch.randint(0, 5, (16,))
    pset = select(model, "all")
    curv = bayescurv.compute(model, "classification", [(x, y)], factor_rank=8).matrix
    stored = sum(q.numel() + (e.numel() if q.shape[1] < q.shape[0] else 0)  # cut: n r + r
                 for b in curv.blocks for q, e in zip(b.eigenbases, b.factor_eigenvalues))
    assert preflight.estimate_bytes(pset, "kfac", factor_rank=8) == 8 * stored


def test_preflight_refusal_names_factor_rank(monkeypatch):
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    data = [(torch.randn(2, 4096), torch.randint(0, 10, (2,)))]
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 200 * 2**20)
    with pytest.raises(InvalidArgumentError, match=r"factor_rank=128 would store .* MB.*pass"):
        bayescurv.compute(model, "classification", data, structure="kfac")
    with pytest.raises(InvalidArgumentError, match=r"factor_rank=16 would store"):
        bayescurv.compute(model, "classification", data, structure="kfac", factor_rank=16)
    assert math.isfinite(preflight.estimate_bytes(select(model, "all"), "kfac", factor_rank=16))


def test_truncated_float32_model_agrees_with_float64():
    """A float32 model (factors, products in float32; posterior in float64) against the same
    model in float64, with weight sharing."""
    torch.manual_seed(0)
    model = SelfAttention(d=6, c=3).eval()
    x = torch.randn(12, 4, 6)
    y = torch.randint(0, 3, (12,))
    out = []
    for dt in (torch.float32, DT):
        m = model.to(dt)
        la = Laplace(m, "classification", prior_precision=0.6, factor_rank=3)
        la.fit([(x.to(dt), y)])
        out.append((la.log_marginal_likelihood().double(), la.functional(x[:5].to(dt))[1]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[0][1].double(), out[1][1], rtol=1e-4, atol=1e-6)
