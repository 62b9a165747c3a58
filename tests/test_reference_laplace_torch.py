"""bayescurv's Laplace against laplace-torch 0.3 where the definitions coincide.

Float64 nets of a few dozen parameters, several batches of unequal size. Where the two
libraries define the same quantity (full and diagonal GGN posteriors on all weights, the
last layer or a subnetwork; K-FAC without biases; Gaussian and categorical likelihoods; the
log marginal likelihood and its gradients; posterior variances; the GLM predictive mean and
covariance; the Laplace bridge) the numbers must agree to ``RTOL`` relative (the contract is
1e-4; in float64 they agree to rounding). Where they differ by definition (K-FAC with
biases, per-tensor vs per-module layer priors, the probit link, the regression predictive's
noise term) the tests pin the difference down exactly. See ``docs/reference_checks.md``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace
from bayescurv.links import probit_softmax

lt = pytest.importorskip("laplace")
pytestmark = [
    pytest.mark.reference,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

DT = torch.float64
RTOL = 1e-6  # float64; the documented contract is 1e-4
N, D_IN, HIDDEN, BATCH = 30, 4, 6, 8  # batches of 8, 8, 8, 6
STRUCT = {"full": "full", "diag": "diag", "kfac": "kron"}  # ours -> laplace-torch


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def mlp(d_out: int = 3, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN, bias=bias), nn.Tanh(),
                         nn.Linear(HIDDEN, d_out, bias=bias)).to(DT)


def dataset(likelihood: str, d_out: int, n: int = N, seed: int = 1
            ) -> tuple[Tensor, Tensor, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, d_out, (n,), generator=g)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=DT)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=BATCH)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_rel(a: Tensor, b: Tensor, rtol: float = RTOL, what: str = "") -> None:
    err = rel_err(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:g}"


def fit_both(model: nn.Module, likelihood: str, subset: str, structure: str, loader,
             prior: float | Tensor = 0.7, sigma: float = 1.0, lt_prior=None, **lt_kwargs):
    """(ours, laplace-torch's) posteriors fitted on the same loader."""
    ours = Laplace(model, likelihood, subset=subset, structure=structure,
                   prior_precision=prior, sigma_noise=sigma).fit(loader, progress=False)
    ref = lt.Laplace(model, likelihood, subset_of_weights=subset,
                     hessian_structure=STRUCT[structure],
                     prior_precision=prior if lt_prior is None else lt_prior,
                     sigma_noise=sigma, **lt_kwargs)
    ref.fit(loader)
    return ours, ref


def lt_variance(ref) -> Tensor:
    """laplace-torch's marginal posterior variances, whatever the structure."""
    if isinstance(ref, lt.FullLaplace):
        return ref.posterior_covariance.diagonal()
    if isinstance(ref, lt.DiagLaplace):
        return ref.posterior_variance
    return ref.posterior_precision.diag(exponent=-1)


def check_posterior(ours: Laplace, ref, x: Tensor, joint: bool = True) -> None:
    """Evidence, variances, GLM predictive mean and covariance (and the joint one)."""
    assert_rel(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), what="log ML")
    assert_rel(ours.posterior_variance, lt_variance(ref), what="posterior variance")
    mean, cov = ours.functional(x)
    f_mu, f_var = ref._glm_predictive_distribution(x)
    assert_rel(mean, f_mu, what="GLM mean")
    assert_rel(cov, f_var, what="GLM covariance")
    if joint:
        _, cov_j = ours.functional(x, joint=True)
        _, f_cov = ref._glm_predictive_distribution(x, joint=True)
        assert_rel(cov_j, f_cov, what="joint GLM covariance")


# ----------------------------------------------------------------------------------------
# identical definitions: full and diagonal GGN, K-FAC without biases
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood,d_out,sigma", [("classification", 3, 1.0),
                                                    ("regression", 2, 0.6)])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_full_and_diag_posteriors_match(likelihood, d_out, sigma, subset, structure):
    model = mlp(d_out)
    x, _, loader = dataset(likelihood, d_out)
    ours, ref = fit_both(model, likelihood, subset, structure, loader, 0.7, sigma)
    check_posterior(ours, ref, x[:5])
    if structure == "full":
        cov = torch.linalg.inv(ours.posterior_precision.to_dense())
        assert_rel(cov, ref.posterior_covariance, what="posterior covariance")


