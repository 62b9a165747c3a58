"""Issue 31's likelihoods on the architecture matrix against dense float64 ``torch.func`` truth.

Every case is a network of ``tests/architectures.py`` (or a small dense-output net) with a
likelihood: heteroscedastic (natural with :class:`NaturalHead`, and mean/log-variance),
multi-label, Bradley–Terry reward on pairs (:class:`PairwiseReward`), and per-position
(segmentation ``(B, C, H, W)``, per-token ``(B, C, T)``, image-to-image regression). The
references never use the likelihood classes under test:

- loss Hessian ``H_n``: ``torch.func.hessian`` of an independent NLL (``torch.distributions``
  Normal, ``F.cross_entropy``, ``F.binary_cross_entropy_with_logits``) in the raw network
  output flattened channel-major (the library flattens position-major); for the
  mean/log-variance case the Fisher ``E_y[∇²NLL]``, exact by two-point quadrature at
  ``y = μ ± σ`` (the Hessian is quadratic in ``y``);
- GGN ``Σ_n J_nᵀ H_n J_n`` with ``J`` from ``jacrev``: ``full`` equals it, ``diag`` its
  diagonal, ``lowrank`` at full rank equals it, K-FAC / EKFAC its layer blocks for one datum;
- evidence: reference log-likelihood ``- ½δ‖θ‖² + ½Σlog δ - ½ log det(H + δI)`` and its
  gradient in δ;
- predictive: ``J Λ⁻¹ Jᵀ`` from the dense precision, pushed through the predictive formula
  (heteroscedastic: delta method with the mean's gradient from autograd).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from architectures import ARCHS, DT, case, rel_err
from torch import nn
from torch.nn import functional as F

from bayescurv import Laplace, links
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import NaturalHead, PairwiseReward, preference_pairs

PRIOR = 0.7
EXACT = 1e-8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# independent reference NLLs (per datum, in the raw output flattened channel-major)
# ------------------------------------------------------------------------------------------
def nll_natural(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    eta1, eta2 = f.chunk(2, -1)
    var = -0.5 / eta2
    return -torch.distributions.Normal(eta1 * var, var.sqrt()).log_prob(y).sum()


def nll_meanvar(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, s = f.chunk(2, -1)
    return -torch.distributions.Normal(mu, (0.5 * s).exp()).log_prob(y).sum()


def fisher_meanvar(f: torch.Tensor) -> torch.Tensor:
    """``E_y ∇²NLL`` by the two-point rule ``y = μ ± σ`` (exact: quadratic in ``y``)."""
    mu, s = f.chunk(2, -1)
    sd = (0.5 * s).exp()
    h = torch.func.hessian(nll_meanvar)
    return 0.5 * (h(f, mu + sd) + h(f, mu - sd))


DF = 4.0  # the student-t cases' degrees of freedom (the likelihood's default)


def nll_student(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, s = f.chunk(2, -1)
    return -torch.distributions.StudentT(DF, mu, s.exp(), validate_args=False).log_prob(y).sum()


def fisher_student(f: torch.Tensor) -> torch.Tensor:
    """The location–scale t's Fisher in ``(μ, log σ)`` (the formula is checked against
    sampled outer products of autograd gradients in :func:`test_student_t_fisher`)."""
    _, s = f.chunk(2, -1)
    return torch.diag(torch.cat([(DF + 1) / (DF + 3) * (-2 * s).exp(),
                                 torch.full_like(s, 2 * DF / (DF + 3))]))


@dataclass(frozen=True)
class Spec:
    name: str
    likelihood: str
    build: object  # () -> (model, x, y, x_test)
    nll: object  # (f_flat, y_item) -> scalar, f_flat the raw output of one datum flattened
    fisher: object = None  # f_flat -> expected Hessian (when not the Hessian itself)


def _seeded(fn):
    @functools.cache
    def wrapped():
        torch.manual_seed(0)
        return fn()
    return wrapped


def _hetero(arch: str, head: bool, positive: str = "softplus"):
    def build():
        c = case(arch)  # two outputs: D = 1
        model = nn.Sequential(c.model, NaturalHead(positive=positive)) if head else c.model
        with torch.no_grad():
            f = model(c.x)
        mu = f[:, :1] * 0.3
        y = mu + 0.5 * torch.randn(mu.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
        return model, c.x, y, c.x_test
    return _seeded(build)


def _multilabel(arch: str):
    def build():
        c = case(arch)
        y = (torch.rand(c.x.shape[0], 3, generator=torch.Generator().manual_seed(4)) > 0.5)
        return c.model, c.x, y.to(DT), c.x_test
    return _seeded(build)


def _reward(arch: str):
    def build():
        c = case(arch)
        inner = nn.Sequential(c.model, nn.Tanh(), nn.Linear(c.arch.outputs, 1)).to(DT)
        model = PairwiseReward(inner)
        g = torch.Generator().manual_seed(5)
        perm = torch.randperm(c.x.shape[0], generator=g)
        x = {"chosen": c.x, "rejected": c.x[perm]}
        y = torch.randint(0, 2, (c.x.shape[0],), generator=g)
        return model, x, y, c.x_test
    return _seeded(build)


def _segmentation():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                        nn.Conv2d(3, 3, 1)).to(DT).eval()
    g = torch.Generator().manual_seed(6)
    net[1].running_mean.normal_(generator=g)
    x = torch.randn(8, 1, 4, 4, dtype=DT, generator=g)
    return net, x, torch.randint(0, 3, (8, 4, 4), generator=g), x[:3] + 0.1


def _tokens():
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1)).to(DT)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 2, 5, dtype=DT, generator=g)
    return net, x, torch.randint(0, 3, (8, 5), generator=g), x[:3] + 0.1


def _image_regression():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)).to(DT)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 2, 3, 3, dtype=DT, generator=g)
    return net, x, torch.randn(8, 2, 3, 3, dtype=DT, generator=g), x[:3] + 0.1


def _ce(f, y):
    return F.cross_entropy(f.reshape(1, -1), y.reshape(1), reduction="sum")


def _ce_positions(c: int):
    def nll(f, y):  # f channel-major (C * |S|,), y (|S|,)
        return F.cross_entropy(f.reshape(1, c, -1), y.reshape(1, -1), reduction="sum")
    return nll


def _gauss_unit(f, y):
    return -torch.distributions.Normal(f, 1.0).log_prob(y.reshape(-1)).sum()


def _bce(f, y):
    return F.binary_cross_entropy_with_logits(f, y, reduction="sum")


SPECS = {s.name: s for s in (
    Spec("hetero-mlp", "heteroscedastic", _hetero("mlp-reg", True), nll_natural),
    Spec("hetero-attention", "heteroscedastic", _hetero("attention-reg", True, "exp"), nll_natural),
    Spec("hetero-cnn", "heteroscedastic", _hetero("cnn-reg", True), nll_natural),
    Spec("meanvar-mlp", "heteroscedastic-meanvar", _hetero("mlp-reg", False), nll_meanvar,
         fisher_meanvar),
    Spec("meanvar-cnn", "heteroscedastic-meanvar", _hetero("cnn-reg", False), nll_meanvar,
         fisher_meanvar),
    Spec("student-mlp", "student-t", _hetero("mlp-reg", False), nll_student, fisher_student),
    Spec("student-attention", "student-t", _hetero("attention-reg", False), nll_student,
         fisher_student),
    Spec("multilabel-mlp", "multilabel", _multilabel("mlp"), _bce),
    Spec("multilabel-conv3d", "multilabel", _multilabel("conv3d"), _bce),
    Spec("multilabel-embedding", "multilabel", _multilabel("embedding"), _bce),
    Spec("reward-mlp", "reward", _reward("mlp"), _ce),
    Spec("reward-cnn", "reward", _reward("cnn"), _ce),
    Spec("reward-attention", "reward", _reward("attention"), _ce),
    Spec("seg-cnn", "dense-classification", _seeded(_segmentation), _ce_positions(3)),
    Spec("token-conv1d", "dense-classification", _seeded(_tokens), _ce_positions(3)),
    Spec("img2img", "dense-regression", _seeded(_image_regression), _gauss_unit),
)}
assert all(a in ARCHS for a in ("mlp-reg", "attention-reg", "cnn-reg"))

STRUCTURES = ("full", "diag", "kfac", "ekfac", "lowrank")


def _batches(x, y, sizes=None):
    n = y.shape[0]
    sizes = sizes or (n // 2, n - n // 2)
    out, start = [], 0
    for s in sizes:
        xs = {k: v[start:start + s] for k, v in x.items()} if isinstance(x, dict) \
            else x[start:start + s]
        out.append((xs, y[start:start + s]))
        start += s
    return out


def _data(spec: Spec, x, y, sizes=None):
    data = _batches(x, y, sizes)
    if spec.likelihood == "reward":  # a preference data set: chosen/rejected dicts + label
        return preference_pairs([{**xs, "y": ys} for xs, ys in data])
    return data


@functools.cache
def fitted(name: str, structure: str, subset: str = "all") -> Laplace:
    spec = SPECS[name]
    model, x, y, _ = spec.build()
    extra = {"rank": 4096} if structure == "lowrank" else {}  # above P: exact
    return Laplace(model, spec.likelihood, structure=structure, subset=subset,
                   prior_precision=PRIOR, **extra).fit(_data(spec, x, y))


def _call(params, v, x):
    return params.functional_call(v, **x) if isinstance(x, dict) else params.functional_call(v, x)


@functools.cache
def truth(name: str, subset: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense GGN ``(P, P)`` and the reference log-likelihood ``log p(D|θ*)``."""
    spec = SPECS[name]
    _, x, y, _ = spec.build()
    params = fitted(name, "full", subset).params
    v = params.vector()
    jac = torch.func.jacrev(lambda t: _call(params, t, x).flatten(1))(v).detach()
    with torch.no_grad():
        f = _call(params, v, x).flatten(1)
    ys = y.reshape(y.shape[0], -1) if y.dim() > 1 else y
    hs = [spec.fisher(f[n]) if spec.fisher else torch.func.hessian(spec.nll)(f[n], ys[n])
          for n in range(f.shape[0])]
    ggn = sum(jac[n].T @ hs[n] @ jac[n] for n in range(f.shape[0]))
    loglik = -sum(spec.nll(f[n], ys[n]) for n in range(f.shape[0]))
    return 0.5 * (ggn + ggn.T), loglik


