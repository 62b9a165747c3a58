"""The network's output layer in closed form: its output gradients are the loss columns
themselves (no backward pass), and for K-FAC, diag and EKFAC the GGN needs no square-root
columns at all (``Σ_b H_b``, ``diag(Qᵀ H_b Q)`` from the likelihood, ``O(B C²)``); and the
pre-flight size check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import compute
from bayescurv.curvature import engine, preflight
from bayescurv.errors import InvalidArgumentError

C = 7


def _case(likelihood):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, C)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, C, (30,)) if likelihood == "classification" else torch.randn(
        30, C, dtype=torch.float64)
    return model, [(x[:17], y[:17]), (x[17:], y[17:])]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "diag", "ekfac", "full",
                                       "lowrank", "diag+lowrank"])
def test_output_layer_matches_the_backward_route(structure, likelihood, monkeypatch):
    model, data = _case(likelihood)

    def no_backward(*args, **kwargs):
        raise AssertionError("the output layer needs no backward pass")

    with monkeypatch.context() as m:
        m.setattr(engine.HookCapture, "backward", no_backward)
        fast = compute(model, likelihood, data, structure=structure, subset="last_layer",
                       rank=4)
    monkeypatch.setattr(engine, "output_layer", lambda *args: None)
    slow = compute(model, likelihood, data, structure=structure, subset="last_layer", rank=4)
    assert torch.allclose(fast.matrix.to_dense(), slow.matrix.to_dense(), rtol=1e-10,
                          atol=1e-12)
    assert fast.loss == pytest.approx(float(slow.loss)) and fast.num_data == slow.num_data


def test_closed_form_output_factor_is_the_summed_hessian():
    """K-FAC of the output layer is ``(Σ_b H_b) ⊗ (1/N) Σ_b ã_b ã_bᵀ`` (exact: no sharing)."""
    model, data = _case("classification")
    curv = compute(model, "classification", data, structure="kfac", subset="last_layer")
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        feats = model[:2](x)
        p = model(x).softmax(-1)
    g = torch.diag(p.sum(0)) - p.T @ p
    a = torch.cat([feats, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ref = torch.kron(g, a.T @ a / len(x))
    assert torch.allclose(curv.matrix.blocks[0].to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_preflight_refuses_an_infeasible_structure(monkeypatch):
    model = nn.Sequential(nn.Linear(512, 1000))
    data = [(torch.randn(4, 512), torch.randint(0, 1000, (4,)))]
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 10 * 2**30)
    with pytest.raises(InvalidArgumentError, match=r"513,000 parameters needs 1\.9\d TB.*'kfac'"):
        compute(model, "classification", data, structure="full")
    compute(model, "classification", data, structure="kfac")  # 9.6 MB: fine


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "kfac-reduce", "ekfac",
                                       "lowrank", "diag+lowrank"])
def test_column_chunks_give_the_same_curvature(structure, monkeypatch):
    """Loss columns sent back one at a time (bounded memory) or all at once: same matrix,
    loss and count; the auto chunk follows ``GRAD_ELEMENTS``. (The low-rank root is a
    streamed truncation, which depends on how rows arrive unless it keeps every direction:
    ``rank >= P`` here.)"""
    torch.manual_seed(0)
    # LayerNorm: its per-sample route calls the module again between chunks (hooks off)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(18),
                          nn.Linear(18, C)).double()
    x = torch.randn(20, 2, 8, dtype=torch.float64)
    data = [(x[:9], torch.randint(0, C, (9,))), (x[9:], torch.randint(0, C, (11,)))]
    rank = 200  # >= P = 190
    whole = compute(model, "classification", data, structure=structure, rank=rank)
    one = compute(model, "classification", data, structure=structure, rank=rank,
                  column_chunk=1)
    monkeypatch.setattr(engine, "GRAD_ELEMENTS", 200)  # auto: a few columns per pass
    auto = compute(model, "classification", data, structure=structure, rank=rank)
    for other in (one, auto):
        assert torch.allclose(other.matrix.to_dense(), whole.matrix.to_dense(), rtol=1e-10,
                              atol=1e-12)
        assert other.num_data == whole.num_data == 20
        assert float(other.loss) == pytest.approx(float(whole.loss))
