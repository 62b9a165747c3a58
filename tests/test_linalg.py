"""Structured PSD operators against dense float64 ground truth from torch.linalg."""

from __future__ import annotations

import warnings

import pytest
import torch

from bayescurv.errors import InvalidArgumentError, NonFiniteError, NumericalError, ShapeError
from bayescurv.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    KroneckerEigen,
    LowRank,
    LowRankPlusDiagonal,
    PSDOperator,
    jittered_cholesky,
    kronecker,
)

TOL = {"rtol": 1e-8, "atol": 1e-9}


# ---------------------------------------------------------------------- fixtures
def _spd(n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    X = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return (X @ X.T / n + 0.2 * torch.eye(n, dtype=torch.float64)).to(dtype)


def _rand(*shape: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Draws in float64 so float32 cases see the same values (rounded)."""
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)


def _orth(n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q.to(dtype)


def _block_parts(g: torch.Generator, dtype: torch.dtype, with_kron: bool):
    blocks = [Dense(_spd(4, g, dtype)), Diagonal(_rand(3, g=g, dtype=dtype) + 0.5)]
    blocks.append(_lowrank(5, g, dtype)[0])
    if with_kron:
        blocks.append(kronecker(_spd(2, g, dtype), _spd(3, g, dtype)))
    return blocks


def _lowrank(n: int, g: torch.Generator, dtype: torch.dtype):
    U = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    s = _rand(3, g=g, dtype=dtype) + 0.5
    d = _rand(n, g=g, dtype=dtype) + 0.3
    return LowRankPlusDiagonal(U, s, d), (U * s) @ U.T + torch.diag(d)


def _block(blocks, perm: torch.Tensor | None):
    sizes = [b.size for b in blocks]
    n = sum(sizes)
    dense = torch.zeros(n, n, dtype=blocks[0].dtype)
    idx_all = perm if perm is not None else torch.arange(n)
    indices = list(torch.split(idx_all, sizes))
    for b, idx in zip(blocks, indices):
        dense[idx[:, None], idx[None, :]] = _truth(b)
    return BlockDiagonal(blocks, indices if perm is not None else None), dense


def _truth(op: PSDOperator) -> torch.Tensor:
    """Ground truth of a base block built independently of ``op.to_dense``."""
    if isinstance(op, Dense):
        return op.base
    if isinstance(op, Diagonal):
        return torch.diag(op.diagonal())
    if isinstance(op, KroneckerEigen):
        K = torch.kron(op.QA, op.QB)
        return K @ torch.diag(op.base_eigenvalues.reshape(-1)) @ K.T
    if isinstance(op, LowRankPlusDiagonal):
        return (op.U * op.s) @ op.U.T + torch.diag(op.d)
    raise TypeError(op)


KINDS = ["diagonal", "dense", "kron_factors", "kron_eigen", "lowrank", "block_perm", "block"]
VECTOR_KINDS = ["diagonal", "dense", "lowrank", "block_perm_nokron"]


def make(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """``(operator, dense float64 ground truth)``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "diagonal":
        d = _rand(7, g=g, dtype=dtype) + 0.5
        op, M = Diagonal(d), torch.diag(d)
    elif kind == "dense":
        M = _spd(8, g, dtype)
        op = Dense(M)
    elif kind == "kron_factors":
        A, B = _spd(3, g, dtype), _spd(4, g, dtype)
        op, M = Kronecker.from_factors(A, B), torch.kron(A, B)
    elif kind == "kron_eigen":
        QA, QB = _orth(3, g, dtype), _orth(4, g, dtype)
        lam = _rand(3, 4, g=g, dtype=dtype) + 0.1
        K = torch.kron(QA, QB)
        op, M = KroneckerEigen(QA, QB, lam), K @ torch.diag(lam.reshape(-1)) @ K.T
    elif kind == "lowrank":
        op, M = _lowrank(9, g, dtype)
    elif kind in ("block_perm", "block", "block_perm_nokron"):
        blocks = _block_parts(g, dtype, with_kron=kind != "block_perm_nokron")
        n = sum(b.size for b in blocks)
        perm = None if kind == "block" else torch.randperm(n, generator=g)
        op, M = _block(blocks, perm)
    else:
        raise ValueError(kind)
    return op, M.to(torch.float64)


def transformed(op, M, how: str):
    n = M.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    if how == "base":
        return op, M
    if how == "scaled_shifted":
        return op.scale(1.7).add_diagonal(0.3), 1.7 * M + 0.3 * eye
    if how == "chained":
        c = torch.tensor(0.5, dtype=op.dtype)
        out = (
            op.add_diagonal(0.2)
            .scale(c)
            .scale(3.0)
            .add_diagonal(torch.tensor(0.1, dtype=torch.float64))
        )
        return out, 1.5 * (M + 0.2 * eye) + 0.1 * eye
    if how == "vector_shift":
        dvec = torch.linspace(0.1, 0.9, n, dtype=torch.float64)
        out = op.scale(2.0).add_diagonal(dvec.to(op.dtype)).add_diagonal(0.05)
        return out, 2.0 * M + torch.diag(dvec) + 0.05 * eye
    raise ValueError(how)


CASES = [(k, h) for k in KINDS for h in ("base", "scaled_shifted", "chained")]
CASES += [(k, "vector_shift") for k in VECTOR_KINDS]


@pytest.fixture(params=CASES, ids=[f"{k}-{h}" for k, h in CASES])
def case(request):
    kind, how = request.param
    return transformed(*make(kind), how)


# ---------------------------------------------------------------------- core algebra
def test_to_dense_diagonal_and_metadata(case):
    op, M = case
    assert op.size == M.shape[0] and op.shape == M.shape
    assert op.dtype == torch.float64 and op.device == M.device
    torch.testing.assert_close(op.to_dense(), M, **TOL)
    torch.testing.assert_close(op.diagonal(), M.diagonal(), **TOL)
    torch.testing.assert_close(op.inv_diagonal(), torch.linalg.inv(M).diagonal(), **TOL)


@pytest.mark.parametrize("k", [None, 3])
def test_matvec_solve(case, k):
    op, M = case
    g = torch.Generator().manual_seed(1)
    shape = (op.size,) if k is None else (op.size, k)
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    out = op.matvec(v)
    assert out.shape == v.shape
    torch.testing.assert_close(out, M @ v, **TOL)
    torch.testing.assert_close(op @ v, M @ v, **TOL)
    x = op.solve(v)
    assert x.shape == v.shape
    torch.testing.assert_close(x, torch.linalg.solve(M, v), **TOL)


def test_logdet(case):
    op, M = case
    ld = op.logdet()
    assert ld.ndim == 0
    torch.testing.assert_close(ld, torch.linalg.slogdet(M)[1], **TOL)


def test_square_roots_exact(case):
    op, M = case
    eye = torch.eye(op.size, dtype=torch.float64)
    R = op.inv_sqrt_matvec(eye)
    torch.testing.assert_close(R @ R.T, torch.linalg.inv(M), **TOL)
    torch.testing.assert_close(op.inv_sqrt_matvec(eye[:, 2]), R[:, 2], **TOL)
    S = op.sqrt_matvec(eye)
    torch.testing.assert_close(S @ S.T, M, **TOL)


def test_to_linear_operator(case):
    op, M = case
    lo = op.to_linear_operator()
    assert tuple(lo.shape) == tuple(M.shape)
    torch.testing.assert_close(lo.to_dense(), M, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_inverse_covariance(kind):
    op, M = transformed(*make(kind), "scaled_shifted")
    g = torch.Generator().manual_seed(3)
    samples = op.sample_inverse(20000, generator=g)
    assert samples.shape == (20000, op.size)
    cov = samples.T @ samples / samples.shape[0]
    Sigma = torch.linalg.inv(M)
    rel = torch.linalg.norm(cov - Sigma) / torch.linalg.norm(Sigma)
    assert rel < 0.06, rel
    again = op.sample_inverse(20000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, samples, rtol=0, atol=0)
    other = op.sample_inverse(20000, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other, samples)


# ---------------------------------------------------------------------- gradients
GRAD_CASES = [(k, False) for k in KINDS] + [(k, True) for k in VECTOR_KINDS]


@pytest.mark.parametrize("kind,vector", GRAD_CASES)
def test_gradients_wrt_scale_and_shift(kind, vector):
    base, M = make(kind)
    n = base.size
    g = torch.Generator().manual_seed(5)
    v = torch.randn(n, 2, generator=g, dtype=torch.float64)
    w = torch.randn(n, 2, generator=g, dtype=torch.float64)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    d0 = torch.linspace(0.2, 0.7, n, dtype=torch.float64) if vector else torch.tensor(0.4)

    def objectives(get_op):
        return {
            "logdet": lambda op, D: (op.logdet(), torch.linalg.slogdet(D)[1]),
            "solve": lambda op, D: ((op.solve(v) * w).sum(), (torch.linalg.solve(D, v) * w).sum()),
            "matvec": lambda op, D: ((op.matvec(v) * w).sum(), (D @ v * w).sum()),
            "inv_diag": lambda op, D: (
                (op.inv_diagonal() * u).sum(),
                (torch.linalg.inv(D).diagonal() * u).sum(),
            ),
        }

    for name, f in objectives(None).items():
        c = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        delta = d0.clone().requires_grad_(True)
        op = base.scale(c).add_diagonal(delta)
        shift = torch.diag(delta) if vector else delta * torch.eye(n, dtype=torch.float64)
        ours, ref = f(op, c * M + shift)
        torch.testing.assert_close(ours, ref, **TOL)
        g_ours = torch.autograd.grad(ours, (c, delta))
        g_ref = torch.autograd.grad(ref, (c, delta))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind,vector", GRAD_CASES)
def test_repeated_backward_on_same_operator(kind, vector):
    """An operator built once can be differentiated many times (no stale graph is cached)."""
    base, _ = make(kind)
    c = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    d = torch.linspace(0.2, 0.6, base.size, dtype=torch.float64) if vector else torch.tensor(0.5)
    d.requires_grad_(True)
    op = base.scale(c).add_diagonal(d).scale(1.5)
    op.logdet().backward()
    g1 = (c.grad.clone(), d.grad.clone())
    op.logdet().backward()
    torch.testing.assert_close(c.grad, 2 * g1[0])
    torch.testing.assert_close(d.grad, 2 * g1[1])
    op.solve(torch.ones(op.size, dtype=torch.float64)).sum().backward()
    op.inv_diagonal().sum().backward()


def test_dense_cholesky_path_repeated_backward():
    base, M = make("dense")
    d = torch.linspace(0.1, 0.5, base.size, dtype=torch.float64, requires_grad=True)
    op = base.add_diagonal(d)
    op.logdet().backward()
    op.solve(torch.ones(base.size, dtype=torch.float64)).sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()
    with torch.no_grad():  # no-grad result must not leak into later differentiable calls
        op.logdet()
    c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    op2 = base.scale(c).add_diagonal(d.detach())
    with torch.no_grad():
        op2.logdet()
    (gc,) = torch.autograd.grad(op2.logdet(), c)
    D = M + torch.diag(d.detach())
    torch.testing.assert_close(gc, torch.trace(torch.linalg.solve(D, M)), **TOL)


def test_lowrank_zero_weights_have_finite_scale_gradient():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 3, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    c = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    op = LowRank(U, s).scale(c).add_diagonal(0.3)
    (gc,) = torch.autograd.grad(op.logdet(), c)
    M = (U * s) @ U.T
    torch.testing.assert_close(
        gc,
        torch.trace(torch.linalg.solve(1.5 * M + 0.3 * torch.eye(6, dtype=torch.float64), M)),
        **TOL,
    )


# ---------------------------------------------------------------------- caching / cost
def test_dense_eigh_computed_once(monkeypatch):
    M = _spd(6, torch.Generator().manual_seed(0), torch.float64)
    calls = []
    eigh = torch.linalg.eigh

    def counting(x, *args, **kwargs):
        calls.append(1)
        return eigh(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    base = Dense(M)
    for delta in (0.1, 0.5, 1.0):
        c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        op = base.scale(c).add_diagonal(torch.tensor(delta, dtype=torch.float64))
        op.logdet().backward()
        op.solve(torch.ones(6, dtype=torch.float64))
        op.inv_diagonal()
    assert len(calls) == 1


def test_kronecker_shares_factors_and_exposes_eigenbasis():
    A = _spd(3, torch.Generator().manual_seed(0), torch.float64)
    B = _spd(2, torch.Generator().manual_seed(1), torch.float64)
    op = kronecker(A, B)
    shifted = op.scale(2.0).add_diagonal(0.5)
    assert shifted.QA is op.QA and shifted.QB is op.QB
    lam_a, lam_b = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)
    torch.testing.assert_close(op.eigenvalues, torch.outer(lam_a, lam_b), **TOL)
    torch.testing.assert_close(shifted.eigenvalues, 2 * torch.outer(lam_a, lam_b) + 0.5, **TOL)
    assert float(shifted.scale_factor) == 2.0 and float(shifted.shift) == 0.5
    assert shifted.factor_sizes == (3, 2)


def test_kronecker_row_major_convention():
    g = torch.Generator().manual_seed(2)
    A, B = _spd(3, g, torch.float64), _spd(4, g, torch.float64)
    V = torch.randn(3, 4, generator=g, dtype=torch.float64)
    op = Kronecker.from_factors(A, B)
    torch.testing.assert_close(op.to_dense(), torch.kron(A, B), **TOL)
    torch.testing.assert_close(op.matvec(V.reshape(-1)), (A @ V @ B.T).reshape(-1), **TOL)
    torch.testing.assert_close(
        op.solve(V.reshape(-1)),
        (torch.linalg.solve(A, V) @ torch.linalg.inv(B)).reshape(-1),
        **TOL,
    )


def test_kronecker_vector_shift_raises():
    op, _ = make("kron_factors")
    with pytest.raises(InvalidArgumentError, match="per-layer"):
        op.add_diagonal(torch.linspace(0.1, 1.0, op.size, dtype=torch.float64))
    op.add_diagonal(torch.tensor([0.3], dtype=torch.float64))  # one element = scalar: fine
    block, _ = make("block_perm")
    with pytest.raises(InvalidArgumentError):
        block.add_diagonal(torch.linspace(0.1, 1.0, block.size, dtype=torch.float64))


def test_block_per_block_scale_and_shift():
    op, M = make("block_perm")
    out = op.scale_per_block([1.0, 2.0, 0.5, 3.0]).add_diagonal_per_block(
        torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    )
    expect = M.clone()
    for idx, c, d in zip(op.indices, [1.0, 2.0, 0.5, 3.0], [0.1, 0.2, 0.3, 0.4]):
        sub = idx[:, None], idx[None, :]
        expect[sub] = c * M[sub] + d * torch.eye(len(idx), dtype=torch.float64)
    torch.testing.assert_close(out.to_dense(), expect, **TOL)
    torch.testing.assert_close(out.logdet(), torch.linalg.slogdet(expect)[1], **TOL)
    with pytest.raises(ShapeError):
        op.add_diagonal_per_block([0.1, 0.2])


def test_block_index_validation():
    blocks = [
        Diagonal(torch.ones(2, dtype=torch.float64)),
        Diagonal(torch.ones(3, dtype=torch.float64)),
    ]
    good = [torch.tensor([4, 0]), torch.tensor([1, 3, 2])]
    op = BlockDiagonal(blocks, good)
    assert [i.tolist() for i in op.indices] == [[4, 0], [1, 3, 2]]
    bad = [
        [torch.tensor([0, 1]), torch.tensor([1, 2, 3])],  # overlap
        [torch.tensor([0, 1]), torch.tensor([2, 3, 5])],  # out of range / missing 4
        [torch.tensor([0, 1, 2]), torch.tensor([3, 4])],  # sizes do not match blocks
        [torch.tensor([0, 1])],  # wrong number of sets
        [torch.tensor([0.0, 1.0]), torch.tensor([2, 3, 4])],  # not LongTensor
    ]
    for indices in bad:
        with pytest.raises(ShapeError):
            BlockDiagonal(blocks, indices)
    with pytest.raises(InvalidArgumentError):
        BlockDiagonal([])


def test_block_nested_and_diagonal_linear_operator():
    from linear_operator.operators import DiagLinearOperator

    d = torch.arange(1.0, 6.0, dtype=torch.float64)
    op = BlockDiagonal(
        [Diagonal(d[:2]), Diagonal(d[2:])], [torch.tensor([3, 1]), torch.tensor([0, 2, 4])]
    )
    expect = torch.empty(5, dtype=torch.float64)
    expect[torch.tensor([3, 1, 0, 2, 4])] = d
    torch.testing.assert_close(op.diagonal(), expect)
    assert isinstance(op.to_linear_operator(), DiagLinearOperator)
    nested = BlockDiagonal([op, Dense(torch.eye(2, dtype=torch.float64) * 2)])
    torch.testing.assert_close(
        nested.logdet(), expect.log().sum() + 2 * torch.log(torch.tensor(2.0, dtype=torch.float64))
    )


# ---------------------------------------------------------------------- numerics
def test_jittered_cholesky_paths():
    M = _spd(5, torch.Generator().manual_seed(0), torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(jittered_cholesky(M), torch.linalg.cholesky(M))
    ones = torch.ones(3, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="jitter"):
        L = jittered_cholesky(ones)
    torch.testing.assert_close(L @ L.T, ones, atol=1e-6, rtol=0)
    with pytest.raises(NumericalError, match="not positive definite"):
        jittered_cholesky(torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)))
    with pytest.raises(NonFiniteError):
        jittered_cholesky(torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ShapeError):
        jittered_cholesky(torch.ones(2, 3))


def test_dense_vector_shift_jitter_warning():
    op = Dense(torch.ones(3, 3, dtype=torch.float64)).add_diagonal(
        torch.zeros(3, dtype=torch.float64)
    )
    with pytest.warns(RuntimeWarning, match="jitter"):
        assert torch.isfinite(op.logdet())


def test_dense_keeps_negative_eigenvalues():
    # no clamping: solve/logdet describe the same matrix as matvec (issue 11, item 3)
    Q = _orth(3, torch.Generator().manual_seed(0), torch.float64)
    lam = torch.tensor([-1e-13, 1.0, 2.0], dtype=torch.float64)
    op = Dense((Q * lam) @ Q.T)
    assert op.eigenvalues()[0] < 0
    expect = torch.log(torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)).sum()
    torch.testing.assert_close(op.add_diagonal(0.5).logdet(), expect, **TOL)
    assert torch.isfinite(op.sqrt_matvec(torch.ones(3, dtype=torch.float64))).all()
    indefinite = Dense((Q * torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64)) @ Q.T)
    shifted = indefinite.add_diagonal(0.5)
    v = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(shifted.matvec(v), shifted.to_dense() @ v)
    for call in (shifted.logdet, lambda: shifted.solve(v), shifted.inv_diagonal,
                 lambda: shifted.sample_inverse(2), lambda: indefinite.sqrt_matvec(v)):
        with pytest.raises(NumericalError, match="not positive definite|indefinite"):
            call()
    torch.testing.assert_close(indefinite.add_diagonal(1.5).solve(v),
                               torch.linalg.solve(indefinite.to_dense() + 1.5 * torch.eye(3,
                                                  dtype=torch.float64), v))