@pytest.mark.parametrize("likelihood,d_out,sigma", [("classification", 3, 1.0),
                                                    ("regression", 2, 0.6)])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_full_with_backpack_backend_agrees_to_rounding(likelihood, d_out, sigma, subset):
    """laplace-torch's default (curvlinops) forms the dense GGN against a float32 identity,
    good to ~1e-8; with its BackPACK backend the full posterior agrees to rounding."""
    from laplace.curvature import BackPackGGN

    model = mlp(d_out)
    x, _, loader = dataset(likelihood, d_out)
    ours, ref = fit_both(model, likelihood, subset, "full", loader, 0.7, sigma,
                         backend=BackPackGGN)
    assert_rel(ours.curvature.to_dense(), ref.H, 1e-12, "GGN")
    assert_rel(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), 1e-12, "log ML")
    assert_rel(ours.posterior_variance, lt_variance(ref), 1e-10, "posterior variance")
    mean, cov = ours.functional(x[:5])
    f_mu, f_var = ref._glm_predictive_distribution(x[:5])
    assert_rel(mean, f_mu, 1e-12, "GLM mean")
    assert_rel(cov, f_var, 1e-10, "GLM covariance")


@pytest.mark.parametrize("likelihood,d_out,sigma", [("classification", 3, 1.0),
                                                    ("regression", 2, 0.6)])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kfac_without_bias_matches(likelihood, d_out, sigma, subset):
    """Without biases both K-FACs are ``G ⊗ A`` with ``G`` summed over the data and ``A``
    averaged, kept as eigendecompositions with the prior added to the eigenvalues."""
    model = mlp(d_out, bias=False)
    x, _, loader = dataset(likelihood, d_out)
    ours, ref = fit_both(model, likelihood, subset, "kfac", loader, 0.7, sigma)
    check_posterior(ours, ref, x[:5])


def _flat_indices(model: nn.Module, names: list[str]) -> Tensor:
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([offsets[n] for n in names]).long()


def test_subnetwork_matches():
    """A subnetwork by parameter names (ours) = laplace-torch's flat indices of them."""
    model = mlp()
    x, _, loader = dataset("classification", 3)
    names = ["0.weight", "2.bias"]
    idx = _flat_indices(model, names)
    for structure in ("full", "diag"):
        ours = Laplace(model, "classification", subset=names, structure=structure,
                       prior_precision=0.7).fit(loader, progress=False)
        ref = lt.Laplace(model, "classification", subset_of_weights="subnetwork",
                         hessian_structure=structure, subnetwork_indices=idx,
                         prior_precision=0.7)
        ref.fit(loader)
        check_posterior(ours, ref, x[:5], joint=False)


def test_regression_subnetwork_without_output_layer_matches():
    """The Gaussian normaliser counts the network's outputs, not those of the last selected
    module (here the hidden layer)."""
    model = mlp(2)
    _, _, loader = dataset("regression", 2)
    ours = Laplace(model, "regression", subset=["0.weight"], structure="full",
                   prior_precision=0.7, sigma_noise=0.6).fit(loader, progress=False)
    idx = _flat_indices(model, ["0.weight"])
    ref = lt.Laplace(model, "regression", subset_of_weights="subnetwork",
                     hessian_structure="full", subnetwork_indices=idx,
                     prior_precision=0.7, sigma_noise=0.6)
    ref.fit(loader)
    assert_rel(ours.posterior_variance, lt_variance(ref), what="posterior variance")
    assert_rel(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), what="log ML")


# ----------------------------------------------------------------------------------------
# the log marginal likelihood as a function of the hyperparameters
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_log_ml_and_gradients_in_prior_and_noise(structure):
    """Regression evidence and its gradient in (per-parameter-tensor prior, noise), at
    hyperparameters other than those fitted with (no refit)."""
    model = mlp(2)
    _, _, loader = dataset("regression", 2)
    ours, ref = fit_both(model, "regression", "all", structure, loader, 1.0, 1.0)
    # per-module prior (ours) = per-tensor prior with weight and bias equal (laplace-torch)
    prior = torch.tensor([0.3, 2.5], dtype=DT)
    for sigma in (0.4, 1.7):
        p1 = prior.clone().requires_grad_(True)
        s1 = torch.tensor(sigma, dtype=DT, requires_grad=True)
        a = ours.log_marginal_likelihood(p1, s1)
        a.backward()
        p2 = prior.clone().requires_grad_(True)
        s2 = torch.tensor(sigma, dtype=DT, requires_grad=True)
        b = ref.log_marginal_likelihood(p2.repeat_interleave(2), s2)
        b.backward()
        assert_rel(a, b, what="log ML")
        assert_rel(p1.grad, p2.grad, what="d log ML / d prior")
        assert_rel(s1.grad, s2.grad, what="d log ML / d sigma")


