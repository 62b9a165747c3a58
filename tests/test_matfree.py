"""Matrix-free curvature products against dense float64 references from torch.func."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bayescurv.curvature.matfree import (
    CurvatureLinearOperator,
    jacobian,
    jacobian_vector_product,
    vector_jacobian_product,
)
from bayescurv.errors import EmptyDataError, InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Gaussian, get_likelihood
from bayescurv.params import select

DT = torch.float64
SIZES = (4, 3, 5)  # unequal batch sizes


# ------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------
class KwargNet(nn.Module):
    """Takes two keyword inputs (for dict batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(a) + self.b(b)))


def mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, out))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"mlp": mlp, "mlp1": lambda: mlp(1), "cnn": cnn, "kwarg": KwargNet}[name]()
    return model.to(DT).eval()


def make_inputs(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    shape = (n, 1, 5, 5) if name == "cnn" else (n, 3)
    return torch.randn(shape, generator=g, dtype=DT)


def make_targets(lik: str, n: int, C: int, g: torch.Generator) -> torch.Tensor:
    if lik == "regression":
        return torch.randn(n, C, generator=g, dtype=DT)
    if lik == "classification":
        return torch.randint(0, C, (n,), generator=g)
    if lik == "binary":
        return torch.randint(0, 2, (n,), generator=g).to(DT)
    if lik == "poisson":
        return torch.randint(0, 4, (n, C), generator=g).to(DT)
    raise ValueError(lik)


def make_data(model_name: str, lik: str, C: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(make_inputs(model_name, n, g), make_targets(lik, n, C, g)) for n in SIZES]


def likelihood_of(name: str):
    return Gaussian(0.5) if name == "regression" else get_likelihood(name)


# ------------------------------------------------------------------------------------------
# dense references (torch.func on the concatenated data)
# ------------------------------------------------------------------------------------------
def reference(model, ps, lik, X, Y, kind: str) -> torch.Tensor:
    theta = ps.vector()

    def f(t):
        out = ps.functional_call(t, **X) if isinstance(X, dict) else ps.functional_call(t, X)
        return out.reshape(out.shape[0], -1)

    if kind == "hessian":
        return torch.func.hessian(lambda t: lik.nll(f(t), Y))(theta)
    if kind == "ggn":
        F = f(theta)
        J = torch.func.jacrev(f)(theta).reshape(F.numel(), -1)
        H = torch.func.hessian(lambda out: lik.nll(out, Y))(F).reshape(F.numel(), F.numel())
        return J.T @ H @ J
    if kind == "ef":
        G = torch.func.jacrev(lambda t: -lik.log_prob(f(t), Y))(theta)  # (N, P)
        return G.T @ G
    raise ValueError(kind)


def concat(data):
    xs, ys = zip(*data)
    return torch.cat(xs), torch.cat(ys)


CASES = [
    ("mlp", "regression", 3),
    ("mlp", "classification", 3),
    ("mlp1", "binary", 1),
    ("cnn", "classification", 3),
    ("mlp", "poisson", 3),
]


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef"])
@pytest.mark.parametrize("model_name,lik_name,C", CASES, ids=[c[1] + "-" + c[0] for c in CASES])
def test_dense_and_products_match_reference(model_name, lik_name, C, kind):
    model = make_model(model_name)
    data = make_data(model_name, lik_name, C)
    lik = likelihood_of(lik_name)
    op = CurvatureLinearOperator(model, lik, data, kind=kind)
    ps = select(model)
    X, Y = concat(data)
    ref = reference(model, ps, lik, X, Y, kind)
    assert op.shape == (ps.numel, ps.numel) and op.dtype == DT
    assert ref.abs().max() > 1e-3  # a non-trivial matrix
    torch.testing.assert_close(op.to_dense(chunk_size=7), ref, rtol=1e-10, atol=1e-10)

    g = torch.Generator().manual_seed(3)
    V = torch.randn(ps.numel, 4, generator=g, dtype=DT)
    torch.testing.assert_close(op.matmat(V), ref @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.matvec(V[:, 0]), ref @ V[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op @ V[:, 1], ref @ V[:, 1], rtol=1e-10, atol=1e-10)


def test_kinds_differ_for_classification():
    """Guard against one kind silently computing another: the three differ off the MAP."""
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    dense = {
        k: CurvatureLinearOperator(model, "classification", data, kind=k).to_dense()
        for k in ("ggn", "hessian", "ef")
    }
    assert not torch.allclose(dense["ggn"], dense["hessian"], atol=1e-6)
    assert not torch.allclose(dense["ggn"], dense["ef"], atol=1e-6)


@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
def test_mean_reduction_divides_by_n(kind):
    model = make_model("mlp")
    data = make_data("mlp", "regression", 3)
    s = CurvatureLinearOperator(model, Gaussian(0.5), data, kind=kind).to_dense()
    m = CurvatureLinearOperator(model, Gaussian(0.5), data, kind=kind, reduction="mean")
    torch.testing.assert_close(m.to_dense(), s / sum(SIZES), rtol=1e-12, atol=1e-12)


def test_chunked_columns_match_unchunked():
    model = make_model("cnn")
    data = make_data("cnn", "classification", 3)
    V = torch.randn(select(model).numel, 9, dtype=DT)
    a = CurvatureLinearOperator(model, "classification", data).matmat(V)
    b = CurvatureLinearOperator(model, "classification", data, chunk_size=2).matmat(V)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_params_is_a_deprecated_alias_of_subset():
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    with pytest.warns(FutureWarning, match=r"CurvatureLinearOperator: params= is deprecated"):
        op = CurvatureLinearOperator(model, "classification", data, params="last_layer")
    assert op.params.names == select(model, "last_layer").names


def test_last_layer_subset():
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    op = CurvatureLinearOperator(model, "classification", data, subset="last_layer")
    ps = select(model, "last_layer")
    assert op.shape == (4 * 3 + 3,) * 2
    X, Y = concat(data)
    ref = reference(model, ps, get_likelihood("classification"), X, Y, "ggn")
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-10)
    # the subset block of the full GGN
    full = CurvatureLinearOperator(model, "classification", data).to_dense()
    torch.testing.assert_close(op.to_dense(), full[-15:, -15:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_x_key", [False, True])
def test_dict_batches(with_x_key):
    model = make_model("kwarg")
    g = torch.Generator().manual_seed(5)
    raw = [
        (
            torch.randn(n, 3, generator=g, dtype=DT),
            torch.randn(n, 2, generator=g, dtype=DT),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in SIZES
    ]
    if with_x_key:  # {"x": {"a", "b"}, "label": y} with a custom y_key
        data = [{"x": {"a": a, "b": b}, "label": y} for a, b, y in raw]
        kw = {"y_key": "label"}
    else:  # {"a", "b", "y"}: every non-target entry is a keyword input
        data = [{"a": a, "b": b, "y": y} for a, b, y in raw]
        kw = {}
    op = CurvatureLinearOperator(model, "classification", data, **kw)
    X = {"a": torch.cat([r[0] for r in raw]), "b": torch.cat([r[1] for r in raw])}
    Y = torch.cat([r[2] for r in raw])
    ps = select(model)
    ref = reference(model, ps, get_likelihood("classification"), X, Y, "ggn")
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Jacobian products
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_jacobian_products_match_jacrev(model_name):
    model = make_model(model_name)
    ps = select(model)
    g = torch.Generator().manual_seed(7)
    x = make_inputs(model_name, 5, g)
    J_ref = torch.func.jacrev(lambda t: ps.functional_call(t, x))(ps.vector())  # (B, C, P)
    torch.testing.assert_close(jacobian(model, ps, x), J_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacobian(model, "all", x, chunk_size=4), J_ref)

    v = torch.randn(ps.numel, generator=g, dtype=DT)
    V = torch.randn(ps.numel, 3, generator=g, dtype=DT)
    torch.testing.assert_close(jacobian_vector_product(model, ps, x, v), J_ref @ v)
    torch.testing.assert_close(
        jacobian_vector_product(model, ps, x, V), torch.einsum("bcp,pk->bck", J_ref, V)
    )
    u = torch.randn(5, 3, generator=g, dtype=DT)
    U = torch.randn(5, 3, 2, generator=g, dtype=DT)
    torch.testing.assert_close(
        vector_jacobian_product(model, ps, x, u), torch.einsum("bcp,bc->p", J_ref, u)
    )
    torch.testing.assert_close(
        vector_jacobian_product(model, ps, x, U), torch.einsum("bcp,bck->pk", J_ref, U)
    )


def test_jacobian_single_output_and_subset():
    model = make_model("mlp1")
    ps = select(model, "last_layer")
    x = torch.randn(4, 3, dtype=DT)
    J = jacobian(model, ps, x)
    assert J.shape == (4, 1, 5)
    with torch.no_grad():
        h = model[:-1](x)  # d(Wh + b)/d(W, b) = [h, 1]
    torch.testing.assert_close(J[:, 0], torch.cat([h, torch.ones(4, 1, dtype=DT)], 1))


def test_jacobian_product_shape_errors():
    model = make_model("mlp")
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(ShapeError):
        jacobian_vector_product(model, "all", x, torch.zeros(7, dtype=DT))
    with pytest.raises(ShapeError):
        vector_jacobian_product(model, "all", x, torch.zeros(3, 3, dtype=DT))
    with pytest.raises(InvalidArgumentError):
        jacobian(model, "all", x, chunk_size=0)


# ------------------------------------------------------------------------------------------
# operator plumbing, validation, side effects
# ------------------------------------------------------------------------------------------
def test_validation():
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    with pytest.raises(InvalidArgumentError, match="ggn"):
        CurvatureLinearOperator(model, "classification", data, kind="fisher")
    with pytest.raises(InvalidArgumentError, match="mean"):
        CurvatureLinearOperator(model, "classification", data, reduction="avg")
    with pytest.raises(InvalidArgumentError):
        CurvatureLinearOperator(model, "nope", data)
    with pytest.raises(InvalidArgumentError, match="one-shot"):
        CurvatureLinearOperator(model, "classification", iter(data))
    with pytest.raises(InvalidArgumentError, match="different model"):
        CurvatureLinearOperator(model, "classification", data, subset=select(make_model("mlp")))
    op = CurvatureLinearOperator(model, "classification", data)
    P = op.shape[0]
    with pytest.raises(ShapeError):
        op.matvec(torch.zeros(P + 1, dtype=DT))
    with pytest.raises(ShapeError):
        op.matvec(torch.zeros(P, 2, dtype=DT))
    with pytest.raises(ShapeError):
        op.matmat(torch.zeros(P, dtype=DT))
    with pytest.raises(ShapeError):
        op.matmat(torch.zeros(P - 1, 2, dtype=DT))
    with pytest.raises(EmptyDataError):
        CurvatureLinearOperator(model, "classification", []).matvec(torch.zeros(P, dtype=DT))
    bad = [(torch.randn(3, 3, dtype=DT), torch.tensor([0, 1, 5]))]
    with pytest.raises(ShapeError):  # class index out of range, caught by the likelihood
        CurvatureLinearOperator(model, "classification", bad).matvec(torch.zeros(P, dtype=DT))


def test_no_side_effects_on_model():
    model = make_model("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    data = make_data("mlp", "classification", 3)
    for kind in ("ggn", "hessian", "ef"):
        op = CurvatureLinearOperator(model, "classification", data, kind=kind)
        op.matvec(torch.ones(op.shape[0], dtype=DT))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_mode_kept_and_warned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    model.train()
    data = [(torch.randn(3, 3, dtype=DT), torch.randint(0, 2, (3,)))]
    with pytest.warns(UserWarning, match="model.eval"):
        op = CurvatureLinearOperator(model, "classification", data)
    op.matvec(torch.ones(op.shape[0], dtype=DT))
    assert model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CurvatureLinearOperator(model, "classification", data)


def test_float32_model_and_float64_vectors():
    model = make_model("mlp").float()
    data = [(x.float(), y) for x, y in make_data("mlp", "classification", 3)]
    op = CurvatureLinearOperator(model, "classification", data)
    assert op.dtype == torch.float32
    v = torch.randn(op.shape[0], dtype=DT)
    out = op.matvec(v)
    assert out.dtype == torch.float32
    model64 = make_model("mlp")
    ref = CurvatureLinearOperator(model64, "classification", make_data("mlp", "classification", 3))
    torch.testing.assert_close(out.double(), ref.matvec(v), rtol=1e-4, atol=1e-5)


def test_to_scipy():
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    op = CurvatureLinearOperator(model, "classification", data)
    A = op.to_dense().numpy()
    sp = op.to_scipy()
    assert sp.shape == op.shape and sp.dtype == np.float64
    rng = np.random.default_rng(0)
    v, V = rng.standard_normal(op.shape[0]), rng.standard_normal((op.shape[0], 3))
    np.testing.assert_allclose(sp @ v, A @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sp.matmat(V), A @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sp.rmatvec(v), A @ v, rtol=1e-10, atol=1e-12)


def test_progress_bar_runs():
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    op = CurvatureLinearOperator(model, "classification", data, progress=True)
    plain = CurvatureLinearOperator(model, "classification", data)
    v = torch.ones(op.shape[0], dtype=DT)
    torch.testing.assert_close(op.matvec(v), plain.matvec(v))


@pytest.mark.reference
def test_matches_curvlinops_ggn():
    curvlinops = pytest.importorskip("curvlinops")
    model = make_model("cnn")
    data = make_data("cnn", "classification", 3)
    ours = CurvatureLinearOperator(model, "classification", data).to_dense()
    params = [p for p in model.parameters() if p.requires_grad]
    theirs = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, data)
    dense = theirs @ torch.eye(ours.shape[0], dtype=DT)
    torch.testing.assert_close(ours, dense, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks, each streaming half of the data
# ------------------------------------------------------------------------------------------
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model("mlp")
        data = make_data("mlp", "classification", 3)
        mine = data[:2] if rank == 0 else data[2:]  # 7 and 5 data points
        v = torch.linspace(-1, 1, select(model).numel, dtype=DT)
        res = {}
        for kind in ("ggn", "ef"):
            for red in ("sum", "mean"):
                op = CurvatureLinearOperator(
                    model, "classification", mine, kind=kind, reduction=red
                )
                res[f"{kind}-{red}"] = op.matvec(v)
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks_match_single_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = make_model("mlp")
    data = make_data("mlp", "classification", 3)
    v = torch.linspace(-1, 1, select(model).numel, dtype=DT)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in ("ggn", "ef"):
            for red in ("sum", "mean"):
                op = CurvatureLinearOperator(
                    model, "classification", data, kind=kind, reduction=red
                )
                torch.testing.assert_close(
                    res[f"{kind}-{red}"], op.matvec(v), rtol=1e-12, atol=1e-12
                )
