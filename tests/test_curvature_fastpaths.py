"""Fast paths of the streaming pass (issue 30): closed-form per-sample gradients of norm
layers' affine parameters (:mod:`bayescurv.curvature.norms`) against the generic
``torch.func`` route, and K-FAC factors with the loss columns in several chunks."""

import pytest
import torch
from torch import nn

from bayescurv.curvature import layers, norms


def _bn(cls, c):
    m = cls(c)
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2.0)
    return m.eval()


CASES = [
    ("bn1d-flat", lambda: _bn(nn.BatchNorm1d, 4), (4,)),
    ("bn1d-seq", lambda: _bn(nn.BatchNorm1d, 4), (4, 5)),
    ("bn2d", lambda: _bn(nn.BatchNorm2d, 3), (3, 4, 5)),
    ("bn3d", lambda: _bn(nn.BatchNorm3d, 2), (2, 3, 2, 3)),
    ("layernorm", lambda: nn.LayerNorm(6), (5, 6)),
    ("layernorm-2d", lambda: nn.LayerNorm((3, 4)), (2, 3, 4)),
    ("layernorm-nobias", lambda: nn.LayerNorm(6, bias=False), (6,)),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), (4, 3, 3)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_closed_form_matches_generic(name, make, shape):
    torch.manual_seed(0)
    m = make().double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(3, *shape, dtype=torch.float64)
    g = torch.randn(2, *m(x).shape, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    got = norms.per_sample(m, names, x, g)
    ref = layers.generic_per_sample(m, names, x, g)
    assert got is not None and set(got) == set(ref)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_not_covered_falls_back():
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()  # batch statistics
    x = torch.randn(2, 3, 4, 4)
    assert norms.per_sample(bn, ["weight", "bias"], x, torch.randn(1, *x.shape)) is None
    inorm = nn.InstanceNorm2d(3, affine=True)
    assert norms.per_sample(inorm, ["weight", "bias"], x, torch.randn(1, *x.shape)) is None

    class LayerNorm2d(nn.LayerNorm):  # channels-first, as in ConvNeXt: its own forward
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    ln = LayerNorm2d(3)
    assert norms.per_sample(ln, ["weight", "bias"], x, torch.randn(1, *x.shape)) is None


def test_kfac_live_positions_over_all_column_chunks():
    """Loss columns backpropagated one chunk at a time: a position counts as live when any
    column reaches it, not only the first chunk's. Class 0 has probability exactly 0, so the
    first square-root column vanishes everywhere; one column per chunk must give the factors
    of all columns at once (conv: positions; embedding: row counts)."""
    from bayescurv.curvature import compute

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3)
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 3)
            with torch.no_grad():
                self.head.bias[0] = -1e4  # p_0 = 0 exactly: column 0 of the root is zero

        def forward(self, x):
            return self.head(self.conv(self.emb(x).transpose(1, 2)).mean(-1))

    net = Net().double().eval()
    x = torch.randint(0, 7, (6, 5))
    data = [(x, torch.randint(1, 3, (6,)))]
    whole = compute(net, "classification", data, structure="kfac")
    split = compute(net, "classification", data, structure="kfac", column_chunk=1)
    torch.testing.assert_close(split.matrix.to_dense(), whole.matrix.to_dense())


@pytest.mark.parametrize("structure", ["kfac", "diag", "ekfac"])
def test_sub_batches_equal_one_batch(structure, monkeypatch):
    """When a batch's loss columns do not fit ``GRAD_ELEMENTS`` but fewer data points' would,
    the batch is split (every column of a point at once); when not even one point's fit, the
    columns go in chunks. Both give the curvature of one batched pass."""
    from bayescurv.curvature import compute, engine

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 16, 4)).double().eval()
    net[1].running_mean.normal_()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(10, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (10,), generator=g))]
    ref = compute(net, "classification", data, structure=structure).matrix.to_dense()
    per_point = 2 * 3 * 16 + 4  # conv, BatchNorm and Linear outputs of one data point
    seen = []
    backward = engine.HookCapture.backward

    def spy(self, f, cols, retain=False):
        seen.append(tuple(cols.shape[:2]))
        return backward(self, f, cols, retain)

    monkeypatch.setattr(engine.HookCapture, "backward", spy)
    for budget, shapes in [(4 * per_point * 3, {(4, 3), (4, 1)}), (per_point, {(1, 10)})]:
        monkeypatch.setattr(engine, "GRAD_ELEMENTS", budget)
        seen.clear()
        got = compute(net, "classification", data, structure=structure).matrix.to_dense()
        assert set(seen) == shapes, seen
        torch.testing.assert_close(got, ref)