def test_layer_prior_is_per_module_not_per_tensor():
    """Our per-layer prior has one value per module (weight and bias together): it equals
    laplace-torch's per-tensor prior with the module's value repeated for weight and bias;
    laplace-torch's 4-vector (one per tensor) has no counterpart of length 4 in ours."""
    model = mlp()
    x, _, loader = dataset("classification", 3)
    prior = torch.tensor([0.3, 2.5], dtype=DT)
    ours, ref = fit_both(model, "classification", "all", "full", loader, prior,
                         lt_prior=prior.repeat_interleave(2))
    check_posterior(ours, ref, x[:5], joint=False)
    assert ours.num_layers == 2 and ref.n_layers == 4


def test_kfac_layer_prior_without_bias_matches():
    model = mlp(bias=False)
    x, _, loader = dataset("classification", 3)
    prior = torch.tensor([0.3, 2.5], dtype=DT)
    ours, ref = fit_both(model, "classification", "all", "kfac", loader, prior)
    check_posterior(ours, ref, x[:5], joint=False)


@pytest.mark.parametrize("structure,granularity,bias", [
    ("full", "scalar", True), ("diag", "layer", False), ("kfac", "layer", False),
    ("diag", "parameter", True),
])
def test_optimize_prior_precision_matches(structure, granularity, bias):
    """Same objective: laplace-torch's evidence at our tuned prior equals ours, our optimum
    is at least as good as laplace-torch's after 400 Adam steps from the same start, our
    tuner reports convergence, and where laplace-torch has converged (scalar, per layer) the
    priors agree. (Per-layer on bias-free nets, where a module is one tensor; with biases
    laplace-torch's per-tensor prior is a different family. Per parameter, Adam has not
    converged in the flattest directions after 400 steps, so only the evidence is compared.)"""
    model = mlp(bias=bias)
    _, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", "all", structure, loader, 1.0)
    n_steps = 400
    got = ours.optimize_prior_precision(granularity=granularity, n_steps=n_steps)
    assert ours.tuning.converged and ours.tuning.grad_norm <= 1e-4
    ref.optimize_prior_precision(method="marglik", n_steps=n_steps, lr=0.1,
                                 init_prior_prec=1.0,
                                 prior_structure={"scalar": "scalar", "layer": "layerwise",
                                                  "parameter": "diag"}[granularity])
    assert_rel(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(got).detach(),
               1e-8, "log ML at our optimum")
    assert ours.log_marginal_likelihood() >= ref.log_marginal_likelihood().detach() - 1e-6
    if granularity != "parameter":
        assert_rel(got.reshape(-1), ref.prior_precision.reshape(-1), 1e-4, "tuned prior")


def test_per_tensor_prior_nests_the_per_module_prior():
    """With biases, laplace-torch's layerwise (per-tensor) optimum has at least the evidence
    of ours (per module), and ours equals laplace-torch's evidence at the tied prior."""
    model = mlp()
    _, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", "all", "diag", loader, 1.0)
    got = ours.optimize_prior_precision(granularity="layer", n_steps=400)
    tied = ref.log_marginal_likelihood(got.repeat_interleave(2)).detach()
    assert_rel(ours.log_marginal_likelihood(), tied, what="log ML at the tied prior")
    ref.optimize_prior_precision(method="marglik", n_steps=400, lr=0.1,
                                 prior_structure="layerwise")
    assert ref.log_marginal_likelihood() >= tied - 1e-8


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_tensor_granularity_is_laplace_torch_layerwise(structure):
    """Our ``granularity="tensor"`` is laplace-torch's ``prior_structure="layerwise"``: same
    evidence at the same per-tensor prior, and the same optimum."""
    model = mlp()
    _, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", "all", structure, loader, 1.0)
    prior = torch.linspace(0.2, 3.0, ours.num_tensors, dtype=torch.float64)
    assert_rel(ours.log_marginal_likelihood(prior), ref.log_marginal_likelihood(prior).detach(),
               what="log ML at a per-tensor prior")
    got = ours.optimize_prior_precision(granularity="tensor", n_steps=400)
    ref.optimize_prior_precision(method="marglik", n_steps=400, lr=0.1,
                                 prior_structure="layerwise")
    assert_rel(ours.log_marginal_likelihood(),
               ref.log_marginal_likelihood(got).detach(), what="log ML at our optimum")
    assert ours.log_marginal_likelihood() >= ref.log_marginal_likelihood().detach() - 1e-6


