"""The hook-based curvature engine against dense float64 ``torch.func`` references.

Exactness statements tested (theory in the docstrings of :mod:`bayescurv.curvature`):

- ``full`` equals the dense GGN / empirical Fisher for every layer type;
- ``diag`` equals the diagonal of the dense GGN / EF for every layer type;
- K-FAC (expand and reduce) and EKFAC equal the GGN block for a single datum on layers
  without weight sharing;
- K-FAC expand is exact for deep linear nets with a per-position loss, K-FAC reduce for
  deep linear nets with pooling before the loss;
- EKFAC's eigenvalues are the diagonal of the exact GGN block in the K-FAC eigenbasis.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayescurv.curvature import compute
from bayescurv.curvature.engine import HookCapture
from bayescurv.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    UnsupportedLayerError,
)
from bayescurv.linalg import BlockDiagonal, KroneckerEigen
from bayescurv.params import select

DT = torch.float64
SIZES = (3, 1, 4)  # unequal batch sizes


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class MeanT(nn.Module):
    """Mean over all non-batch, non-feature positions: ``(B, T, D) -> (B, D)`` or
    ``(B, C, *spatial) -> (B, C)``."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last

    def forward(self, x):
        return x.mean(1) if self.channels_last else x.flatten(2).mean(-1)


class Reused(nn.Module):
    """One Linear applied twice (weight sharing across calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.l(torch.tanh(self.l(x)))))


class Tied(nn.Module):
    """Language-model style weight tying: the output layer reuses the embedding table."""

    def __init__(self, vocab: int = 6, dim: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mix(self.emb(idx).mean(1))))


class Scale(nn.Module):
    """A module type the structured extractors do not know."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


