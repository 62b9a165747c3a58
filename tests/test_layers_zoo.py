"""Layer rules for model zoos (issue 26): grouped / depthwise convolutions (MobileNet,
EfficientNet, ConvNeXt) and Hugging Face's ``Conv1D`` (GPT-2) in the structured extractors,
against dense float64 ``torch.func`` references.

Exactness statements tested:

- ``full``, ``diag`` and ``lowrank`` (all eigenpairs) equal the dense GGN / its diagonal;
- a grouped convolution is block diagonal over its groups, and K-FAC gives each group its
  own ``G_j ⊗ A_j``: per group, K-FAC expand / reduce / EKFAC equal the GGN block for one
  datum without weight sharing; K-FAC expand is exact for a deep linear grouped convolution
  with a per-position loss, K-FAC reduce with pooling; EKFAC's eigenvalues are the diagonal
  of each group's exact block in the K-FAC eigenbasis;
- the GLM predictive equals ``J Σ Jᵀ`` with ``Σ`` the inverse of the posterior's own dense
  precision (K-FAC, EKFAC, diag; scalar and per-tensor priors);
- ``Conv1D`` (weight ``(in, out)``) has the K-FAC factors of the equivalent ``nn.Linear``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.curvature import compute, layers, preflight
from bayescurv.linalg import (
    BlockDiagonal,
    Dense,
    KroneckerBatch,
    KroneckerEigen,
    from_state,
    to_state,
)
from bayescurv.params import select

DT = torch.float64
SIZES = (3, 1, 4)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(x, y, sizes=SIZES) -> list:
    out, s = [], 0
    for n in sizes:
        if isinstance(x, dict):
            out.append({**{k: v[s:s + n] for k, v in x.items()}, "labels": y[s:s + n]})
        else:
            out.append((x[s:s + n], y[s:s + n]))
        s += n
    return out


def _jacobian(pset, x) -> torch.Tensor:
    """``(B, C, P)`` Jacobian of the network output w.r.t. the set's flat parameters."""
    def f(v):
        return pset.functional_call(v, **x) if isinstance(x, dict) else pset.functional_call(v, x)

    return torch.func.jacrev(f)(pset.vector().detach())


def _dense_ggn(pset, data, lik: str = "classification") -> torch.Tensor:
    """``Σ_n J_nᵀ H_n J_n`` (softmax Hessian, or the identity for a unit-noise Gaussian)."""
    out = 0
    for batch in data:
        x = {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) \
            else batch[0]
        jac = _jacobian(pset, x)
        if lik == "classification":
            with torch.no_grad():
                f = pset.functional_call(pset.vector(), **x) if isinstance(x, dict) \
                    else pset.functional_call(pset.vector(), x)
            p = f.softmax(-1)
            h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            h = torch.eye(jac.shape[1], dtype=jac.dtype).expand(jac.shape[0], -1, -1)
        out = out + torch.einsum("bcp,bcd,bdq->pq", jac, h, jac)
    return out


def _group_mask(matrix: BlockDiagonal) -> torch.Tensor:
    """Mask of the diagonal blocks of a block-diagonal curvature, with every grouped
    convolution's block split into its groups."""
    mask = torch.zeros(matrix.size, matrix.size, dtype=torch.bool)
    for block, idx in zip(matrix.blocks, matrix.indices):
        parts = idx.chunk(block.num_groups) if isinstance(block, KroneckerBatch) else [idx]
        for part in parts:
            mask[part[:, None], part[None, :]] = True
    return mask