MATRIX = [pytest.param(n, s, "all", id=f"{n}-{s}") for n in SPECS for s in STRUCTURES] + [
    pytest.param(n, s, "all", id=f"{n}-{s}")  # the other structures, one case per likelihood
    for n in ("hetero-cnn", "meanvar-mlp", "multilabel-mlp", "reward-mlp", "seg-cnn", "img2img")
    for s in ("kfac-reduce", "diag+lowrank")] + [
    pytest.param(n, s, "last_layer", id=f"{n}-{s}-last_layer")  # the output-layer shortcuts
    for n in ("meanvar-mlp", "multilabel-mlp", "reward-mlp") for s in STRUCTURES]


@pytest.mark.filterwarnings("ignore:subset='last_layer' chose")  # PairwiseReward's concat
@pytest.mark.parametrize("name,structure,subset", MATRIX)
def test_curvature_and_evidence(name, structure, subset):
    la = fitted(name, structure, subset)
    ggn, loglik = truth(name, subset)
    h = la.curvature
    if structure in ("full", "lowrank"):  # lowrank at a rank above P is exact
        err = rel_err(h.to_dense(), ggn)
        assert err < EXACT, f"curvature vs dense GGN: {err:.3g}"
    elif structure in ("diag", "diag+lowrank"):
        assert rel_err(h.diagonal(), ggn.diagonal()) < EXACT
    else:  # Kronecker: PSD, same trace order of magnitude (exactness: one datum, below)
        d = h.to_dense()
        assert torch.linalg.eigvalsh(0.5 * (d + d.T)).min() > -1e-10 * d.abs().max()
    # evidence at the structure's own curvature: loss term from the reference NLL
    theta = la.params.vector()
    delta = torch.tensor(PRIOR, dtype=DT, requires_grad=True)
    lam = h.to_dense() + delta * torch.eye(theta.numel(), dtype=DT)
    ref = (loglik - 0.5 * delta * theta.square().sum()
           + 0.5 * theta.numel() * delta.log() - 0.5 * torch.logdet(lam))
    d_got = torch.tensor(PRIOR, dtype=DT, requires_grad=True)
    got = la.log_marginal_likelihood(d_got)
    assert abs(float((got - ref).detach())) < 1e-9 * max(1.0, abs(float(ref.detach())))
    g_got, = torch.autograd.grad(got, d_got)
    g_ref, = torch.autograd.grad(ref, delta)
    assert abs(float(g_got - g_ref)) < 1e-8 * max(1.0, abs(float(g_ref)))