class Attention(nn.Module):
    """Single-head self-attention from Linear projections (weight sharing over tokens)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        w = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2.0, -1)
        return self.out(self.norm(x + w @ self.v(x)).mean(1))


def _randint(*shape, high: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_gen(seed))


def _case(name: str):
    """``(model, x, y, likelihood)`` of a named layer case, float64, eval mode."""
    torch.manual_seed(0)
    n = sum(SIZES)
    lik = "classification"
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(n, 5)
    elif name == "mlp-inplace-relu":
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
        x = torch.randn(n, 5)
    elif name == "sequence":  # Linear over a sequence dim, per-position outputs
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), Flatten())
        x = torch.randn(n, 3, 4)
        lik = "regression"
    elif name == "sequence-2d":  # two weight-sharing dims
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), Flatten())
        x = torch.randn(n, 2, 3, 4)
        lik = "regression"
    elif name == "attention":
        model = Attention()
        x = torch.randn(n, 3, 4)
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), Flatten(),
                              nn.Linear(9, 3))
        x = torch.randn(n, 2, 6)
    elif name == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), nn.Tanh(),
            Flatten(), nn.LazyLinear(3),
        )
        x = torch.randn(n, 2, 5, 4)
    elif name == "conv2d-same":
        model = nn.Sequential(
            nn.Conv2d(2, 2, 3, padding="same", dilation=2, bias=False), nn.Tanh(),
            nn.Conv2d(2, 2, 2, padding=1, padding_mode="circular"), nn.Tanh(),
            nn.Conv2d(2, 2, (2, 3), padding="same", padding_mode="reflect"), Flatten(),
            nn.LazyLinear(3),
        )
        x = torch.randn(n, 2, 4, 4)
    elif name == "conv3d":
        model = nn.Sequential(nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=1), nn.Tanh(),
                              Flatten(), nn.LazyLinear(2))
        x = torch.randn(n, 1, 3, 3, 3)
    elif name == "conv-groups":  # one Kronecker block per group; one position (no sharing)
        model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Tanh(), Flatten(),
                              nn.LazyLinear(3))
        x = torch.randn(n, 2, 2, 2)
    elif name == "embedding":
        model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), MeanT(True), nn.Tanh(),
                              nn.Linear(3, 3))
        x = _randint(n, 4, high=7)
    elif name == "norms":
        bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        model = nn.Sequential(nn.Conv2d(2, 3, 2), bn, nn.GroupNorm(1, 3), nn.Tanh(), Flatten(),
                              nn.LazyLinear(4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(n, 2, 3, 3)
    elif name == "reused":
        model = Reused()
        x = torch.randn(n, 4)
    elif name == "tied":
        model = Tied()
        x = _randint(n, 3, high=6)
    elif name == "binary":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        x = torch.randn(n, 3)
        lik = "binary"
    elif name == "poisson":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = 0.3 * torch.randn(n, 3)
        lik = "poisson"
    else:
        raise KeyError(name)
    model(x[:1])  # materialise lazy modules
    model = model.to(DT).eval()
    x = x.to(DT) if x.is_floating_point() else x
    with torch.no_grad():
        f = model(x)
        f = f.reshape(f.shape[0], -1)
    c = f.shape[1]
    if lik == "classification":
        y = _randint(n, high=c, seed=2)
    elif lik == "binary":
        y = _randint(n, high=2, seed=2).to(DT)
    elif lik == "poisson":
        y = torch.poisson(torch.ones(n, c, dtype=DT), generator=_gen(2))
    else:
        y = torch.randn(n, c, generator=_gen(2), dtype=DT)
    return model, x, y, lik


LAYER_CASES = ["mlp", "mlp-inplace-relu", "sequence", "sequence-2d", "attention", "conv1d",
               "conv2d", "conv2d-same", "conv3d", "conv-groups", "embedding", "norms", "reused",
               "tied", "binary", "poisson"]


# ------------------------------------------------------------------------------------------
# full and diagonal: exact for every layer type
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYER_CASES)
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_full_and_diag_exact(name, kind, dense_reference, batches_of):
    model, x, y, lik = _case(name)
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, lik, data, kind=kind)
    full = compute(model, lik, data, structure="full", kind=kind)
    diag = compute(model, lik, data, structure="diag", kind=kind)
    torch.testing.assert_close(full.matrix.to_dense(), ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(diag.matrix.diagonal(), torch.diagonal(ref), atol=1e-10,
                               rtol=1e-8)
    assert full.num_data == diag.num_data == len(x)


def _block_mask(matrix: BlockDiagonal) -> torch.Tensor:
    """Diagonal blocks of the curvature, a grouped convolution's split into its groups."""
    mask = torch.zeros(matrix.size, matrix.size, dtype=torch.bool)
    for block, idx in zip(matrix.blocks, matrix.indices):
        for part in idx.chunk(getattr(block, "num_groups", 1)):
            mask[part[:, None], part[None, :]] = True
    return mask


# ------------------------------------------------------------------------------------------
# K-FAC / EKFAC exactness
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "mlp-inplace-relu", "conv-groups", "binary",
                                  "poisson", "single-token"])
@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac"])
def test_kfac_exact_for_single_datum(name, structure, dense_reference):
    """Without weight sharing every K-FAC flavour equals the GGN block for one data point."""
    if name == "single-token":  # embedding with one token per sequence
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(5, 3), MeanT(True), nn.Tanh(), nn.Linear(3, 4)).to(DT)
        x, y = torch.tensor([[2]]), torch.tensor([1])
        lik = "classification"
    else:
        model, x, y, lik = _case(name)
        x, y = x[:1], y[:1]
    data = [(x, y)]
    ref = dense_reference(model, lik, data)
    curv = compute(model, lik, data, structure=structure)
    assert isinstance(curv.matrix, BlockDiagonal)
    torch.testing.assert_close(curv.matrix.to_dense(), ref * _block_mask(curv.matrix),
                               atol=1e-10, rtol=1e-8)


