"""Serialization, joint functional samples, grid search and online marglik training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, errors, metrics
from bayescurv.laplace.online import marglik_training

DT = torch.float64


def setup(task="classification", d_out=3, n=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, d_out)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    if task == "classification":
        y = torch.randint(0, d_out, (n,), generator=g)
    else:
        y = torch.sin(x[:, :d_out]) + 0.1 * torch.randn(n, d_out, generator=g, dtype=DT)
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "kfac-reduce", "ekfac"])
def test_state_dict_round_trip_with_weights_only(structure, tmp_path):
    model, x, _, dl = setup("regression", d_out=2)
    la = Laplace(model, "regression", structure=structure, prior_precision=torch.tensor(
        [0.5, 2.0], dtype=DT), sigma_noise=0.3).fit(dl, progress=False)
    path = tmp_path / "la.pt"
    torch.save(la.state_dict(), path)
    state = torch.load(path, weights_only=True)
    la2 = Laplace(model, "regression", structure=structure).load_state_dict(state)
    torch.testing.assert_close(la2.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(la2.predict(x[:5]), la.predict(x[:5]))
    torch.testing.assert_close(la2.posterior_precision.to_dense(),
                               la.posterior_precision.to_dense())


def test_state_dict_rejects_other_posteriors():
    model, _, _, dl = setup()
    state = Laplace(model, "classification", structure="kfac").fit(dl, progress=False) \
        .state_dict()
    with pytest.raises(errors.InvalidArgumentError, match="structure"):
        Laplace(model, "classification", structure="diag").load_state_dict(state)
    with pytest.raises(errors.InvalidArgumentError, match="other parameters"):
        Laplace(model, "classification", subset="last_layer",
                structure="kfac").load_state_dict(state)


def _fitted(structure="kfac"):
    model, x, y, dl = setup()
    return Laplace(model, "classification", structure=structure).fit(dl, progress=False), x


def test_predict_refuses_weights_changed_after_fit_and_restore_map_reties_them():
    la, x = _fitted()
    before = la.predict(x[:4])
    with torch.no_grad():
        la.model[0].weight.add_(0.1)
    for call in (lambda: la.predict(x[:4]), lambda: la.functional(x[:4]),
                 lambda: la.functional_samples(x[:4], num_samples=3),
                 lambda: la.predict(x[:4], pred_type="nn", num_samples=2)):
        with pytest.raises(errors.InvalidArgumentError, match="not the ones this posterior"):
            call()
    la.restore_map()
    torch.testing.assert_close(la.predict(x[:4]), before, rtol=0, atol=0)


def test_loaded_state_of_another_model_is_refused_until_restore_map():
    la, x = _fitted()
    other, _, _, _ = setup(seed=5)  # same architecture, other weights
    la2 = Laplace(other, "classification", structure="kfac").load_state_dict(la.state_dict())
    with pytest.raises(errors.InvalidArgumentError, match="restore_map"):
        la2.predict(x[:4])
    la2.restore_map()
    torch.testing.assert_close(la2.predict(x[:4]), la.predict(x[:4]))


def test_pred_type_nn_leaves_the_weights_exactly_as_found():
    la, x = _fitted()
    found = [p.detach().clone() for p in la.model.parameters()]
    la.predict(x[:4], pred_type="nn", num_samples=3, generator=torch.Generator().manual_seed(0))
    for p, q in zip(la.model.parameters(), found):
        assert torch.equal(p, q)


def _state_with(mutate):
    la, _ = _fitted()
    state = la.state_dict()
    mutate(state)
    return state


@pytest.mark.parametrize("mutate, error, phrase", [
    (lambda s: s.pop("curvature"), errors.InvalidArgumentError, "lacks the keys"),
    (lambda s: s.update(mean=s["mean"][:-1]), errors.ShapeError, "parameters"),
    (lambda s: s["mean"].__setitem__(0, float("nan")), errors.NonFiniteError, "NaN"),
    (lambda s: s["curvature"]["blocks"][0]["eigenvalues"].fill_(float("nan")),
     errors.NonFiniteError, "NaN"),
    (lambda s: s.update(version=99), errors.InvalidArgumentError, "version"),
    (lambda s: s.update(kind="ef"), errors.InvalidArgumentError, "kind"),
    (lambda s: s["curvature"].pop("blocks"), errors.InvalidArgumentError, "malformed"),
])
def test_load_state_dict_validates_before_assigning(mutate, error, phrase):
    state = _state_with(mutate)
    model, _, _, _ = setup()
    la = Laplace(model, "classification", structure="kfac")
    with pytest.raises(error, match=phrase):
        la.load_state_dict(state)
    with pytest.raises(errors.NotFittedError):  # nothing was assigned
        la.predict(torch.zeros(2, 4, dtype=DT))


def test_load_state_dict_refuses_a_wider_net_with_the_same_names():
    la, _ = _fitted()
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).to(DT)
    with pytest.raises(errors.ShapeError, match="other shapes"):
        Laplace(wide, "classification", structure="kfac").load_state_dict(la.state_dict())


def test_unbatched_input_gets_a_clear_error():
    la, x = _fitted()
    with pytest.raises(errors.ShapeError, match="unsqueeze"):
        la.predict(x[0])
    assert la.predict(x[0].unsqueeze(0)).shape == (1, 3)


def test_functional_samples_are_jointly_correlated():
    """Samples at two inputs have the posterior's cross-covariance: neither independent nor
    perfectly correlated (laplace-torch reuses one normal draw across the batch)."""
    model, x, _, dl = setup("regression", d_out=1)
    la = Laplace(model, "regression", structure="kfac", prior_precision=1.0).fit(
        dl, progress=False)
    xt = torch.stack([x[0], x[0] + 0.5, -x[3]])
    _, joint = la.functional(xt, joint=True)
    s = la.functional_samples(xt, 40000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (40000, 3, 1)
    emp = torch.cov(s.reshape(40000, 3).T)
    torch.testing.assert_close(emp, joint, atol=0.04 * joint.abs().max(), rtol=0)
    corr = joint[0, 1] / (joint[0, 0] * joint[1, 1]).sqrt()
    emp_corr = emp[0, 1] / (emp[0, 0] * emp[1, 1]).sqrt()
    assert abs(float(corr)) < 0.999
    assert abs(float(emp_corr - corr)) < 0.02


def test_gridsearch_picks_the_best_grid_point():
    model, x, y, dl = setup(n=40)
    la = Laplace(model, "classification", structure="kfac").fit(dl, progress=False)
    grid = torch.logspace(-2, 2, 9, dtype=DT)
    best = la.optimize_prior_precision(method="gridsearch", val_loader=dl, grid=grid)
    values = []
    for p in grid:
        la.prior_precision = p
        values.append(metrics.nll(la.predict(x), y))
    assert float(best) == pytest.approx(float(grid[int(torch.tensor(values).argmin())]))


def test_gridsearch_regression_uses_a_prior_dependent_metric():
    model, x, y, dl = setup("regression", d_out=1)
    la = Laplace(model, "regression", structure="full", sigma_noise=0.1).fit(dl, progress=False)
    la.optimize_prior_precision(method="gridsearch", val_loader=dl)
    chosen = float(la.prior_precision)
    la.prior_precision = 1e-4
    nll_small = metrics.gaussian_nll(*la.predict(x), y)
    la.prior_precision = chosen
    assert metrics.gaussian_nll(*la.predict(x), y) <= nll_small
    with pytest.raises(errors.InvalidArgumentError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(errors.InvalidArgumentError, match="metric"):
        la.optimize_prior_precision(method="gridsearch", val_loader=dl, metric="rmse")


def test_online_marglik_training_learns_prior_and_keeps_best():
    model, x, y, dl = setup("regression", d_out=1, n=60)
    res = marglik_training(model, dl, "regression", structure="kfac", n_epochs=30,
                           n_epochs_burnin=5, marglik_frequency=5, n_hypersteps=20, lr=1e-2)
    assert len(res.history) == 5
    assert res.log_marglik == pytest.approx(max(v for _, v in res.history))
    la = res.laplace
    # the returned posterior is fitted at the best model and reproduces the best evidence
    assert la.log_marginal_likelihood().item() == pytest.approx(res.log_marglik, rel=1e-6)
    assert float(la.sigma_noise) < 0.9  # learned from sigma 1.0 towards the noise 0.1
    assert res.losses[-1] < res.losses[0]


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_masked_subnetwork_equals_dense_restriction(structure):
    model, x, y, dl = setup(n=25)
    g = torch.Generator().manual_seed(5)
    masks = {"0.weight": torch.rand(6, 4, generator=g) < 0.3,
             "2.bias": torch.tensor([True, False, True])}
    la = Laplace(model, "classification", subset=masks, structure=structure,
                 prior_precision=0.8).fit(dl, progress=False)
    from bayescurv.params import select

    ps = select(model, "all")
    flat = torch.cat([masks.get(n, torch.zeros_like(p, dtype=torch.bool)).reshape(-1)
                      for n, p in zip(ps.names, ps.params)])
    idx = flat.nonzero().squeeze(-1)
    assert la.num_params == idx.numel()
    jac = torch.func.jacrev(lambda v: ps.functional_call(v, x))(ps.vector())[..., idx]
    p = torch.softmax(model(x), -1).detach()
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, h, jac)
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    lam = ggn + 0.8 * torch.eye(idx.numel(), dtype=DT)
    torch.testing.assert_close(la.posterior_precision.to_dense(), lam)
    theta = ps.vector()[idx]
    loglik = -torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    ref = loglik - 0.4 * (theta**2).sum() + 0.5 * idx.numel() * torch.log(
        torch.tensor(0.8, dtype=DT)) - 0.5 * torch.logdet(lam)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref)
    xt = x[:4]
    jt = torch.func.jacrev(lambda v: ps.functional_call(v, xt))(ps.vector())[..., idx]
    cov_ref = torch.einsum("ncp,pq,ndq->ncd", jt, torch.linalg.inv(lam), jt)
    torch.testing.assert_close(la.functional(xt)[1], cov_ref)
    s = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, idx.numel())
    la.predict(xt, pred_type="nn", num_samples=3)
    torch.testing.assert_close(ps.vector()[idx], theta)  # weights restored


def test_masked_subnetwork_bad_input():
    model, _, _, _ = setup()
    with pytest.raises(errors.InvalidArgumentError, match="structure"):
        Laplace(model, "classification", subset={"0.bias": torch.ones(6, dtype=torch.bool)},
                structure="kfac")
    with pytest.raises(errors.ShapeError, match="shape"):
        Laplace(model, "classification", subset={"0.bias": torch.ones(5, dtype=torch.bool)},
                structure="full")
    with pytest.raises(errors.InvalidArgumentError, match="no parameter entry"):
        Laplace(model, "classification", subset={"0.bias": torch.zeros(6, dtype=torch.bool)},
                structure="full")


class Branchy(nn.Module):
    """A module the forward pass skips for some inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.use_b = True

    def forward(self, x):
        out = self.a(x)
        return out + self.b(x) if self.use_b else out