@pytest.mark.parametrize("name", [n for n in SPECS if n.endswith("mlp")
                                  and not n.startswith("reward")])
@pytest.mark.parametrize("structure", ("kfac", "ekfac"))
def test_kronecker_exact_for_one_datum(name, structure):
    """K-FAC and EKFAC equal the GGN's layer blocks for a single datum on layers without
    weight sharing (MLP cases; the others, and the reward model whose layers are shared by
    the two items of a pair, are checked for PSD above)."""
    spec = SPECS[name]
    model, x, y, _ = spec.build()
    one = ({k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]), y[:1]
    la = Laplace(model, spec.likelihood, structure=structure).fit(_data(spec, *one, (1,)))
    ref = Laplace(model, spec.likelihood, structure="full").fit(_data(spec, *one, (1,)))
    dense, got = ref.curvature.to_dense(), la.curvature.to_dense()
    from architectures import layer_of
    layer = layer_of(la.params)
    mask = layer[:, None] == layer[None, :]
    assert rel_err(got, dense * mask) < 1e-8


@pytest.mark.parametrize("name,structure", [pytest.param(n, s, id=f"{n}-{s}")
                                            for n in SPECS for s in ("full", "kfac")])
def test_predictive(name, structure):
    spec = SPECS[name]
    la = fitted(name, structure)
    _, _, _, xt = spec.build()
    params = la.params
    v = params.vector()
    lam = la.posterior_precision.to_dense()
    if spec.likelihood == "reward":  # predicted as a reward on single items
        jac = torch.func.jacrev(lambda t: _call(params, t, xt))(v).detach().reshape(
            xt.shape[0], -1)
        mean, var = la.predict(xt)
        ref = (jac * torch.linalg.solve(lam, jac.T).T).sum(-1)
        assert rel_err(var.reshape(-1), ref) < EXACT
        with torch.no_grad():
            torch.testing.assert_close(mean, params.model(xt))
        pair = {"chosen": xt, "rejected": xt.flip(0)}
        jp = torch.func.jacrev(lambda t: _call(params, t, pair))(v).detach()  # (B, 2, P)
        jd = jp[:, 0] - jp[:, 1]
        with torch.no_grad():
            fp = params.model(**pair)
        vd = (jd * torch.linalg.solve(lam, jd.T).T).sum(-1)
        p_ref = torch.sigmoid((fp[:, 0] - fp[:, 1]) / torch.sqrt(1 + math.pi / 8 * vd))
        assert rel_err(la.predict(pair), p_ref) < 1e-10
        return
    jac = torch.func.jacrev(lambda t: _call(params, t, xt))(v).detach()  # raw shape + (P,)
    with torch.no_grad():
        raw = params.model(xt)
    b = raw.shape[0]
    if raw.dim() > 2:  # dense: per-position blocks
        c = raw.shape[1]
        jp = jac.reshape(b, c, -1, v.numel()).permute(0, 2, 1, 3)  # (B, S, C, P)
        cov = torch.einsum("bscp,pq,bsdq->bscd", jp, torch.linalg.inv(lam), jp)
        mean, blocks = la.functional(xt)
        assert rel_err(blocks, cov) < EXACT
        pred = la.predict(xt)
        if spec.likelihood == "dense-classification":
            # the library's (tested) probit-softmax of every position's dense block
            m = raw.reshape(b, c, -1).movedim(1, -1)  # (B, S, C)
            ref = links.probit_softmax(m.reshape(-1, c), cov.reshape(-1, c, c))
            ref = ref.reshape(m.shape).movedim(-1, 1).reshape(raw.shape)
            assert pred.shape == raw.shape and rel_err(pred, ref) < 1e-10
        else:
            var_ref = torch.diagonal(cov, dim1=-2, dim2=-1).movedim(-1, 1).reshape(raw.shape) + 1
            assert rel_err(pred[0], raw) < 1e-12 and rel_err(pred[1], var_ref) < 1e-10
        return
    cov = torch.einsum("bcp,pq,bdq->bcd", jac, torch.linalg.inv(lam), jac)
    mean, got = la.functional(xt)
    assert rel_err(got, cov) < EXACT
    pred = la.predict(xt)
    if spec.likelihood == "multilabel":
        ref = torch.sigmoid(raw / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, 0, 1, 2)))
        assert rel_err(pred, ref) < 1e-10
        return
    # heteroscedastic: the mean μ(f) linearized by autograd, the noise at the MAP
    mu_fn = (lambda f: -f[0] / (2 * f[1])) if spec.likelihood == "heteroscedastic" else (
        lambda f: f[0])
    var_fn = {"heteroscedastic": lambda f: -0.5 / f[1],
              "heteroscedastic-meanvar": lambda f: f[1].exp(),
              "student-t": lambda f: (2 * f[1]).exp() * DF / (DF - 2)}[spec.likelihood]
    grads = torch.stack([torch.func.grad(mu_fn)(raw[n]) for n in range(b)])
    epi = torch.einsum("bc,bcd,bd->b", grads, cov, grads)
    mu, e, a = pred
    assert rel_err(mu[:, 0], torch.stack([mu_fn(r) for r in raw])) < 1e-12
    assert rel_err(e[:, 0], epi) < 1e-10
    assert rel_err(a[:, 0], torch.stack([var_fn(r) for r in raw])) < 1e-12