def _deep_linear_sequence(pool: bool, seq: int | tuple[int, ...] = 3):
    """Deep linear net over a sequence, Gaussian likelihood: per-position outputs
    (flattened into ``(B, T * C)``) or mean pooling over positions before the last layer."""
    torch.manual_seed(0)
    layers_ = [nn.Linear(4, 3), nn.Linear(3, 3, bias=False)]
    if pool:
        layers_ += [MeanT(True), nn.Linear(3, 2)]
    else:
        layers_ += [nn.Linear(3, 2), Flatten()]
    model = nn.Sequential(*layers_).to(DT)
    n = sum(SIZES)
    seq = (seq,) if isinstance(seq, int) else seq
    if pool and len(seq) > 1:
        raise ValueError("pooling over one sharing dim only")
    x = torch.randn(n, *seq, 4, dtype=DT)
    y = torch.randn(n, (2 if pool else 2 * math.prod(seq)), dtype=DT)
    return model, x, y


def _deep_linear_conv(pool: bool, conv: nn.Module, x: torch.Tensor):
    """A linear convolution followed by per-position outputs or by global average pooling
    and a Linear layer, Gaussian likelihood."""
    layers_ = [conv] + ([MeanT(False), nn.LazyLinear(2)] if pool else [Flatten()])
    model = nn.Sequential(*layers_)
    model(x[:1])
    model = model.to(DT)
    with torch.no_grad():
        c = model(x.to(DT)).shape[1]
    return model, x.to(DT), torch.randn(len(x), c, dtype=DT, generator=_gen(3))


CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 7)),
    "conv1d-same": (lambda: nn.Conv1d(2, 2, 4, padding="same", dilation=2), (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 2, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
               (2, 4, 5)),
    "conv2d-reflect": (lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                       (1, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=(1, 0, 1)), (1, 3, 4, 3)),
}


def _conv_case(name, pooled, dense_reference, batches_of):
    """Deep-linear conv model of ``CONVS[name]``, its batches and the dense GGN."""
    torch.manual_seed(0)
    make, shape = CONVS[name]
    model, x, y = _deep_linear_conv(pooled, make(), torch.randn(sum(SIZES), *shape))
    data = batches_of(x, y, SIZES)
    return model, data, dense_reference(model, "regression", data)


@pytest.mark.parametrize("name", list(CONVS))
def test_kfac_expand_exact_per_position_conv(name, dense_reference, batches_of):
    model, data, ref = _conv_case(name, False, dense_reference, batches_of)
    for structure in ("kfac", "ekfac"):
        curv = compute(model, "regression", data, structure=structure)
        torch.testing.assert_close(curv.matrix.to_dense(), ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", list(CONVS))
def test_kfac_reduce_exact_pooled_conv(name, dense_reference, batches_of):
    model, data, ref = _conv_case(name, True, dense_reference, batches_of)
    curv = compute(model, "regression", data, structure="kfac-reduce")
    torch.testing.assert_close(curv.matrix.to_dense(), ref * _block_mask(curv.matrix),
                               atol=1e-9, rtol=1e-7)
    expand = compute(model, "regression", data, structure="kfac").matrix.to_dense()
    assert not torch.allclose(expand, curv.matrix.to_dense(), atol=1e-6)


@pytest.mark.parametrize("seq", [3, (2, 3)])
def test_kfac_expand_exact_deep_linear_sequence(seq, dense_reference, batches_of):
    model, x, y = _deep_linear_sequence(pool=False, seq=seq)
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, "regression", data)
    for structure in ("kfac", "ekfac"):
        curv = compute(model, "regression", data, structure=structure)
        torch.testing.assert_close(curv.matrix.to_dense(), ref * _block_mask(curv.matrix),
                                   atol=1e-9, rtol=1e-7)
    reduce = compute(model, "regression", data, structure="kfac-reduce").matrix.to_dense()
    assert not torch.allclose(reduce, ref * _block_mask(curv.matrix), atol=1e-6)