def test_tuned_prior_and_noise_are_stationary_for_laplace_torch():
    """Our joint (prior, noise) optimum is a stationary point of laplace-torch's evidence."""
    model = mlp(2)
    _, _, loader = dataset("regression", 2)
    ours, ref = fit_both(model, "regression", "all", "full", loader, 1.0, 1.0)
    ours.optimize_prior_precision(n_steps=500, tune_sigma_noise=True)
    log_p = ours.prior_precision.log().reshape(1).clone().requires_grad_(True)
    log_s = ours.sigma_noise.log().clone().requires_grad_(True)
    lml = ref.log_marginal_likelihood(log_p.exp(), log_s.exp())
    lml.backward()
    assert_rel(ours.log_marginal_likelihood(), lml.detach(), what="log ML at the optimum")
    grad = torch.cat([log_p.grad.reshape(-1), log_s.grad.reshape(-1)])
    assert grad.abs().max() < 1e-3, f"gradient of laplace-torch's log ML {grad}"


# ----------------------------------------------------------------------------------------
# definitional differences, pinned down
# ----------------------------------------------------------------------------------------
def _drop_weight_bias_cross_terms(ours: Laplace, mat: Tensor) -> Tensor:
    """Zero the weight-bias blocks of every module in a ``(P, P)`` matrix (flat order)."""
    out = mat.clone()
    sl = {name: ours.params.slice_of(i) for i, name in enumerate(ours.params.names)}
    for name in ours.params.names:
        if name.endswith(".weight") and name[:-6] + "bias" in sl:
            w, b = sl[name], sl[name[:-6] + "bias"]
            out[w, b] = 0
            out[b, w] = 0
    return out


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kfac_with_bias_differs_only_by_weight_bias_cross_terms(subset):
    """Ours: one Kronecker block per module, ``G ⊗ Ã`` with ``Ã`` the second moment of
    ``[a; 1]`` (K-FAC in homogeneous coordinates, Martens & Grosse 2015). laplace-torch
    (curvlinops ``separate_weight_and_bias=True``): ``G ⊗ A`` for the weight and ``G`` for
    the bias, no weight-bias cross terms. Dropping exactly those from ours reproduces
    laplace-torch's log determinant, evidence and variances; the data term and the prior
    terms are identical."""
    model = mlp()
    x, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", subset, "kfac", loader, 0.7)
    assert_rel(-ours.loss, ref.log_likelihood, what="log likelihood")
    h_sep = _drop_weight_bias_cross_terms(ours, ours.curvature.to_dense())
    lam = h_sep + 0.7 * torch.eye(ours.num_params, dtype=DT)
    assert_rel(torch.logdet(lam), ref.log_det_posterior_precision, what="separated logdet")
    assert_rel(torch.linalg.inv(lam).diagonal(), lt_variance(ref), what="separated variance")
    assert_rel(h_sep, ref.H.to_matrix(), what="separated K-FAC")
    gap = ours.log_marginal_likelihood() - ref.log_marginal_likelihood()
    want = 0.5 * (torch.logdet(lam) - ours.posterior_precision.logdet())
    assert_rel(gap, want, what="evidence gap = half the logdet difference")
    assert abs(float(gap)) > 1e-3  # a real difference, not rounding