def test_heteroscedastic_marglik_tunes_prior_only():
    la = fitted("hetero-mlp", "kfac")
    before = float(la.log_marginal_likelihood())
    la2 = Laplace(la.model, "heteroscedastic", structure="kfac").fit(
        _batches(*SPECS["hetero-mlp"].build()[1:3]))
    la2.optimize_prior_precision(n_steps=50)
    assert float(la2.log_marginal_likelihood()) >= before - 1e-9
    with pytest.raises(InvalidArgumentError):
        la2.sigma_noise = 0.5


def test_predictive_mc_and_nn_agree_with_delta():
    """With a narrow posterior (large prior precision) the MC and sampled-network
    predictives agree with the delta method: the mean and aleatoric variance to MC error, the
    epistemic variance to 10 %."""
    model, x, y, xt = SPECS["hetero-mlp"].build()
    la = Laplace(model, "heteroscedastic", structure="full", prior_precision=1e4).fit(
        _batches(x, y))
    mu, epi, ale = la.predict(xt)
    g = torch.Generator().manual_seed(0)
    for kw in ({"link": "mc"}, {"pred_type": "nn"}):
        mu2, epi2, ale2 = la.predict(xt, num_samples=4000, generator=g, **kw)
        assert ((mu2 - mu).abs() < 5 * (epi / 4000).sqrt()).all(), kw
        assert rel_err(epi2, epi) < 0.1 and rel_err(ale2, ale) < 0.01, kw