def test_kfac_reduce_exact_deep_linear_pooled(dense_reference, batches_of):
    model, x, y = _deep_linear_sequence(pool=True)
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, "regression", data)
    curv = compute(model, "regression", data, structure="kfac-reduce")
    torch.testing.assert_close(curv.matrix.to_dense(), ref * _block_mask(curv.matrix),
                               atol=1e-9, rtol=1e-7)
    expand = compute(model, "regression", data, structure="kfac").matrix.to_dense()
    assert not torch.allclose(expand, ref * _block_mask(curv.matrix), atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "sequence", "conv2d", "embedding", "norms"])
def test_ekfac_eigenvalues_are_exact_diagonal_in_kfac_basis(name, dense_reference, batches_of):
    model, x, y, lik = _case(name)
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, lik, data)
    kfac = compute(model, lik, data, structure="kfac").matrix
    ekfac = compute(model, lik, data, structure="ekfac").matrix
    for kb, eb, idx in zip(kfac.blocks, ekfac.blocks, ekfac.indices):
        block = ref[idx[:, None], idx[None, :]]
        if isinstance(eb, KroneckerEigen):
            q = torch.kron(eb.QA, eb.QB)
            torch.testing.assert_close(torch.kron(kb.QA, kb.QB).abs(), q.abs())
            rotated = torch.diagonal(q.T @ block @ q).reshape(eb.eigenvalues.shape)
            torch.testing.assert_close(eb.eigenvalues, rotated, atol=1e-10, rtol=1e-8)
        else:  # dense exact block
            torch.testing.assert_close(eb.to_dense(), block, atol=1e-10, rtol=1e-8)