def _randomize_bn(model: nn.Module) -> None:
    g = _gen(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=DT))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g, dtype=DT))
                    m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g, dtype=DT))


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
def _dwsep():
    """Depthwise-separable CNN: conv, BN, ReLU, depthwise 3x3 (groups = C, bias), BN, ReLU,
    grouped 1x1 (groups 2, O_g = 3), pointwise, average pooling, Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 1, groups=2), nn.Tanh(),
        nn.Conv2d(6, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3),
    ).to(DT).eval()
    _randomize_bn(model)
    x = torch.randn(sum(SIZES), 2, 4, 4, generator=_gen(1), dtype=DT)
    return model, x


def _grouped1d():
    """Conv1d with groups (O_g = 3, I_g = 2 · 3 + 1), depthwise Conv1d with dilation and
    stride, Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, groups=2, padding=1), nn.Tanh(),
        nn.Conv1d(6, 6, 2, groups=6, stride=2, dilation=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(3),
    )
    x = torch.randn(sum(SIZES), 4, 7, generator=_gen(1))
    model(x)
    return model.to(DT).eval(), x.to(DT)


def _mobilenet():
    """torchvision's MobileNetV3-small at width 0.1 (depthwise 3x3 and 5x5 convolutions,
    squeeze-excitation, BatchNorm with non-trivial statistics) on 16 x 16 inputs."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(num_classes=3, width_mult=0.1).to(DT).eval()
    _randomize_bn(model)
    x = torch.randn(sum(SIZES), 3, 16, 16, generator=_gen(1), dtype=DT)
    return model, x


MOBILENET_SUBSET = ["features.0.0", "features.1.block.0.0", "features.1.block.1.fc1",
                    "features.4.block.1.0", "features.4.block.1.1", "features.9.block.1.0"]
"""A few hundred to a few thousand parameters of the MobileNet for dense references: the
stem, two depthwise 3x3 / 5x5 convolutions (5x5 with 32 groups), an SE 1x1 conv with bias,
a BatchNorm."""


def _case(name: str):
    """``(model, x, subset)``."""
    if name == "dwsep":
        return (*_dwsep(), "all")
    if name == "grouped1d":
        return (*_grouped1d(), "all")
    model, x = _mobilenet()
    return model, x, MOBILENET_SUBSET


def _labels(model, x, seed: int = 2) -> torch.Tensor:
    with torch.no_grad():
        c = model(x).shape[-1]
    return torch.randint(0, c, (len(x),), generator=_gen(seed))


# ------------------------------------------------------------------------------------------
# the batched Kronecker operator
# ------------------------------------------------------------------------------------------
def _spd(g: int, n: int, seed: int) -> torch.Tensor:
    r = torch.randn(g, n, n + 1, generator=_gen(seed), dtype=DT)
    return r @ r.mT / n


@pytest.mark.parametrize("p,q", [(2, 3), (1, 4)])
def test_kronecker_batch_operator_matches_dense(p, q):
    A, B = _spd(5, p, 0), _spd(5, q, 1)
    op = KroneckerBatch.from_factors(A, B)
    dense = torch.block_diag(*[torch.kron(a, b) for a, b in zip(A, B)])
    n = dense.shape[0]
    torch.testing.assert_close(op.to_dense(), dense)
    if p == 1:
        assert op.eigenbases[0] is None  # a 1 x 1 factor: identity basis, never multiplied
    v = torch.randn(n, 2, generator=_gen(3), dtype=DT)
    prior = torch.tensor(0.7, dtype=DT, requires_grad=True)
    post = op.scale(1.5).add_diagonal(prior)
    ref = 1.5 * dense + 0.7 * torch.eye(n, dtype=DT)
    torch.testing.assert_close(post.to_dense(), ref)
    torch.testing.assert_close(post.matvec(v), ref @ v)
    torch.testing.assert_close(post.solve(v), torch.linalg.solve(ref, v))
    torch.testing.assert_close(post.logdet(), torch.logdet(ref))
    torch.testing.assert_close(post.diagonal(), ref.diagonal())
    torch.testing.assert_close(post.inv_diagonal(), torch.linalg.inv(ref).diagonal())
    eye = torch.eye(n, dtype=DT)
    r = post.inv_sqrt_matvec(eye)
    torch.testing.assert_close(r @ r.T, torch.linalg.inv(ref))
    s = post.sqrt_matvec(eye)
    torch.testing.assert_close(s @ s.T, ref)
    torch.testing.assert_close(post.to_linear_operator().to_dense(), ref)
    post.logdet().backward()  # differentiable in the prior
    torch.testing.assert_close(prior.grad, torch.linalg.inv(ref).trace())
    # a per-tensor prior: a different shift on the last column (the bias of every group)
    d = torch.full((5, p, q), 0.3, dtype=DT)
    d[..., -1] = 2.0
    col = op.add_diagonal(d.reshape(-1))
    ref = dense + torch.diag(d.reshape(-1))
    torch.testing.assert_close(col.to_dense(), ref)
    torch.testing.assert_close(col.solve(v), torch.linalg.solve(ref, v))
    torch.testing.assert_close(col.logdet(), torch.logdet(ref))
    torch.testing.assert_close(col.inv_diagonal(), torch.linalg.inv(ref).diagonal())
    r = col.inv_sqrt_matvec(eye)
    torch.testing.assert_close(r @ r.T, torch.linalg.inv(ref))
    torch.testing.assert_close(col.scale(2.0).add_diagonal(0.1).to_dense(),
                               2 * ref + 0.1 * eye)
    # state round trip, EKFAC-style construction from bases and eigenvalues
    back = from_state(to_state(op))
    torch.testing.assert_close(back.to_dense(), dense)
    QA, QB = op.QA, op.QB
    ek = KroneckerBatch(QA, QB, op.base_eigenvalues + 0.5)
    ref = torch.block_diag(*[torch.kron(a, b) @ torch.diag(e.reshape(-1)) @ torch.kron(a, b).T
                             for a, b, e in zip(QA, QB, op.base_eigenvalues + 0.5)])
    torch.testing.assert_close(ek.to_dense(), ref)


# ------------------------------------------------------------------------------------------
# grouped convolutions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dwsep", "grouped1d", "mobilenet"])
def test_grouped_full_diag_lowrank_exact(name):
    model, x, subset = _case(name)
    y = _labels(model, x)
    data = _batches(x, y)
    pset = select(model, subset)
    ref = _dense_ggn(pset, data)
    full = compute(model, "classification", data, structure="full", subset=subset)
    diag = compute(model, "classification", data, structure="diag", subset=subset)
    torch.testing.assert_close(full.matrix.to_dense(), ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(diag.matrix.diagonal(), ref.diagonal(), atol=1e-12, rtol=1e-9)
    if name != "mobilenet":  # N K = 24 columns: the square root holds every eigenpair
        low = compute(model, "classification", data, structure="lowrank", rank=3 * len(x),
                      subset=subset)
        torch.testing.assert_close(low.matrix.to_dense(), ref, atol=1e-10, rtol=1e-8)


def test_mobilenet_diag_all_weights():
    """The exact diagonal over all 32k parameters against per-sample Jacobians."""
    model, x = _mobilenet()
    y = _labels(model, x)
    data = _batches(x, y, (5, 3))
    pset = select(model, "all")
    ref = 0
    for xb, _ in data:
        jac = _jacobian(pset, xb)
        with torch.no_grad():
            p = model(xb).softmax(-1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        ref = ref + torch.einsum("bcp,bcd,bdp->p", jac, h, jac)
    diag = compute(model, "classification", data, structure="diag")
    torch.testing.assert_close(diag.matrix.diagonal(), ref, atol=1e-12, rtol=1e-9)
    kfac = compute(model, "classification", data, structure="kfac").matrix
    kinds = {type(b).__name__ for b, i in zip(kfac.blocks, kfac.indices)}
    assert "KroneckerBatch" in kinds
    # every convolution is Kronecker-factored; dense blocks only for BatchNorm affine pairs
    dense = [i.numel() for b, i in zip(kfac.blocks, kfac.indices)
             if not isinstance(b, (KroneckerEigen, KroneckerBatch))]
    assert max(dense) <= 2 * 96


def test_depthwise_factors_are_batched_and_one_by_one():
    """Depthwise (groups = C_in = C_out): G-factors 1 x 1, identity bases never stored."""
    model, x = _dwsep()
    y = _labels(model, x)
    kfac = compute(model, "classification", _batches(x, y), structure="kfac").matrix
    dw = kfac.blocks[2]  # the depthwise conv (after the stem conv and its BatchNorm)
    assert isinstance(dw, KroneckerBatch) and dw.num_groups == 4
    assert dw.factor_sizes == (1, 10) and dw.eigenbases[0] is None
    grouped = kfac.blocks[4]  # 1x1 conv with 2 groups of 3 outputs
    assert isinstance(grouped, KroneckerBatch) and grouped.factor_sizes == (3, 3)


def test_grouped_kfac_factors_match_definition():
    """Per-group factors from ``F.unfold`` (an independent im2col): group ``j`` uses input
    channels ``j C_in/G ...``; Gaussian per-position loss, so ``G_j = N T I``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(DT)
    model = nn.Sequential(conv, nn.Flatten()).to(DT)
    x = torch.randn(5, 4, 6, 5, dtype=DT)
    y = torch.randn(5, model(x).shape[1], dtype=DT)
    block = compute(model, "regression", [(x, y)], structure="kfac").matrix.blocks[0]
    for j in range(2):
        a = torch.nn.functional.unfold(x[:, 2 * j:2 * j + 2], 3, padding=1, stride=2)
        a = a.transpose(1, 2)
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=DT)], -1)
        t = a.shape[1]
        a_ref = a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) / (5 * t)
        ref = torch.kron(5 * t * torch.eye(3, dtype=DT), a_ref)
        m = ref.shape[0]
        torch.testing.assert_close(block.to_dense()[j * m:(j + 1) * m, j * m:(j + 1) * m], ref)


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac"])
def test_grouped_kfac_exact_for_single_datum(structure):
    """Without weight sharing (kernel = input size: one position) every flavour equals each
    group's GGN block for one data point."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 2, groups=2), nn.Tanh(), nn.Conv2d(6, 6, 1, groups=6), nn.Tanh(),
        nn.Flatten(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(1, 4, 2, 2, dtype=DT)
    data = [(x, torch.tensor([1]))]
    ref = _dense_ggn(select(model, "all"), data)
    curv = compute(model, "classification", data, structure=structure).matrix
    torch.testing.assert_close(curv.to_dense(), ref * _group_mask(curv), atol=1e-10, rtol=1e-8)


def _deep_linear(conv: nn.Module, x: torch.Tensor, pool: bool):
    layers_ = [conv] + ([nn.AdaptiveAvgPool1d(1) if x.dim() == 3 else nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.LazyLinear(2)] if pool else [nn.Flatten()])
    model = nn.Sequential(*layers_)
    model(x[:1])
    model = model.to(DT)
    x = x.to(DT)
    with torch.no_grad():
        c = model(x).shape[1]
    return model, x, torch.randn(len(x), c, dtype=DT, generator=_gen(3))


GROUPED = {
    "conv2d-groups2": (lambda: nn.Conv2d(4, 6, (2, 3), padding=1, groups=2), (4, 3, 4)),
    "conv2d-depthwise": (lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3), (3, 5, 5)),
    "conv1d-groups2": (lambda: nn.Conv1d(4, 4, 3, groups=2, dilation=2), (4, 8)),
    "conv1d-depth-mult": (lambda: nn.Conv1d(2, 4, 2, groups=2, bias=False), (2, 5)),
}


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_kfac_expand_exact_per_position(name):
    torch.manual_seed(0)
    make, shape = GROUPED[name]
    model, x, y = _deep_linear(make(), torch.randn(sum(SIZES), *shape), pool=False)
    data = _batches(x, y)
    ref = _dense_ggn(select(model, "all"), data, "regression")
    for structure in ("kfac", "ekfac"):
        curv = compute(model, "regression", data, structure=structure).matrix
        torch.testing.assert_close(curv.to_dense(), ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_kfac_reduce_exact_pooled(name):
    torch.manual_seed(0)
    make, shape = GROUPED[name]
    model, x, y = _deep_linear(make(), torch.randn(sum(SIZES), *shape), pool=True)
    data = _batches(x, y)
    ref = _dense_ggn(select(model, "all"), data, "regression")
    curv = compute(model, "regression", data, structure="kfac-reduce").matrix
    torch.testing.assert_close(curv.to_dense(), ref * _group_mask(curv), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", ["dwsep", "mobilenet"])
def test_grouped_ekfac_eigenvalues_exact_in_kfac_basis(name):
    model, x, subset = _case(name)
    y = _labels(model, x)
    data = _batches(x, y)
    ref = _dense_ggn(select(model, subset), data)
    kfac = compute(model, "classification", data, structure="kfac", subset=subset).matrix
    ekfac = compute(model, "classification", data, structure="ekfac", subset=subset).matrix
    seen = 0
    for kb, eb, idx in zip(kfac.blocks, ekfac.blocks, ekfac.indices):
        if not isinstance(eb, KroneckerBatch):
            continue
        seen += 1
        for j, part in enumerate(idx.chunk(eb.num_groups)):
            q = torch.kron(eb.QA[j], eb.QB[j])
            torch.testing.assert_close(torch.kron(kb.QA[j], kb.QB[j]).abs(), q.abs())
            rotated = torch.diagonal(q.T @ ref[part[:, None], part[None, :]] @ q)
            torch.testing.assert_close(eb.eigenvalues[j].reshape(-1), rotated, atol=1e-10,
                                       rtol=1e-8)
    assert seen


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac", "diag"])
@pytest.mark.parametrize("name", ["dwsep", "grouped1d", "mobilenet"])
def test_grouped_glm_predictive_matches_dense(name, structure):
    model, x, subset = _case(name)
    y = _labels(model, x)
    la = Laplace(model, "classification", subset=subset, structure=structure,
                 prior_precision=0.3)
    la.fit(_batches(x, y), progress=False)
    xt = x[:3]
    js = _jacobian(la.params, xt).reshape(3 * la.functional(xt)[0].shape[-1], -1)
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    _, joint = la.functional(xt, joint=True)
    torch.testing.assert_close(joint, ref, atol=1e-11, rtol=1e-8)
    _, per_input = la.functional(xt)
    c = per_input.shape[-1]
    torch.testing.assert_close(per_input, torch.stack(
        [ref[i * c:(i + 1) * c, i * c:(i + 1) * c] for i in range(3)]), atol=1e-11, rtol=1e-8)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_grouped_per_tensor_prior_and_state(structure):
    """A per-tensor prior (weight and bias of a grouped conv: a shift of the bias column of
    every group) is exact; the fitted posterior survives ``state_dict``."""
    model, x = _dwsep()
    y = _labels(model, x)
    la = Laplace(model, "classification", structure=structure)
    la.fit(_batches(x, y), progress=False)
    prior = torch.linspace(0.2, 2.0, la.num_tensors, dtype=DT)
    la.prior_precision = prior
    dense = la.curvature.to_dense() + torch.diag(la.prior_diagonal())
    torch.testing.assert_close(la.posterior_precision.to_dense(), dense)
    torch.testing.assert_close(la.posterior_precision.logdet(), torch.logdet(dense))
    xt = x[:2]
    js = _jacobian(la.params, xt).reshape(6, -1)
    _, joint = la.functional(xt, joint=True)
    torch.testing.assert_close(joint, js @ torch.linalg.solve(dense, js.T), atol=1e-11,
                               rtol=1e-8)
    other = Laplace(model, "classification", structure=structure)
    other.load_state_dict(la.state_dict())
    torch.testing.assert_close(other.posterior_precision.to_dense(), dense)


def test_kfac_filter_with_grouped_conv():
    """The K-FAC continual filter sums ``KroneckerBatch`` terms and counts their stored
    bases and eigenvalues (no dense block formed)."""
    from bayescurv.continual import KFACFilter

    model, x = _dwsep()
    y = _labels(model, x)
    filt = KFACFilter(model, "classification", prior_precision=0.3)
    filt.predict()
    filt.update(_batches(x, y))
    term = compute(model, "classification", _batches(x, y), structure="kfac").matrix
    n = filt.num_params
    torch.testing.assert_close(filt.to_dense(), 0.3 * torch.eye(n, dtype=DT) + term.to_dense())
    stored = n
    for b in term.blocks:
        if isinstance(b, (KroneckerEigen, KroneckerBatch)):
            stored += sum(q.numel() for q in b.eigenbases if q is not None)
            stored += b.base_eigenvalues.numel()
        else:
            stored += b.size ** 2
    assert filt.memory_bytes() == 8 * stored


def test_preflight_counts_grouped_factors_exactly():
    model, x = _mobilenet()
    pset = select(model, "all")
    kfac = compute(model, "classification", _batches(x, _labels(model, x)),
                   structure="kfac").matrix
    stored = 0
    for b in kfac.blocks:
        if isinstance(b, KroneckerBatch):
            p, q = b.factor_sizes
            stored += b.num_groups * (p * p + q * q)
        elif isinstance(b, KroneckerEigen):
            p, q = b.factor_sizes
            stored += p * p + q * q
        else:
            stored += b.size ** 2
    assert preflight._kfac_entries(pset) == stored


# ------------------------------------------------------------------------------------------
# Hugging Face Conv1D (GPT-2)
# ------------------------------------------------------------------------------------------
def _gpt2(linear: bool = False):
    """Tiny GPT-2 sequence classifier in float64, eval mode; ``linear=True`` replaces every
    ``Conv1D`` by the equivalent ``nn.Linear`` (weight transposed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                                  num_labels=3, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=1)
    model = transformers.GPT2ForSequenceClassification(cfg).to(DT).eval()
    with torch.no_grad():
        for m in model.modules():  # non-zero biases, away from the 0.02 init scale
            if type(m).__name__ == "Conv1D":
                m.weight.normal_(0, 0.4)
                m.bias.normal_(0, 0.3)
    if linear:
        for name, m in list(model.named_modules()):
            if type(m).__name__ == "Conv1D":
                lin = nn.Linear(m.nx, m.nf).to(DT)
                with torch.no_grad():
                    lin.weight.copy_(m.weight.T)
                    lin.bias.copy_(m.bias)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
    ids = torch.randint(2, 20, (sum(SIZES), 6), generator=_gen(1))
    mask = torch.ones_like(ids)
    ids[0, 4:] = 0  # padded sequences: the classifier reads the last non-pad token
    mask[0, 4:] = 0
    ids[5, 5:] = 0
    mask[5, 5:] = 0
    y = torch.randint(0, 3, (len(ids),), generator=_gen(2))
    return model, {"input_ids": ids, "attention_mask": mask}, y