def test_kfac_with_bias_is_exact_for_one_datum_only_with_cross_terms(dense_reference):
    """For one data point K-FAC in homogeneous coordinates is the exact GGN block of every
    layer; dropping the weight-bias cross terms (laplace-torch) is not."""
    model = mlp()
    x, y, _ = dataset("classification", 3, n=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    ours, ref = fit_both(model, "classification", "all", "kfac", loader)
    ggn = dense_reference(model, "classification", loader)
    same_layer = ours.layer_index[:, None] == ours.layer_index[None, :]
    ggn = torch.where(same_layer, ggn, 0.0)  # K-FAC is block diagonal over layers
    assert_rel(ours.curvature.to_dense(), ggn, 1e-10, "our K-FAC, N=1")
    assert rel_err(ref.H.to_matrix(), ggn) > 1e-2
    assert_rel(ref.H.to_matrix(), _drop_weight_bias_cross_terms(ours, ggn), 1e-10,
               "laplace-torch's K-FAC, N=1")


def test_probit_differs_only_by_the_softmax_invariant_projection():
    """laplace-torch's probit = ours applied to the unprojected marginal variances; ours
    projects the covariance onto the logit differences first."""
    model = mlp()
    x, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", "all", "full", loader, 0.7)
    mean, cov = ours.functional(x[:5])
    theirs = ref(x[:5], pred_type="glm", link_approx="probit")
    assert_rel(probit_softmax(mean, cov.diagonal(dim1=-2, dim2=-1)), theirs, what="probit")
    mine = ours.predict(x[:5], link="probit")
    assert_rel(mine, probit_softmax(mean, cov), 1e-12, "projected probit")
    assert rel_err(mine, theirs) > 1e-6


def test_laplace_bridge_matches():
    model = mlp()
    x, _, loader = dataset("classification", 3)
    ours, ref = fit_both(model, "classification", "all", "full", loader, 0.7)
    assert_rel(ours.predict(x[:5], link="bridge"),
               ref(x[:5], pred_type="glm", link_approx="bridge"), what="bridge")


def test_regression_predictive_adds_the_noise():
    """Ours returns the predictive of ``y`` (latent variance + σ²); laplace-torch's ``la(x)``
    returns the latent ``f`` variance and leaves σ² to the user."""
    model = mlp(1)
    x, _, loader = dataset("regression", 1)
    ours, ref = fit_both(model, "regression", "all", "full", loader, 0.7, 0.6)
    mean, var = ours.predict(x[:5])
    f_mu, f_var = ref(x[:5], pred_type="glm")
    assert_rel(mean, f_mu, what="predictive mean")
    assert_rel(var, f_var.diagonal(dim1=-2, dim2=-1) + 0.6**2, what="predictive variance")


def test_laplace_torch_glm_samples_are_perfectly_correlated_across_inputs():
    """laplace-torch draws one normal vector per sample for the whole batch; ours samples
    ``N(f, J Σ Jᵀ)`` jointly across inputs."""
    model = mlp(1)
    x, _, loader = dataset("regression", 1)
    ours, ref = fit_both(model, "regression", "all", "full", loader, 0.7, 0.6)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref.functional_samples(x[:2], n_samples=2000, generator=g)[..., 0]
    mine = ours.functional_samples(x[:2], 2000, generator=g)[..., 0]
    _, joint = ours.functional(x[:2], joint=True)
    true_corr = joint[0, 1] / (joint[0, 0] * joint[1, 1]).sqrt()
    corr_theirs = torch.corrcoef(theirs.T)[0, 1]
    corr_mine = torch.corrcoef(mine.T)[0, 1]
    assert corr_theirs > 0.9999
    assert abs(corr_mine - true_corr) < 0.1 and true_corr < 0.99


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_empirical_fisher(structure):
    """``kind="ef"`` = laplace-torch's ``CurvlinopsEF`` backend for classification. For
    regression laplace-torch's EF is twice the EF of the Gaussian NLL: it takes the per-sample
    gradients of ``MSELoss(reduction="sum")`` (``2 r J``) and multiplies their outer product
    by the likelihood factor 1/2 (``2 r² JᵀJ`` instead of ``r² JᵀJ``)."""
    from laplace.curvature import CurvlinopsEF

    for likelihood, d_out, factor in (("classification", 3, 1.0), ("regression", 2, 2.0)):
        model = mlp(d_out)
        _, _, loader = dataset(likelihood, d_out)
        ours = Laplace(model, likelihood, structure=structure, kind="ef",
                       prior_precision=0.7).fit(loader, progress=False)
        ref = lt.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                         backend=CurvlinopsEF, prior_precision=0.7)
        ref.fit(loader)
        theirs = ref.H if structure == "full" else torch.diag(ref.H)
        assert_rel(factor * ours.curvature.to_dense(), theirs, what=f"{likelihood} EF")
        if factor == 1.0:
            assert_rel(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                       what="EF log ML")