def test_kfac_factors_match_definition():
    """K-FAC expand / reduce factors of a Conv2d from ``F.unfold`` (independent im2col)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1).to(DT)
    model = nn.Sequential(conv, Flatten()).to(DT)
    x = torch.randn(5, 2, 6, 5, dtype=DT)
    y = torch.randn(5, model(x).shape[1], dtype=DT)
    a = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (B, T, I)
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=DT)], -1)
    t = a.shape[1]
    # Gaussian, unit noise, per-position loss: G = Σ_{k,n,t} g gᵀ = N T I
    for structure, a_ref, g_ref in (
        ("kfac", a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) / (5 * t),
         5 * t * torch.eye(3, dtype=DT)),
        ("kfac-reduce", a.mean(1).T @ a.mean(1) / 5, 5 * t * torch.eye(3, dtype=DT)),
    ):
        block = compute(model, "regression", [(x, y)], structure=structure).matrix.blocks[0]
        torch.testing.assert_close(block.to_dense(), torch.kron(g_ref, a_ref))


# ------------------------------------------------------------------------------------------
# Monte-Carlo and empirical Fisher
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_mc_converges_to_exact(structure, batches_of):
    model, x, y, lik = _case("mlp")
    data = batches_of(x, y, SIZES)
    exact = compute(model, lik, data, structure=structure).matrix.to_dense()
    mc = compute(model, lik, data, structure=structure, kind="mc", num_samples=4000,
                 generator=_gen(0)).matrix.to_dense()
    err = (mc - exact).norm() / exact.norm()
    assert err < 0.05, err
    few = compute(model, lik, data, structure=structure, kind="mc", num_samples=1,
                  generator=_gen(0)).matrix.to_dense()
    assert (few - exact).norm() / exact.norm() > err  # the tolerance can fail
    again = compute(model, lik, data, structure=structure, kind="mc", num_samples=1,
                    generator=_gen(0)).matrix.to_dense()
    torch.testing.assert_close(few, again, rtol=0, atol=0)  # reproducible given a seed


def test_ef_is_sum_of_gradient_outer_products(batches_of):
    model, x, y, lik = _case("conv2d")
    data = batches_of(x, y, SIZES)
    pset = select(model)
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in pset.params]))
    g = torch.stack(grads)
    ef = compute(model, lik, data, structure="full", kind="ef").matrix.to_dense()
    torch.testing.assert_close(ef, g.T @ g)
    d = compute(model, lik, data, structure="diag", kind="ef").matrix.diagonal()
    torch.testing.assert_close(d, g.square().sum(0))


def test_hessian_dense_and_diag(dense_reference, batches_of):
    model, x, y, lik = _case("mlp")
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, lik, data, kind="hessian")
    torch.testing.assert_close(compute(model, lik, data, structure="full",
                                       kind="hessian").matrix.to_dense(), ref)
    torch.testing.assert_close(compute(model, lik, data, structure="diag",
                                       kind="hessian").matrix.diagonal(), torch.diagonal(ref))
    with pytest.raises(InvalidArgumentError, match="Hessian"):
        compute(model, lik, data, structure="kfac", kind="hessian")


# ------------------------------------------------------------------------------------------
# parameters: tying, frozen, subsets, unknown modules
# ------------------------------------------------------------------------------------------
def test_tied_weights_kfac_refused():
    model, x, y, lik = _case("tied")
    for structure in ("kfac", "kfac-reduce", "ekfac"):
        with pytest.raises(UnsupportedLayerError, match="tied"):
            compute(model, lik, [(x, y)], structure=structure)


def test_frozen_parameters_excluded(dense_reference, batches_of):
    model, x, y, lik = _case("conv2d")
    model[0].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    data = batches_of(x, y, SIZES)
    pset = select(model)
    assert "0.bias" not in pset.names and "3.weight" not in pset.names
    ref = dense_reference(model, lik, data, params=pset)
    for structure in ("full", "diag", "kfac"):
        curv = compute(model, lik, data, structure=structure)
        assert curv.matrix.size == pset.numel
        if structure == "kfac":  # the output layer's bias alone: an exact dense block
            idx = curv.matrix.indices[-1]
            assert idx.tolist() == list(range(pset.numel - 3, pset.numel))
            torch.testing.assert_close(curv.matrix.blocks[-1].to_dense(),
                                       ref[idx[:, None], idx[None, :]])
        else:
            torch.testing.assert_close(curv.matrix.diagonal(), torch.diagonal(ref))


@pytest.mark.parametrize("subset", ["last_layer", ["0.weight", "3"]])
def test_parameter_subsets(subset, dense_reference, batches_of):
    model, x, y, lik = _case("conv2d")
    data = batches_of(x, y, SIZES)
    pset = select(model, subset)
    ref = dense_reference(model, lik, data, params=pset)
    full = compute(model, lik, data, structure="full", subset=subset).matrix.to_dense()
    torch.testing.assert_close(full, ref)


def test_unknown_layer_refused_then_per_sample(dense_reference, batches_of):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    data = batches_of(x, y, (5, 3))
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*Scale"):
        compute(model, "classification", data, structure="diag", unknown_layers="error")
    ref = dense_reference(model, "classification", data)
    for structure, option in [(s, o) for s in ("full", "diag", "kfac")
                              for o in ("auto", "per_sample")]:
        curv = compute(model, "classification", data, structure=structure,
                       unknown_layers=option)
        if structure == "kfac":
            blk = curv.matrix.blocks[1].to_dense()
            idx = curv.matrix.indices[1]
            torch.testing.assert_close(blk, ref[idx[:, None], idx[None, :]])
        else:
            torch.testing.assert_close(curv.matrix.diagonal(), torch.diagonal(ref))
    with pytest.raises(InvalidArgumentError, match="unknown_layers"):
        compute(model, "classification", data, unknown_layers="dense")


def test_multihead_cross_attention_refused_by_name():
    """Self-attention is supported (tests/test_attention.py); cross-attention is refused
    with the module's name, and the rest of the net still works without it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.mha(x, x.flip(1), x.flip(1))[0].mean(1))

    model = Net().to(DT)
    data = [(torch.randn(3, 5, 4, dtype=DT), torch.randint(0, 2, (3,)))]
    with pytest.raises(UnsupportedLayerError, match=r"'mha'.*MultiheadAttention"):
        compute(model, "classification", data, structure="diag")
    curv = compute(model, "classification", data, structure="diag", subset=["out"])
    assert curv.matrix.size == 10