@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_predict_with_a_module_skipped_and_with_frozen_weights(structure):
    model = Branchy().to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=g)
    la = Laplace(model, "classification", structure=structure).fit(
        DataLoader(TensorDataset(x, y), batch_size=10), progress=False)
    model.use_b = False  # prediction path without model.b: its Jacobian is zero
    from bayescurv.params import select

    ps = select(model, "all")
    jac = torch.func.jacrev(lambda v: ps.functional_call(v, x[:3]))(ps.vector())
    ref = torch.einsum("ncp,pq,ndq->ncd", jac, torch.linalg.inv(
        la.posterior_precision.to_dense()), jac)
    torch.testing.assert_close(la.functional(x[:3])[1], ref)
    for p in model.parameters():  # frozen after fitting: prediction still works
        p.requires_grad_(False)
    torch.testing.assert_close(la.functional(x[:3])[1], ref)
    assert not any(p.requires_grad for p in model.parameters())


def test_predict_and_functional_accept_a_loader():
    la, x = _fitted()
    y = torch.zeros(len(x), dtype=torch.long)
    loaders = [DataLoader(TensorDataset(x, y), batch_size=7), DataLoader(TensorDataset(x),
               batch_size=7), [x[:10], x[10:]], [{"x": x[:10]}, {"x": x[10:]}]]
    for loader in loaders:
        torch.testing.assert_close(la.predict(loader), la.predict(x))
        for a, b in zip(la.functional(loader, progress=False), la.functional(x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(errors.InvalidArgumentError, match="joint=True"):
        la.functional(loaders[0], joint=True)
    with pytest.raises(errors.EmptyDataError):
        la.predict([])


def test_renamed_sample_count_warns_and_still_works():
    la, x = _fitted()
    g = torch.Generator().manual_seed(0)
    with pytest.warns(FutureWarning, match="num_samples"):
        old = la.sample(n=4, generator=g)
    new = la.sample(num_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(old, new)
    with pytest.warns(FutureWarning, match="num_samples"):
        assert la.functional_samples(x[:2], n=3).shape == (3, 2, 3)


def test_underconfident_tuned_prior_is_warned_about():
    _, x, y, dl = setup(n=20)
    torch.manual_seed(0)  # over-parameterized: the curvature leaves many directions to the prior
    model = nn.Sequential(nn.Linear(4, 50), nn.Tanh(), nn.Linear(50, 3)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):  # a confident MAP
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    la = Laplace(model, "classification", structure="kfac").fit(dl)
    with pytest.warns(errors.UnderconfidenceWarning, match="last_layer"):
        la.optimize_prior_precision("gridsearch", val_loader=dl,
                                    grid=torch.tensor([1e-6], dtype=DT))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.UnderconfidenceWarning)
        la.optimize_prior_precision("gridsearch", val_loader=dl,
                                    grid=torch.tensor([1e4], dtype=DT))