def test_float32_matches_float64():
    """float32 model, badly scaled inputs: evidence and variances agree with float64."""
    spec = SPECS["hetero-mlp"]
    model, x, y, xt = spec.build()
    x, xt = 30 * x, 30 * xt
    lik = spec.likelihood
    out = {}
    for dt in (torch.float64, torch.float32):
        m = __import__("copy").deepcopy(model).to(dt)
        la = Laplace(m, lik, structure="kfac", prior_precision=PRIOR).fit(
            _batches(x.to(dt), y.to(dt)))
        out[dt] = (la.log_marginal_likelihood().double(), la.predict(xt.to(dt))[1].double())
    ev64, var64 = out[torch.float64]
    ev32, var32 = out[torch.float32]
    assert abs(float(ev32 - ev64)) < 1e-4 * abs(float(ev64))
    assert rel_err(var32, var64) < 1e-3


def test_bad_input():
    model, x, y, _ = SPECS["hetero-mlp"].build()
    la = Laplace(model[0], "heteroscedastic")  # no NaturalHead: η₂ may be positive
    with pytest.raises((InvalidArgumentError, ShapeError)):
        la.fit(_batches(x, y))
    with pytest.raises(InvalidArgumentError, match="positive"):
        NaturalHead(positive="square")
    with pytest.raises(ShapeError, match="2D outputs"):
        Laplace(nn.Linear(5, 3).to(DT), "heteroscedastic").fit([(x, y)])
    with pytest.raises(ShapeError, match="0 or 1"):
        Laplace(nn.Linear(5, 3).to(DT), "multilabel").fit([(x, torch.full((24, 3), 2.0))])
    with pytest.raises(ShapeError, match="pairs"):
        Laplace(nn.Linear(5, 1).to(DT), "reward").fit([(x, torch.zeros(24))])
    with pytest.raises(ShapeError, match="pair batches"):
        list(preference_pairs([torch.randn(4, 3, 5)]))
    net, xs, ys, _ = _segmentation()
    with pytest.raises(ShapeError, match="class indices"):
        Laplace(net, "dense-classification").fit([(xs, ys[:, :2])])
    la = fitted("seg-cnn", "diag")
    with pytest.raises(InvalidArgumentError, match="joint"):
        la.functional(xs[:2], joint=True)


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic-meanvar", "student-t",
                                  "multilabel",
                                  "reward", "dense-classification", "dense-regression"])
