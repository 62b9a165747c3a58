"""Issue 26 (model zoos): rank-deficient factors, chunked predictions, ``output_key`` in
every data pass, and the messages of the tuner and of the likelihood checks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, compute, errors
from bayescurv.continual import LaplaceFilter
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.glm import EmpiricalNTK
from bayescurv.laplace import GaussianGLM, predictions
from bayescurv.laplace.online import marglik_training
from bayescurv.likelihoods import Categorical, Gaussian, Likelihood, Poisson
from bayescurv.linalg import Dense, KroneckerEigen, robust_eigh
from bayescurv.params import select

DT = torch.float64


def mlp(d_in=4, hidden=6, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


def data(n=23, d_in=4, d_out=3, task="classification", seed=1, batch_size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=DT)
    if task == "classification":
        y = torch.randint(0, d_out, (n,), generator=g)
    elif task == "poisson":
        y = torch.poisson(torch.ones(n, d_out, dtype=DT), generator=g)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=DT)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=batch_size)


# ------------------------------------------------------------------ 1. robust eigh
def rank_deficient(n=300, zero=250, dtype=DT, seed=0):
    """A PSD ``(n, n)`` factor whose ``zero`` rows/columns (scattered) are exactly zero."""
    g = torch.Generator().manual_seed(seed)
    k = n - zero
    X = torch.randn(3 * k, k, generator=g, dtype=dtype)
    F = torch.zeros(n, n, dtype=dtype)
    idx = torch.randperm(n, generator=g)[:k]
    F[idx.unsqueeze(-1), idx] = X.T @ X / (3 * k)
    return F


def fail_first(monkeypatch, calls: int = 1):
    """Make ``torch.linalg.eigh`` raise LAPACK's error on its first ``calls`` calls."""
    real = torch.linalg.eigh
    seen = {"n": 0}

    def eigh(M, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] <= calls:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return seen


def check_decomposition(F, lam, Q, atol):
    n = F.shape[0]
    assert (Q @ torch.diag(lam) @ Q.T - F).abs().max() < atol
    assert (Q.T @ Q - torch.eye(n, dtype=F.dtype)).abs().max() < atol
    assert bool((lam[1:] >= lam[:-1]).all())  # ascending, as torch.linalg.eigh


