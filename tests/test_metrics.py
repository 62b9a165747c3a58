"""Tests of :mod:`bayescurv.metrics` against scikit-learn, scipy and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayescurv import metrics
from bayescurv.errors import EmptyDataError, InvalidArgumentError, ShapeError

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_classification(n: int = 300, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2.0 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, c, (n,), generator=g)
    # make the predictions informative: the true class gets a boost on half the samples
    boost = torch.zeros(n, c, dtype=torch.float64)
    boost[torch.arange(n // 2), y[: n // 2]] = 3.0
    probs = torch.softmax(probs.log() + boost, -1)
    return probs, y


# ---------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------
def test_accuracy_and_nll_match_sklearn():
    probs, y = _random_classification()
    assert metrics.accuracy(probs, y) == pytest.approx(
        sklearn_metrics.accuracy_score(y.numpy(), probs.argmax(-1).numpy())
    )
    assert metrics.nll(probs, y) == pytest.approx(
        sklearn_metrics.log_loss(y.numpy(), probs.numpy(), labels=list(range(5))), rel=1e-10
    )


def test_binary_probabilities():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(200, generator=g, dtype=torch.float64)
    y = torch.bernoulli(p, generator=g).long()
    assert metrics.accuracy(p, y) == pytest.approx(
        sklearn_metrics.accuracy_score(y.numpy(), (p > 0.5).long().numpy())
    )
    assert metrics.nll(p, y) == pytest.approx(
        sklearn_metrics.log_loss(y.numpy(), p.numpy()), rel=1e-10
    )
    # (N, 1) is read like (N,)
    assert metrics.nll(p[:, None], y) == metrics.nll(p, y)
    assert metrics.ece(p, y) == metrics.ece(torch.stack([1 - p, p], -1), y)


def test_nll_clamps_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    y = torch.tensor([1, 0])
    expected = 0.5 * (-math.log(1e-12) - math.log(0.5))
    assert metrics.nll(probs, y) == pytest.approx(expected, rel=1e-6)


def test_ece_hand_constructed():
    # Two samples at confidence 0.9 (one correct), two at 0.6 (both correct):
    # ECE = 0.5 |0.5 - 0.9| + 0.5 |1.0 - 0.6| = 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = torch.tensor([0, 1, 1, 0])
    assert metrics.ece(probs, y) == pytest.approx(0.4)
    # With a single bin the gaps cancel: |3/4 - 0.75| = 0.
    assert metrics.ece(probs, y, num_bins=1) == pytest.approx(0.0, abs=1e-12)
    # Perfectly confident and right: zero; confident and wrong: one.
    onehot = torch.eye(3)
    assert metrics.ece(onehot, torch.arange(3)) == 0.0
    assert metrics.ece(onehot, torch.tensor([1, 2, 0])) == pytest.approx(1.0)


def test_ece_bins_are_right_closed():
    # confidence 0.5 with 2 bins lies in (0, 0.5]; 0.75 in (0.5, 1].
    d = metrics.reliability_diagram(
        torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]), num_bins=2
    )
    assert d["count"].tolist() == [1.0, 1.0]
    assert d["confidence"].tolist() == [0.5, 0.75]
    assert d["accuracy"].tolist() == [1.0, 1.0]
    assert d["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)


def _ece_loop(probs: np.ndarray, y: np.ndarray, num_bins: int) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, num_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            total += inb.mean() * abs((pred[inb] == y[inb]).mean() - conf[inb].mean())
    return total


def test_ece_and_reliability_diagram_against_loop():
    probs, y = _random_classification(n=500, seed=2)
    for bins in (1, 10, 15):
        assert metrics.ece(probs, y, bins) == pytest.approx(
            _ece_loop(probs.numpy(), y.numpy(), bins), abs=1e-12
        )
    d = metrics.reliability_diagram(probs, y, 10)
    assert d["count"].sum() == 500 and d["num_samples"] == 500
    assert set(d) >= {"confidence", "accuracy", "count", "bin_edges", "ece"}
    assert d["bin_edges"].shape == (11,)
    nonempty = d["count"] > 0
    assert (d["confidence"][nonempty] > d["bin_edges"][:-1][nonempty]).all()
    assert (d["confidence"][nonempty] <= d["bin_edges"][1:][nonempty]).all()


def test_auroc_matches_sklearn_with_and_without_ties():
    g = torch.Generator().manual_seed(3)
    for scores_in, scores_out in [
        (torch.randn(100, generator=g), torch.randn(80, generator=g) + 0.7),
        # integer scores: many ties, within and across the two groups
        (
            torch.randint(0, 5, (60,), generator=g).float(),
            torch.randint(2, 7, (70,), generator=g).float(),
        ),
    ]:
        labels = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
        ref = sklearn_metrics.roc_auc_score(labels, np.r_[scores_in.numpy(), scores_out.numpy()])
        assert metrics.auroc(scores_in, scores_out) == pytest.approx(ref, abs=1e-12)


def test_auroc_extremes_and_ties():
    a = torch.tensor([0.1, 0.2, 0.3])
    b = torch.tensor([0.5, 0.9])
    assert metrics.auroc(a, b) == 1.0
    assert metrics.auroc(b, a) == 0.0
    assert metrics.auroc(torch.ones(4), torch.ones(7)) == 0.5
    # one tie out of four pairs: (3 + 0.5) / 4
    assert metrics.auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.875


def test_max_prob_and_entropy():
    probs, _ = _random_classification(n=50, c=4)
    assert metrics.max_prob(probs) == pytest.approx(probs.max(-1).values.mean().item())
    assert metrics.max_prob(probs, reduction="none").shape == (50,)
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.testing.assert_close(
        metrics.entropy(probs), torch.as_tensor(scipy_stats.entropy(probs.numpy(), axis=1))
    )
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(metrics.entropy(uniform), torch.full((3,), math.log(4)))
    assert metrics.entropy(torch.eye(3), reduction="mean") == 0.0
    assert metrics.entropy(torch.tensor([0.5, 0.5]), reduction="sum") == pytest.approx(
        2 * math.log(2)
    )
    with pytest.raises(InvalidArgumentError):
        metrics.entropy(probs, reduction="max")


# ---------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------
def test_gaussian_nll_and_rmse():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(40, 3, generator=g, dtype=torch.float64)
    var = torch.rand(40, 3, generator=g, dtype=torch.float64) + 0.1
    y = mean + var.sqrt() * torch.randn(40, 3, generator=g, dtype=torch.float64)
    ref = -scipy_stats.norm.logpdf(y.numpy(), mean.numpy(), var.sqrt().numpy()).mean()
    assert metrics.gaussian_nll(mean, var, y) == pytest.approx(ref, rel=1e-12)
    # covariances: the diagonal is used
    cov = torch.diag_embed(var) + 0.01
    assert metrics.gaussian_nll(mean, cov, y) == pytest.approx(
        metrics.gaussian_nll(mean, torch.diagonal(cov, dim1=-2, dim2=-1), y)
    )
    # (N,) inputs
    assert metrics.gaussian_nll(mean[:, 0], var[:, 0], y[:, 0]) == pytest.approx(
        -scipy_stats.norm.logpdf(
            y[:, 0].numpy(), mean[:, 0].numpy(), var[:, 0].sqrt().numpy()
        ).mean()
    )
    assert metrics.rmse(mean, y) == pytest.approx(
        math.sqrt(sklearn_metrics.mean_squared_error(y.numpy(), mean.numpy()))
    )
    with pytest.raises(InvalidArgumentError):
        metrics.gaussian_nll(mean, torch.zeros_like(var), y)


# ---------------------------------------------------------------------------------------
# validation and plotting
# ---------------------------------------------------------------------------------------
def test_invalid_inputs():
    probs, y = _random_classification(n=10)
    with pytest.raises(ShapeError):
        metrics.accuracy(probs, y[:5])
    with pytest.raises(ShapeError):
        metrics.nll(probs, y + 5)
    with pytest.raises(EmptyDataError):
        metrics.accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(EmptyDataError):
        metrics.auroc(torch.empty(0), torch.ones(3))
    with pytest.raises(InvalidArgumentError):
        metrics.ece(probs, y, num_bins=0)


def test_plot_reliability_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    probs, y = _random_classification()
    diagrams = {
        "MAP": metrics.reliability_diagram(probs, y),
        "tempered": metrics.reliability_diagram(torch.softmax(probs.log() / 2, -1), y),
    }
    out = metrics.plot_reliability(diagrams, tmp_path / "rel.png")
    data = (tmp_path / "rel.png").read_bytes()
    assert out == str(tmp_path / "rel.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_reliability_labels_bins_with_their_counts(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    probs, y = _random_classification()
    d = metrics.reliability_diagram(probs, y)
    labels = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, yy, s, **kw: labels.append(s) or real(
        self, x, yy, s, **kw))
    metrics.plot_reliability({"MAP": d}, tmp_path / "rel.png")
    counts = [str(int(n)) for n in d["count"] if n > 0]
    assert labels == counts and sum(map(int, labels)) == len(y)