def test_lowrank_singular():
    _, _ = make("lowrank")
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 2, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, 3.0], dtype=torch.float64)
    op = LowRank(U, s)
    M = (U * s) @ U.T
    torch.testing.assert_close(op.to_dense(), M, **TOL)
    torch.testing.assert_close(op.scale(2.0).to_dense(), 2 * M, **TOL)
    eye = torch.eye(6, dtype=torch.float64)
    S = op.sqrt_matvec(eye)
    torch.testing.assert_close(S @ S.T, M, **TOL)
    torch.testing.assert_close(op.to_linear_operator().to_dense(), M, **TOL)
    for call in (
        op.logdet,
        op.inv_diagonal,
        lambda: op.solve(eye[0]),
        lambda: op.sample_inverse(2),
    ):
        with pytest.raises(NumericalError, match="add a positive diagonal"):
            call()
    shifted = op.add_diagonal(0.5)
    assert isinstance(shifted, LowRankPlusDiagonal) and not isinstance(shifted, LowRank)
    torch.testing.assert_close(shifted.logdet(), torch.linalg.slogdet(M + 0.5 * eye)[1], **TOL)


def test_argument_validation():
    op, _ = make("dense")
    with pytest.raises(ShapeError):
        op.matvec(torch.ones(op.size + 1, dtype=torch.float64))
    with pytest.raises(ShapeError):
        op.solve(torch.ones(2, op.size, 1, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError):
        op.scale(-1.0)
    with pytest.raises(NonFiniteError):
        op.add_diagonal(float("inf"))
    with pytest.raises(ShapeError):
        op.scale(torch.ones(2))
    with pytest.raises(ShapeError):
        op.add_diagonal(torch.ones(op.size + 1))
    with pytest.raises(ShapeError):
        Dense(torch.ones(2, 3))
    with pytest.raises(ShapeError):
        KroneckerEigen(torch.eye(2), torch.eye(3), torch.ones(3, 2))


# ---------------------------------------------------------------------- float32
@pytest.mark.parametrize("kind", KINDS)
def test_float32_smoke(kind):
    op32, M = make(kind, dtype=torch.float32)
    op32 = op32.scale(1.7).add_diagonal(0.3)
    M = 1.7 * M + 0.3 * torch.eye(op32.size, dtype=torch.float64)
    assert op32.dtype == torch.float32
    v = torch.linspace(-1, 1, op32.size)
    for ours, ref in (
        (op32.matvec(v), M @ v.double()),
        (op32.solve(v), torch.linalg.solve(M, v.double())),
        (op32.logdet(), torch.linalg.slogdet(M)[1]),
        (op32.inv_diagonal(), torch.linalg.inv(M).diagonal()),
    ):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
    assert op32.sample_inverse(4).dtype == torch.float32


def test_kronecker_from_factors_decomposes_lazily_once(monkeypatch):
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or real(m))
    a = torch.eye(3, dtype=torch.float64) * 2
    b = torch.eye(4, dtype=torch.float64) * 3
    op = KroneckerEigen.from_factors(a, b)
    assert op.size == 12 and op.dtype == torch.float64 and not calls
    shifted = op.scale(0.5).add_diagonal(1.0)
    torch.testing.assert_close(shifted.logdet(), 12 * torch.log(torch.tensor(4.0,
                                                                             dtype=torch.float64)))
    op.logdet()
    assert len(calls) == 2  # one eigh per factor, shared by the copies