def test_robust_eigh_deflates_zero_rows_before_decomposing(monkeypatch):
    # a large factor with zero rows never goes to LAPACK whole: only its nonzero block does
    F = rank_deficient()
    ref = torch.linalg.eigvalsh(F)
    sizes = []
    real = torch.linalg.eigh

    def spy(M, *args, **kwargs):
        sizes.append(M.shape[-1])
        return real(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    lam, Q = robust_eigh(F)
    assert sizes == [50]
    check_decomposition(F, lam, Q, 1e-12)
    torch.testing.assert_close(lam, ref, atol=1e-12, rtol=0)


def test_robust_eigh_deflates_exactly_after_a_lapack_failure(monkeypatch):
    from bayescurv.linalg import eigh as eigh_module

    monkeypatch.setattr(eigh_module, "DEFLATE_MIN", 10**9)  # the path after a failure
    F = rank_deficient()
    ref = torch.linalg.eigvalsh(F)
    seen = fail_first(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deflation is exact: no warning
        lam, Q = robust_eigh(F)
    assert seen["n"] == 2  # the failure, then the 50 x 50 block
    check_decomposition(F, lam, Q, 1e-12)
    torch.testing.assert_close(lam, ref, atol=1e-12, rtol=0)
    assert int((lam == 0).sum()) >= 250


def test_robust_eigh_batched_factors(monkeypatch):
    # grouped factors come as a batch: a failing batched call is retried member by member
    F = torch.stack([rank_deficient(n=40, zero=z, seed=z) for z in (0, 30, 39)])
    fail_first(monkeypatch)
    lam, Q = robust_eigh(F)
    assert lam.shape == (3, 40) and Q.shape == (3, 40, 40)
    for i in range(3):
        check_decomposition(F[i], lam[i], Q[i], 1e-12)
    with pytest.raises(errors.ShapeError, match="square matrices"):
        robust_eigh(torch.zeros(3, 4, dtype=DT))


def test_robust_eigh_falls_back_to_scipy_with_a_warning(monkeypatch):
    F = rank_deficient()

    def never(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", never)
    with pytest.warns(RuntimeWarning, match=r"300 x 300, of which 250 exactly-zero.*scipy"):
        lam, Q = robust_eigh(F, "Kronecker factor")
    check_decomposition(F, lam, Q, 1e-12)
    G = rank_deficient(zero=0)[:80, :80] + torch.eye(80, dtype=DT)  # nothing to deflate
    with pytest.warns(RuntimeWarning, match=r"80 x 80\); used scipy"):
        lam, Q = robust_eigh(G.to(torch.float32))
    assert lam.dtype == torch.float32 and Q.dtype == torch.float32
    check_decomposition(G.to(torch.float32), lam, Q, 1e-5)


def test_robust_eigh_last_resort_is_a_library_error(monkeypatch):
    def never(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    def scipy_never(*args, **kwargs):
        raise scipy.linalg.LinAlgError("evr failed")

    monkeypatch.setattr(torch.linalg, "eigh", never)
    monkeypatch.setattr(scipy.linalg, "eigh", scipy_never)
    with pytest.raises(errors.NumericalError, match=r"Kronecker factor \(300 x 300"):
        robust_eigh(rank_deficient(), "Kronecker factor")
    F = rank_deficient(n=20, zero=5)
    F[3, 3] = math.nan
    with pytest.raises(errors.NonFiniteError, match="NaN"):
        robust_eigh(F)


def test_kronecker_and_dense_blocks_survive_lapack_failures(monkeypatch):
    A, B = rank_deficient(n=60, zero=45), rank_deficient(n=7, zero=0, seed=1)
    fail_first(monkeypatch)
    op = KroneckerEigen.from_factors(A, B).add_diagonal(0.5)
    ref = torch.kron(A, B) + 0.5 * torch.eye(420, dtype=DT)
    torch.testing.assert_close(op.to_dense(), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(op.logdet(), torch.logdet(ref), atol=1e-9, rtol=0)
    fail_first(monkeypatch)
    M = rank_deficient(n=40, zero=30)
    d = Dense(M).add_diagonal(0.1)
    v = torch.randn(40, dtype=DT)
    ref = M + 0.1 * torch.eye(40, dtype=DT)
    torch.testing.assert_close(d.solve(v), torch.linalg.solve(ref, v), atol=1e-10, rtol=0)


def test_rank_deficient_float32_factor_without_patching():
    # torch's syevd fails to converge on this factor with the CPU LAPACK of this build; the
    # decomposition must not end in a LinAlgError either way
    A = rank_deficient(dtype=torch.float32)
    op = KroneckerEigen.from_factors(A, torch.ones(1, 1)).add_diagonal(1.0)
    ref = A.double() + torch.eye(300, dtype=DT)
    torch.testing.assert_close(op.logdet().double(), torch.logdet(ref), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ 2. chunked predictions
def count_passes(monkeypatch) -> list[int]:
    """Record the batch size of every Jacobian pass of the GLM predictive."""
    sizes: list[int] = []
    real = predictions.glm_covariance

    def wrapped(capture, precision, x, **kwargs):
        t = next(iter(x.values())) if isinstance(x, dict) else x
        sizes.append(t.shape[capture.batch_dim] if hasattr(capture, "batch_dim") else
                     t.shape[0])
        return real(capture, precision, x, **kwargs)

    monkeypatch.setattr(predictions, "glm_covariance", wrapped)
    return sizes


@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_predict_and_functional_are_chunked_and_unchanged(monkeypatch, structure):
    model = mlp()
    x, y, loader = data()
    la = Laplace(model, "classification", structure=structure).fit(loader)
    mean, cov = la.functional(x)
    probs = la.predict(x)
    mc = la.predict(x, link="mc", generator=torch.Generator().manual_seed(3))
    nn_ = la.predict(x, pred_type="nn", num_samples=5, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(predictions, "CHUNK_SIZE", 5)
    sizes = count_passes(monkeypatch)
    mean_c, cov_c = la.functional(x)
    assert sizes == [5, 5, 5, 5, 3]
    torch.testing.assert_close(mean_c, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov_c, cov, atol=1e-12, rtol=0)
    torch.testing.assert_close(la.predict(x), probs, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        la.predict(x, link="mc", generator=torch.Generator().manual_seed(3)), mc,
        atol=1e-12, rtol=0)
    torch.testing.assert_close(
        la.predict(x, pred_type="nn", num_samples=5, generator=torch.Generator().manual_seed(4)),
        nn_, atol=1e-12, rtol=0)
    sizes.clear()
    _, joint = la.functional(x, joint=True)  # joint: one pass over all inputs
    assert sizes == [23]
    torch.testing.assert_close(joint.reshape(23, 3, 23, 3).diagonal(0, 0, 2).permute(2, 0, 1),
                               cov, atol=1e-12, rtol=0)
    sizes.clear()
    la.predict(x, chunk_size=10)
    assert sizes == [10, 10, 3]


def test_regression_predict_chunked(monkeypatch):
    model = mlp(d_out=2)
    x, y, loader = data(d_out=2, task="regression")
    la = Laplace(model, "regression", structure="kfac", sigma_noise=0.3).fit(loader)
    mean, var = la.predict(x)
    monkeypatch.setattr(predictions, "CHUNK_SIZE", 4)
    sizes = count_passes(monkeypatch)
    mean_c, var_c = la.predict(x)
    assert len(sizes) == 6
    torch.testing.assert_close(mean_c, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(var_c, var, atol=1e-12, rtol=0)
    with pytest.raises(errors.InvalidArgumentError, match="chunk_size must be a positive int"):
        la.predict(x, chunk_size=0)


class KeywordNet(nn.Module):
    """A model taking keyword inputs like a HuggingFace one: ``features`` ``(B, D)``, a
    per-input ``scale`` ``(B, 1)`` and a broadcast ``offset`` ``(1, D)``."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, features, scale, offset):
        return self.net(features * scale + offset)


def test_dict_inputs_are_chunked_entry_by_entry(monkeypatch):
    model = KeywordNet()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(17, 4, generator=g, dtype=DT)
    scale = torch.rand(17, 1, generator=g, dtype=DT) + 0.5
    offset = torch.randn(1, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (17,), generator=g)
    loader = [{"features": feats[:9], "scale": scale[:9], "offset": offset, "y": y[:9]},
              {"features": feats[9:], "scale": scale[9:], "offset": offset, "y": y[9:]}]
    la = Laplace(model, "classification", structure="kfac").fit(loader)
    x = {"features": feats, "scale": scale, "offset": offset}
    mean, cov = la.functional(x)
    probs = la.predict(x)
    monkeypatch.setattr(predictions, "CHUNK_SIZE", 4)
    sizes = count_passes(monkeypatch)
    mean_c, cov_c = la.functional(x)
    assert sizes == [4, 4, 4, 4, 1]
    torch.testing.assert_close(mean_c, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov_c, cov, atol=1e-12, rtol=0)
    torch.testing.assert_close(la.predict(x), probs, atol=1e-12, rtol=0)


class SequenceFirst(nn.Module):
    """``(T, B, D)`` inputs, mean over positions, then a linear head: ``(B, C)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 5).to(DT)
        self.head = nn.Linear(5, 3).to(DT)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(0))


def test_sequence_first_chunks_and_loaders_concatenate_batch_first(monkeypatch):
    model = SequenceFirst()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 12, 4, generator=g, dtype=DT)  # (T, B, D)
    y = torch.randint(0, 3, (12,), generator=g)
    la = Laplace(model, "classification", structure="kfac", batch_dim=1).fit(
        [(x[:, :6], y[:6]), (x[:, 6:], y[6:])])
    probs = la.predict(x)
    assert probs.shape == (12, 3)
    # a loader of equal batches: outputs are batch-first, concatenated along dim 0
    torch.testing.assert_close(la.predict([x[:, :6], x[:, 6:]]), probs, atol=1e-12, rtol=0)
    monkeypatch.setattr(predictions, "CHUNK_SIZE", 5)
    sizes = count_passes(monkeypatch)
    torch.testing.assert_close(la.predict(x), probs, atol=1e-12, rtol=0)
    assert sizes == [5, 5, 2]


# ------------------------------------------------------------------ 3. output_key
class DictOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "hidden": x.sum(-1)}


class TupleOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.sum(-1)


WRAPPED = [(DictOut, "logits"), (TupleOut, 0)]


@pytest.mark.parametrize("wrapper,key", WRAPPED)
def test_regression_with_output_key(wrapper, key):
    x, y, loader = data(d_out=2, task="regression")
    base = mlp(d_out=2)
    ref = Laplace(base, "regression", structure="kfac").fit(loader)
    ref.optimize_prior_precision(tune_sigma_noise=True)
    la = Laplace(wrapper(copy.deepcopy(base)), "regression", structure="kfac",
                 output_key=key).fit(loader)
    la.optimize_prior_precision(tune_sigma_noise=True)
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)
    torch.testing.assert_close(la.sigma_noise, ref.sigma_noise)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    for a, b in zip(la.predict(x), ref.predict(x)):
        torch.testing.assert_close(a, b)
    for a, b in zip(la.predict(x, pred_type="nn", generator=torch.Generator().manual_seed(0)),
                    ref.predict(x, pred_type="nn", generator=torch.Generator().manual_seed(0))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("wrapper,key", WRAPPED)
def test_gridsearch_and_exact_glm_with_output_key(wrapper, key):
    x, y, loader = data()
    base = mlp()
    ref = Laplace(base, "classification", structure="diag").fit(loader)
    la = Laplace(wrapper(copy.deepcopy(base)), "classification", structure="diag",
                 output_key=key).fit(loader)
    grid = torch.logspace(-2, 2, 5, dtype=DT)
    p_ref = ref.optimize_prior_precision("gridsearch", val_loader=loader, grid=grid)
    p = la.optimize_prior_precision("gridsearch", val_loader=loader, grid=grid)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(la.predict(x), ref.predict(x))
    # the exact linearized Gaussian model reads the outputs in its own data pass
    xr, yr, lr = data(d_out=2, task="regression")
    base = mlp(d_out=2)
    ref = Laplace(base, "regression", structure="full").fit(lr)
    la = Laplace(wrapper(copy.deepcopy(base)), "regression", structure="full",
                 output_key=key).fit(lr)
    torch.testing.assert_close(GaussianGLM(la, lr).log_marginal_likelihood(),
                               GaussianGLM(ref, lr).log_marginal_likelihood())
    # the empirical-NTK kernel of the GLM solvers: f(x) - J θ at the MAP
    torch.testing.assert_close(EmpiricalNTK(la).mean(xr, 2), EmpiricalNTK(ref).mean(xr, 2))


@pytest.mark.parametrize("wrapper,key", WRAPPED)
def test_continual_filter_and_matfree_with_output_key(wrapper, key):
    x, y, loader = data()
    base = mlp()
    model = wrapper(copy.deepcopy(base))
    ref = LaplaceFilter(base, "classification", rank=3, eigensolver="dense")
    lf = LaplaceFilter(model, "classification", rank=3, eigensolver="dense", output_key=key)
    for f in (ref, lf):
        f.predict()
    s_ref, s = ref.update(loader), lf.update(loader)
    torch.testing.assert_close(s.precision.diagonal(), s_ref.precision.diagonal())
    # one vector goes through the single-column (dual forward) route
    v = torch.randn(select(base).numel, dtype=DT)
    op = CurvatureLinearOperator(model, "classification", loader, select(model, output_key=key))
    op_ref = CurvatureLinearOperator(base, "classification", loader, select(base))
    torch.testing.assert_close(op @ v, op_ref @ v)


@pytest.mark.filterwarnings("ignore::bayescurv.errors.ConvergenceWarning")
def test_marglik_training_with_output_key():
    x, y, loader = data(d_out=2, task="regression")
    base = mlp(d_out=2)
    wrapped = DictOut(copy.deepcopy(base))
    kw = dict(subset="last_layer", structure="diag", n_epochs=2, n_epochs_burnin=0,
              marglik_frequency=1, n_hypersteps=3)
    torch.manual_seed(0)
    ref = marglik_training(base, loader, "regression", **kw)
    torch.manual_seed(0)
    res = marglik_training(wrapped, loader, "regression", output_key="logits", **kw)
    assert math.isclose(res.log_marglik, ref.log_marglik, rel_tol=1e-9)


# ------------------------------------------------------------------ 4. messages
def regression_posterior():
    x, y, loader = data(n=60, d_in=3, d_out=1, task="regression")
    return Laplace(mlp(d_in=3, d_out=1), "regression", structure="kfac").fit(loader)


def test_convergence_warning_states_the_real_count_and_knob():
    la = regression_posterior()
    with pytest.warns(errors.ConvergenceWarning) as rec:
        la.optimize_prior_precision(tune_sigma_noise=True, tol=1e-14)
    msg = str(rec[0].message)
    assert f"in {la.tuning.n_steps} L-BFGS steps of at most n_steps=100" in msg
    assert la.tuning.n_steps < 100
    assert "raise tol" in msg.lower() and "raise n_steps" not in msg
    la = regression_posterior()
    with pytest.warns(errors.ConvergenceWarning, match=r"in 1 L-BFGS steps of at most "
                      r"n_steps=1: it used every step; raise n_steps"):
        la.optimize_prior_precision(tune_sigma_noise=True, n_steps=1, tol=1e-14)


def test_laplace_likelihood_errors_list_what_laplace_accepts():
    with pytest.raises(errors.InvalidArgumentError) as err:
        Laplace(mlp(), "poisson")
    msg = str(err.value)
    accepted = ("'binary', 'classification', 'dense-binary', 'dense-classification', "
                "'dense-multilabel', 'dense-regression', 'heteroscedastic', "
                "'heteroscedastic-meanvar', 'multilabel', 'regression', 'reward' or "
                "'student-t'")
    assert f"Laplace supports likelihood {accepted}" in msg
    assert msg.count("poisson") == 1  # only as what was given
    with pytest.raises(errors.InvalidArgumentError) as err:
        Laplace(mlp(), "logistic")
    msg = str(err.value)
    assert f"unknown likelihood 'logistic'; use one of {accepted}" in msg \
        and "poisson" not in msg
    # where every registered likelihood is accepted, the error lists every one
    x, y, loader = data()
    with pytest.raises(errors.InvalidArgumentError, match="'poisson'"):
        compute(mlp(), "logistic", loader)


class TemperedCategorical(Categorical):
    """A user's likelihood: softmax classification under another name."""

    name = "tempered"


class NoHessian(Likelihood):
    name = "incomplete"

    def check(self, f, y):
        return f, y

    def log_prob(self, f, y):
        return -(f - y).square().sum(-1)


def test_laplace_accepts_likelihood_instances():
    x, y, loader = data()
    ref = Laplace(mlp(), "classification", structure="kfac").fit(loader)
    lik = TemperedCategorical()
    la = Laplace(mlp(), lik, structure="kfac").fit(loader)
    la.optimize_prior_precision()
    ref.optimize_prior_precision()
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)
    torch.testing.assert_close(la.predict(x), ref.predict(x))
    assert la.state_dict()["likelihood"] == "tempered"
    # a Poisson instance: curvature as compute's, evidence, MC predictive (its only link)
    xp, yp, lp = data(task="poisson")
    la = Laplace(mlp(), Poisson(), structure="diag").fit(lp)
    curv = compute(mlp(), Poisson(), lp, structure="diag")
    torch.testing.assert_close(la.curvature.diagonal(), curv.matrix.diagonal())
    assert torch.isfinite(la.log_marginal_likelihood())
    rate = la.predict(xp, generator=torch.Generator().manual_seed(0))
    assert rate.shape == (23, 3) and bool((rate > 0).all())
    # a Gaussian instance brings its noise; the caller's object is not changed
    g = Gaussian(0.5)
    la = Laplace(mlp(d_out=2), g, structure="kfac")
    assert float(la.sigma_noise) == 0.5
    la.sigma_noise = 0.7
    assert float(g.sigma_noise) == 0.5
    with pytest.raises(errors.InvalidArgumentError, match="does not implement inverse_link, "
                       "predictive, hessian_sqrt, which Laplace"):
        Laplace(mlp(), NoHessian())
    with pytest.raises(errors.InvalidArgumentError, match="gradient"):
        Laplace(mlp(), NoHessian(), kind="ef")