def test_sampled_root_is_unbiased(name):
    """``kind="mc"``'s square root: ``E[S Sᵀ] = H`` over sampled targets (checks ``sample``
    and ``gradient`` against ``hessian``); for dense outputs the positions' independent
    samples keep the expectation block diagonal."""
    from bayescurv.likelihoods import get_likelihood

    lik = get_likelihood(name)
    g = torch.Generator().manual_seed(0)
    shape = {"dense-classification": (3, 3, 2, 2), "dense-regression": (3, 2, 3)}.get(
        name, (3, 2) if name in ("heteroscedastic", "heteroscedastic-meanvar", "reward",
                                 "student-t")
        else (3, 4))
    f = torch.randn(shape, dtype=DT, generator=g)
    if name == "heteroscedastic":
        f[:, 1] = -0.5 - f[:, 1].abs()
    f = lik.check_outputs(f)
    n = 1000
    s = lik.sampled_hessian_sqrt(f, n, g)  # (B, K, n) / sqrt(n)
    emp = s @ s.mT
    h = lik.hessian(f)
    outer = s * math.sqrt(n)
    sd = (outer.unsqueeze(-2) * outer.unsqueeze(-3)).std(-1) / math.sqrt(n)  # per entry
    z = (emp - h) / sd.clamp_min(1e-12)
    assert z.abs().max() < 6, f"E[S Sᵀ] off by {z.abs().max():.1f} std"


def test_student_t_fisher():
    """The Student-t's gradient equals autograd of ``torch.distributions.StudentT``, and its
    curvature the Fisher ``E[∇ℓ ∇ℓᵀ]`` over ``torch.distributions.StudentT`` draws (z-test)."""
    from bayescurv.likelihoods import StudentT

    lik = StudentT(DF)
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 2, dtype=DT, generator=g)
    y = torch.randn(3, 1, dtype=DT, generator=g)
    ref = torch.stack([torch.func.grad(nll_student)(f[n], y[n]) for n in range(3)])
    assert rel_err(lik.gradient(f, y), ref) < 1e-12
    torch.manual_seed(2)
    n = 4000
    mu, sigma = f[:, :1], f[:, 1:].exp()
    ys = torch.distributions.StudentT(DF, mu, sigma).sample((n,))  # (n, 3, 1)
    grads = torch.func.vmap(torch.func.grad(nll_student))(
        f.expand(n, 3, 2).reshape(-1, 2), ys.reshape(-1, 1)).reshape(n, 3, 2)
    outer = grads.unsqueeze(-1) * grads.unsqueeze(-2)
    z = (outer.mean(0) - lik.hessian(f)) / (outer.std(0) / math.sqrt(n)).clamp_min(1e-12)
    assert z.abs().max() < 6
    assert torch.isinf(StudentT(2.0).mean_var(f)[1]).all()
    with pytest.raises(InvalidArgumentError, match="df"):
        StudentT(0.0)
