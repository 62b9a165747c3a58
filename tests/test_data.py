"""Tests of the offline data sets in :mod:`bayescurv.data`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bayescurv import data
from bayescurv.errors import InvalidArgumentError, ShapeError


@pytest.fixture(scope="module")
def split():
    pytest.importorskip("sklearn")
    return data.load_digits_split()


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------
def test_digits_shapes_ranges_and_dtypes(split):
    assert split.x_train.shape == (1347, 64) and split.x_test.shape == (450, 64)
    assert split.y_train.shape == (1347,) and split.y_test.shape == (450,)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.long
    x = torch.cat([split.x_train, split.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    # intensities are k/16 for integer k
    assert torch.equal(x * 16, (x * 16).round())
    assert set(torch.cat([split.y_train, split.y_test]).tolist()) == set(range(10))
    assert split.num_features == 64 and split.num_classes == 10
    d64 = data.load_digits_split(dtype=torch.float64)
    assert d64.x_train.dtype == torch.float64
    torch.testing.assert_close(d64.x_train.float(), split.x_train)


def test_digits_split_partitions_the_data_stratified(split):
    from sklearn.datasets import load_digits

    full = torch.as_tensor(load_digits().data, dtype=torch.float64) / 16
    both = torch.cat([split.x_train, split.x_test]).double()
    # same rows, each once: compare the sorted row keys
    w = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(torch.sort(both @ w).values, torch.sort(full @ w).values)
    counts_train = torch.bincount(split.y_train, minlength=10).double()
    counts_test = torch.bincount(split.y_test, minlength=10).double()
    expected = (counts_train + counts_test) * 0.25
    assert (counts_test - expected).abs().max() <= 1.0


def test_digits_split_deterministic(split):
    again = data.load_digits_split(seed=0)
    other = data.load_digits_split(seed=1)
    assert torch.equal(again.x_train, split.x_train) and torch.equal(again.y_test, split.y_test)
    assert not torch.equal(other.x_train, split.x_train)
    with pytest.raises(InvalidArgumentError):
        data.load_digits_split(test_size=1.5)


def test_permuted_digits(split):
    x = split.x_test
    xp = data.permuted_digits(x, seed=0)
    assert xp.shape == x.shape and not torch.equal(xp, x)
    # pixel multiset per image preserved
    assert torch.equal(torch.sort(xp, -1).values, torch.sort(x, -1).values)
    assert torch.equal(data.permuted_digits(x, seed=0), xp)
    assert not torch.equal(data.permuted_digits(x, seed=1), xp)
    # one permutation for all images: it moves column j to the same place in every row
    probe = torch.arange(64.0) + 100.0 * torch.arange(3.0).unsqueeze(-1)
    pp = data.permuted_digits(probe, seed=0)
    assert torch.equal(pp - pp[:1], probe - probe[:1])
    perm = pp[0].long()
    torch.testing.assert_close(xp, x[:, perm])
    with pytest.raises(ShapeError):
        data.permuted_digits(x[:, :10])


def test_rotated_digits(split):
    x = split.x_test[:20]
    img = x.reshape(-1, 8, 8)
    torch.testing.assert_close(data.rotated_digits(x, 0.0), x)
    # counter-clockwise quarter turns are exact pixel permutations
    assert torch.equal(data.rotated_digits(x, 90.0).reshape(-1, 8, 8), torch.rot90(img, 1, (1, 2)))
    assert torch.equal(data.rotated_digits(x, 180.0).reshape(-1, 8, 8), torch.rot90(img, 2, (1, 2)))
    r = data.rotated_digits(x, (-60.0, 60.0), seed=3)
    assert r.shape == x.shape and torch.equal(r, data.rotated_digits(x, (-60.0, 60.0), seed=3))
    assert not torch.equal(r, data.rotated_digits(x, (-60.0, 60.0), seed=4))
    assert r.min() >= 0.0 and r.max() <= 1.0 + 1e-6


def test_loaders(split):
    train, test = data.loaders(split, batch_size=100, seed=0)
    xb, yb = next(iter(train))
    assert xb.shape == (100, 64) and yb.shape == (100,)
    # reproducible shuffling for a fresh loader, shuffled, and a new order every epoch
    fresh = [data.loaders(split, batch_size=100, seed=0)[0] for _ in range(2)]
    ys1, ys2 = (torch.cat([y for _, y in loader]) for loader in fresh)
    assert torch.equal(ys1, ys2) and not torch.equal(ys1, split.y_train)
    assert not torch.equal(torch.cat([y for _, y in fresh[0]]), ys1)
    assert not torch.equal(torch.cat([y for _, y in data.loaders(split, 100, seed=1)[0]]), ys1)
    # the test loader is in order and complete
    assert torch.equal(torch.cat([x for x, _ in test]), split.x_test)
    plain, _ = data.loaders(split, batch_size=100, shuffle_train=False)
    assert torch.equal(torch.cat([y for _, y in plain]), split.y_train)


# ---------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------
def test_sinusoid():
    d = data.sinusoid()
    assert d.x_train.shape == d.y_train.shape == (150, 1)
    assert d.x_test.shape == d.y_test.shape == d.f_test.shape == (500, 1)
    assert d.x_train.dtype == torch.float32
    assert d.x_train.min() >= 0 and d.x_train.max() <= 8
    assert d.x_test[0, 0] == -5.0 and d.x_test[-1, 0] == 13.0
    torch.testing.assert_close(d.f_test, torch.sin(d.x_test))
    again = data.sinusoid()
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_train, d.y_train)
    assert not torch.equal(data.sinusoid(seed=1).x_train, d.x_train)
    # the noise has the requested scale and the inputs are uniform on (0, 8)
    big = data.sinusoid(n=20_000, noise=0.3, dtype=torch.float64)
    resid = big.y_train - torch.sin(big.x_train)
    assert abs(resid.std().item() - 0.3) < 0.01 and abs(resid.mean().item()) < 0.01
    assert abs(big.x_train.mean().item() - 4.0) < 0.06
    torch.testing.assert_close(data.sinusoid(noise=0.0).y_train, torch.sin(d.x_train))


def test_toy_regression():
    x, y = data.toy_regression(n=50, in_features=3, out_features=2, seed=0)
    assert x.shape == (50, 3) and y.shape == (50, 2) and x.dtype == torch.float32
    x2, y2 = data.toy_regression(n=50, in_features=3, out_features=2, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y0 = data.toy_regression(n=50, in_features=3, out_features=2, noise=0.0, seed=0)
    assert 0.05 < (y - y0).std() < 0.15


@pytest.mark.parametrize("in_features", [2, 5])
def test_toy_classification(in_features):
    x, y = data.toy_classification(
        n=3000, num_classes=4, seed=0, in_features=in_features, dtype=torch.float64
    )
    assert x.shape == (3000, in_features) and y.shape == (3000,) and y.dtype == torch.long
    assert torch.bincount(y).tolist() == [750] * 4
    x2, y2 = data.toy_classification(
        n=3000, num_classes=4, seed=0, in_features=in_features, dtype=torch.float64
    )
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # blobs: unit spread around distinct centres
    means = torch.stack([x[y == k].mean(0) for k in range(4)])
    stds = torch.stack([x[y == k].std(0) for k in range(4)])
    assert (stds - 1.0).abs().max() < 0.1
    assert torch.cdist(means, means).add(torch.eye(4) * 1e9).min() > 1.0
    if in_features == 2:
        torch.testing.assert_close(
            means.norm(dim=-1), torch.full((4,), 3.0, dtype=torch.float64), rtol=0, atol=0.15
        )
    with pytest.raises(InvalidArgumentError):
        data.toy_classification(num_classes=1)


def test_core_modules_do_not_import_sklearn_or_matplotlib():
    code = (
        "import sys, bayescurv.data, bayescurv.metrics, bayescurv.links; "
        "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