GPT2_CONV1D = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
               "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
GPT2_SUBSETS = {"weights": [m + ".weight" for m in GPT2_CONV1D],
                "weights+bias": [m + ".weight" for m in GPT2_CONV1D[:2]]
                + [GPT2_CONV1D[2], GPT2_CONV1D[3] + ".bias"]}


def test_hf_conv1d_is_linear_like_without_importing_transformers():
    model, _, _ = _gpt2()
    conv = model.get_submodule(GPT2_CONV1D[0])
    lay = layers.linear_layout(conv)
    assert lay == layers.LinearLayout(24, 8, transposed=True)
    assert layers.linear_layout(nn.Module()) is None
    import inspect

    assert "import transformers" not in inspect.getsource(layers)  # duck typing only


@pytest.mark.parametrize("subset", list(GPT2_SUBSETS))
def test_hf_conv1d_full_and_diag_exact(subset):
    model, x, y = _gpt2()
    names = GPT2_SUBSETS[subset]
    data = _batches(x, y)
    pset = select(model, names, output_key="logits")
    ref = _dense_ggn(pset, data)
    kw = dict(subset=names, output_key="logits", y_key="labels")
    full = compute(model, "classification", data, structure="full", **kw)
    diag = compute(model, "classification", data, structure="diag", **kw)
    torch.testing.assert_close(full.matrix.to_dense(), ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(diag.matrix.diagonal(), ref.diagonal(), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac", "diag"])
@pytest.mark.parametrize("subset", list(GPT2_SUBSETS))
def test_hf_conv1d_glm_predictive_matches_dense(structure, subset):
    model, x, y = _gpt2()
    la = Laplace(model, "classification", subset=GPT2_SUBSETS[subset], structure=structure,
                 prior_precision=0.5, output_key="logits")
    la.fit(_batches(x, y), progress=False, y_key="labels")
    xt = {k: v[:3] for k, v in x.items()}
    js = _jacobian(la.params, xt).reshape(9, -1)
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    _, joint = la.functional(xt, joint=True)
    torch.testing.assert_close(joint, ref, atol=1e-11, rtol=1e-8)


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac"])
def test_hf_conv1d_factors_equal_those_of_nn_linear(structure):
    """The same network with ``nn.Linear`` layers: identical Kronecker blocks (factors in
    the ``W̃ = [W | b]`` layout), only the flat positions of the weight are transposed."""
    names = GPT2_SUBSETS["weights+bias"]
    out = []
    for linear in (False, True):
        model, x, y = _gpt2(linear)
        curv = compute(model, "classification", _batches(x, y), structure=structure,
                       subset=names, output_key="logits", y_key="labels")
        out.append((model, curv.matrix, select(model, names, output_key="logits")))
    (_, conv, pconv), (_, lin, plin) = out
    kinds = [type(b) for b in conv.blocks]
    assert kinds == [type(b) for b in lin.blocks] == [KroneckerEigen] * 3 + [Dense]  # bias only
    for bc, bl in zip(conv.blocks, lin.blocks):
        torch.testing.assert_close(bc.to_dense(), bl.to_dense(), atol=1e-13, rtol=1e-11)
        if isinstance(bc, KroneckerEigen) and bc.factor_eigenvalues is not None:
            for ec, el in zip(bc.factor_eigenvalues, bl.factor_eigenvalues):
                torch.testing.assert_close(ec, el, atol=1e-13, rtol=1e-11)
    # flat position of every Conv1D entry in the Linear model's flat vector
    perm = []
    for name, p in zip(pconv.names, pconv.params):
        sl = plin.slice_of(plin.names.index(name))
        idx = torch.arange(sl.start, sl.stop)
        perm.append(idx.reshape(p.shape[1], p.shape[0]).T.reshape(-1) if p.dim() == 2 else idx)
    perm = torch.cat(perm)
    torch.testing.assert_close(conv.to_dense(), lin.to_dense()[perm][:, perm], atol=1e-13,
                               rtol=1e-11)


def test_register_linear_rule():
    """A user's linear-in-disguise layer becomes Kronecker-factored once registered."""

    class InOut(nn.Module):  # y = x W + b with W stored (in, out)
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(i, o, dtype=DT))
            self.bias = nn.Parameter(torch.randn(o, dtype=DT))

        def forward(self, x):
            return x @ self.weight + self.bias

    torch.manual_seed(0)
    model = nn.Sequential(InOut(3, 4), nn.Tanh(), nn.Linear(4, 2).to(DT))
    x = torch.randn(1, 3, dtype=DT)
    data = [(x, torch.tensor([1]))]
    before = len(layers.LINEAR_RULES)
    layers.register_linear(InOut, transposed=True)
    try:
        curv = compute(model, "classification", data, structure="kfac",
                       unknown_layers="error").matrix
        assert all(isinstance(b, KroneckerEigen) for b in curv.blocks)
        ref = _dense_ggn(select(model, "all"), data)
        torch.testing.assert_close(curv.to_dense(), ref * _group_mask(curv), atol=1e-10,
                                   rtol=1e-8)
    finally:
        del layers.LINEAR_RULES[before:]