def test_compute_params_is_a_deprecated_alias_of_subset(batches_of):
    """``compute(params=...)`` (the old name of ``subset=``, as in ``Laplace(subset=...)``)
    still works, with a FutureWarning, and gives the same curvature."""
    model, x, y, lik = _case("mlp")
    data = batches_of(x, y, SIZES)
    new = compute(model, lik, data, structure="diag", subset="last_layer")
    with pytest.warns(FutureWarning, match=r"compute: params= is deprecated, use subset="):
        old = compute(model, lik, data, structure="diag", params="last_layer")
    torch.testing.assert_close(old.matrix.to_dense(), new.matrix.to_dense())
    assert old.params.names == new.params.names


def test_batchnorm_train_mode_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*eval"):
        compute(model, "classification", [(x, y)], structure="diag")


# ------------------------------------------------------------------------------------------
# data handling, reductions, dtypes, errors
# ------------------------------------------------------------------------------------------
class KwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.out(torch.tanh(self.a(a) + self.b(b)))


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "kfac-reduce", "ekfac"])
def test_dict_batches_equal_tuple_batches(structure, batches_of):
    torch.manual_seed(0)
    model = KwargNet().to(DT)
    a, b = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    y = torch.randint(0, 3, (8,))
    dict_data = batches_of({"a": a, "b": b}, y, (5, 3))
    ref = None
    for x_key in (None, "inputs"):
        data = dict_data if x_key is None else [{"inputs": torch.cat([d["a"], d["b"]], 1),
                                                 "y": d["y"]} for d in dict_data]
        if x_key is not None:
            class Wrap(nn.Module):
                def __init__(self, net):
                    super().__init__()
                    self.net = net

                def forward(self, x):
                    return self.net(x[:, :3], x[:, 3:])

            got = compute(Wrap(model), "classification", data, structure=structure,
                          x_key="inputs").matrix.to_dense()
        else:
            got = compute(model, "classification", data, structure=structure).matrix.to_dense()
        ref = got if ref is None else ref
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "ekfac"])
def test_batching_and_mean_reduction(structure, batches_of):
    model, x, y, lik = _case("conv1d")
    one = compute(model, lik, [(x, y)], structure=structure)
    many = compute(model, lik, batches_of(x, y, SIZES), structure=structure)
    torch.testing.assert_close(one.matrix.to_dense(), many.matrix.to_dense())
    torch.testing.assert_close(one.loss, many.loss)
    mean = compute(model, lik, batches_of(x, y, SIZES), structure=structure, reduction="mean")
    torch.testing.assert_close(mean.matrix.to_dense(), one.matrix.to_dense() / len(x))
    torch.testing.assert_close(mean.loss, one.loss / len(x))
    assert mean.num_data == len(x)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "ekfac"])
def test_float32_matches_float64(structure, batches_of):
    model, x, y, lik = _case("norms")
    ref = compute(model, lik, batches_of(x, y, SIZES), structure=structure).matrix.to_dense()
    m32 = model.float()
    got = compute(m32, lik, batches_of(x.float(), y, SIZES), structure=structure).matrix
    assert got.dtype == torch.float64  # float32 models: float64 sums and decompositions
    torch.testing.assert_close(got.to_dense(), ref, atol=1e-4, rtol=1e-3)


