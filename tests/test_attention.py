"""``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in every structure, against
dense float64 references (``torch.func``): both layouts, attention masks, the linearized
predictive; unsupported configurations refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.errors import UnsupportedLayerError

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning")  # torch.func references through SDPA

STRUCTURES = ("full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank", "diag+lowrank")


class Net(nn.Module):
    """Self-attention (or a transformer encoder layer), mean pool over tokens, head. Inputs
    ``(B, T, D)``, or ``(T, B, D)`` when ``batch_first=False``."""

    def __init__(self, batch_first: bool, encoder: bool, mask: str | None = None) -> None:
        super().__init__()
        self.batch_first, self.encoder, self.mask = batch_first, encoder, mask
        if encoder:
            self.att = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1,
                                                  batch_first=batch_first)
        else:
            self.att = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        t = x.shape[1] if self.batch_first else x.shape[0]
        kwargs = {}
        if self.mask == "causal":
            kwargs["attn_mask"] = torch.ones(t, t, dtype=torch.bool).triu(1)
        elif self.mask == "padding":  # last token of every sequence padded
            b = x.shape[0] if self.batch_first else x.shape[1]
            pad = torch.zeros(b, t, dtype=torch.bool)
            pad[:, -1] = True
            kwargs["key_padding_mask"] = pad
        if self.encoder:
            y = self.att(x, src_mask=kwargs.get("attn_mask"),
                         src_key_padding_mask=kwargs.get("key_padding_mask"))
        else:
            y = self.att(x, x, x, need_weights=False, **kwargs)[0]
        return self.head(y.mean(1 if self.batch_first else 0))


def _fit(model, structure, batch_first, subset="all"):
    torch.manual_seed(1)
    x = torch.randn(10, 5, 4, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # (T, B, D)
    y = torch.randint(0, 3, (10,))
    dim = 0 if batch_first else 1
    loader = [(x.narrow(dim, 0, 6), y[:6]), (x.narrow(dim, 6, 4), y[6:])]
    la = Laplace(model, "classification", subset=subset, structure=structure,
                 prior_precision=0.5, rank=6, batch_dim=dim)
    return la.fit(loader, progress=False), x, dim


def _jacobian(la, x, dim):
    jac = torch.func.jacrev(lambda v: la.params.functional_call(v, x))(la.params.vector())
    return jac  # (B, C, P)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("encoder", [False, True], ids=["mha", "encoder"])
def test_attention_curvature_and_predictive_match_dense(structure, batch_first, encoder):
    torch.manual_seed(0)
    model = Net(batch_first, encoder).double().eval()
    la, x, dim = _fit(model, structure, batch_first)
    jac = _jacobian(la, x, dim)
    with torch.no_grad():
        p = model(x).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)
    if structure == "full":
        assert torch.allclose(la.curvature.to_dense(), ggn, rtol=1e-9, atol=1e-12)
    if structure in ("diag", "diag+lowrank"):
        assert torch.allclose(la.curvature.diagonal(), ggn.diagonal(), rtol=1e-9, atol=1e-12)
    xs = x.narrow(dim, 0, 4)
    js = jac[:4].reshape(12, -1)
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    _, joint = la.functional(xs, joint=True)
    assert torch.allclose(joint, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mask", ["causal", "padding"])
@pytest.mark.parametrize("encoder", [False, True], ids=["mha", "encoder"])
def test_attention_masks(mask, encoder):
    torch.manual_seed(0)
    model = Net(True, encoder, mask).double().eval()
    la, x, dim = _fit(model, "full", True)
    jac = _jacobian(la, x, dim)
    with torch.no_grad():
        p = model(x).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)
    assert torch.allclose(la.curvature.to_dense(), ggn, rtol=1e-9, atol=1e-12)


def test_out_projection_alone_and_kfac_blocks():
    """``out_proj`` alone (MHA never calls it itself) is exact; K-FAC gives the input
    projection one Kronecker block over ``[in_proj_weight | in_proj_bias]``."""
    torch.manual_seed(0)
    model = Net(True, False).double().eval()
    la, x, dim = _fit(model, "full", True, subset=["att.out_proj", "head"])
    jac = _jacobian(la, x, dim)
    with torch.no_grad():
        p = model(x).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)
    assert torch.allclose(la.curvature.to_dense(), ggn, rtol=1e-9, atol=1e-12)
    la, _, _ = _fit(model, "kfac", True)
    assert [b.factor_sizes for b in la.curvature.blocks][:2] == [(12, 5), (4, 5)]


class Cross(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.att(x, x.flip(1), x.flip(1))[0].mean(1))


@pytest.mark.parametrize("kind,phrase", [
    ("cross", "cross-attention"),
    ("bias_kv", "add_bias_kv"),
    ("kdim", "kdim/vdim"),
    ("train", "training mode"),
])
def test_unsupported_attention_is_refused_by_name(kind, phrase):
    torch.manual_seed(0)
    if kind == "cross":
        model = Cross()
    elif kind == "bias_kv":
        model = Cross(add_bias_kv=True)
    elif kind == "kdim":
        model = Cross(kdim=3, vdim=3)
    else:
        model = Net(True, False)
    model = model.double()
    if kind != "train":
        model.eval()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    if kind == "kdim":
        model.forward = lambda x: model.head(model.att(x, x[..., :3], x[..., :3])[0].mean(1))
    la = Laplace(model, "classification", structure="kfac")
    with pytest.raises(UnsupportedLayerError, match=phrase):
        la.fit([(x, torch.zeros(6, dtype=torch.long))], progress=False)