def test_non_finite_and_mismatched_data():
    model, x, y, lik = _case("mlp")
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        compute(model, lik, [(bad, y)], structure="diag")
    with pytest.raises(ShapeError):
        compute(model, lik, [(x, y[:-1])], structure="diag")
    with pytest.raises(ShapeError):
        compute(model, "regression", [(x, torch.randn(len(x), 5, dtype=DT))], structure="diag")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        compute(model, lik, [(x, y)], structure="kfac")


def test_bad_options():
    model, x, y, lik = _case("mlp")
    with pytest.raises(InvalidArgumentError, match="structure"):
        compute(model, lik, [(x, y)], structure="kron")
    with pytest.raises(InvalidArgumentError, match="kind"):
        compute(model, lik, [(x, y)], kind="fisher")
    with pytest.raises(InvalidArgumentError, match="num_samples"):
        compute(model, lik, [(x, y)], kind="mc", num_samples=0)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        compute(model, lik, [(x, y)], reduction="avg")


def test_hooks_removed_and_model_unchanged():
    model, x, y, lik = _case("mlp-inplace-relu")
    before = model(x)
    compute(model, lik, [(x, y)], structure="kfac")
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "diag", "full"])
def test_module_never_called_has_zero_curvature(structure, dense_reference):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Net().to(DT)
    data = [(torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,)))]
    ref = dense_reference(model, "classification", data)
    got = compute(model, "classification", data, structure=structure).matrix.to_dense()
    assert got[8:, :].abs().max() == 0 and got[:, 8:].abs().max() == 0
    if structure in ("diag", "full"):
        torch.testing.assert_close(torch.diagonal(got), torch.diagonal(ref))


def test_capture_records_align_with_blocks():
    """Block ``i`` of a K-FAC matrix belongs to ``HookCapture(...).records[i]``."""
    model, x, y, lik = _case("norms")
    curv = compute(model, lik, [(x, y)], structure="kfac")
    cap = HookCapture(curv.params, "kfac")
    assert curv.matrix.num_blocks == len(cap.records)
    for rec, idx in zip(cap.records, curv.matrix.indices):
        want = sorted(j for i in rec.owned.values()
                      for j in range(curv.params.slice_of(i).start, curv.params.slice_of(i).stop))
        assert sorted(idx.tolist()) == want


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (CI is CPU-only); runs wherever torch.cuda is available",
)
@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "ekfac", "lowrank",
                                       "diag-hesscale"])
def test_cuda_matches_cpu(structure, batches_of):
    """Everything runs on the model's device; results agree with the CPU."""
    name = "mlp" if structure == "diag-hesscale" else "norms"
    model, x, y, lik = _case(name)
    ref = compute(model, lik, batches_of(x, y, SIZES), structure=structure, rank=40)
    dev = torch.device("cuda")
    got = compute(model.to(dev), lik, batches_of(x.to(dev), y.to(dev), SIZES),
                  structure=structure, rank=40)
    assert got.matrix.device.type == "cuda"
    torch.testing.assert_close(got.matrix.to_dense().cpu(), ref.matrix.to_dense(), atol=1e-8,
                               rtol=1e-6)


def test_dense_hessian_through_layer_norm_equals_finite_differences():
    """``kind="hessian"`` equals central differences of the gradient on a LayerNorm net.

    ``torch.func.hessian`` (forward-over-reverse) is wrong here in torch 2.13: cross terms
    between the affine LayerNorm weight and the layer before it are off by O(1).
    """
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    H = compute(model, "classification", [(x, y)], kind="hessian", structure="full")
    H = H.matrix.to_dense()
    pset = select(model, "all")
    theta = pset.vector()

    def grad(v: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(
            lambda w: nn.functional.cross_entropy(pset.functional_call(w, x), y, reduction="sum")
        )(v)

    eps = 1e-6
    fd = torch.stack([(grad(theta + eps * e) - grad(theta - eps * e)) / (2 * eps)
                      for e in torch.eye(theta.numel(), dtype=torch.float64)], 1)
    assert torch.allclose(H, 0.5 * (fd + fd.T), atol=1e-7)
