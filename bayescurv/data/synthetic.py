"""Small synthetic data sets generated locally with a seeded ``torch.Generator``.

All data are drawn on the CPU in float64 (so a seed gives the same numbers everywhere) and
then cast to the requested ``dtype`` and ``device``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError


@dataclass
class RegressionData:
    """Training data ``(n, d)``/``(n, 1)``, a test grid ``x_test``, its noise-free targets
    ``f_test`` and noisy targets ``y_test`` (same noise model as the training data)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    f_test: Tensor
    noise: float


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_n(n: int, name: str = "n") -> None:
    if not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {n}")


def _out(t: Tensor, dtype: torch.dtype, device) -> Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def sinusoid(
    n: int = 150,
    noise: float = 0.3,
    seed: int = 0,
    n_test: int = 500,
    test_range: tuple[float, float] = (-5.0, 13.0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RegressionData:
    r"""1-d regression: :math:`x \sim U(0, 8)` ``(n, 1)``,
    :math:`y = \sin x + \epsilon`, :math:`\epsilon \sim N(0, \text{noise}^2)` ``(n, 1)``;
    the test inputs are ``n_test`` equally spaced points over ``test_range`` (by default
    reaching well outside the training interval, to show growing uncertainty)."""
    _check_n(n)
    _check_n(n_test, "n_test")
    if noise < 0:
        raise InvalidArgumentError(f"noise must be non-negative, got {noise}")
    g = _gen(seed)
    x = 8.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    y = torch.sin(x) + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_test = torch.linspace(*test_range, n_test, dtype=torch.float64).unsqueeze(-1)
    f_test = torch.sin(x_test)
    y_test = f_test + noise * torch.randn(n_test, 1, generator=g, dtype=torch.float64)
    return RegressionData(
        *(_out(t, dtype, device) for t in (x, y, x_test, y_test, f_test)), noise=float(noise)
    )


def toy_regression(
    n: int = 100,
    in_features: int = 2,
    out_features: int = 1,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``(x, y)`` with :math:`x \sim N(0, I)` ``(n, in_features)`` and a smooth nonlinear
    target :math:`y = \tanh(x W_1) W_2 + 0.5\, x W_3 + \epsilon` ``(n, out_features)``,
    :math:`\epsilon \sim N(0, \text{noise}^2)`, with random weights drawn from ``seed``."""
    _check_n(n)
    _check_n(in_features, "in_features")
    _check_n(out_features, "out_features")
    g = _gen(seed)
    hidden = 8
    w1 = torch.randn(in_features, hidden, generator=g, dtype=torch.float64)
    w2 = torch.randn(hidden, out_features, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    w3 = torch.randn(in_features, out_features, generator=g, dtype=torch.float64)
    x = torch.randn(n, in_features, generator=g, dtype=torch.float64)
    f = torch.tanh(x @ w1) @ w2 + 0.5 * x @ w3
    y = f + noise * torch.randn(n, out_features, generator=g, dtype=torch.float64)
    return _out(x, dtype, device), _out(y, dtype, device)


def toy_classification(
    n: int = 200,
    num_classes: int = 3,
    seed: int = 0,
    in_features: int = 2,
    spread: float = 1.0,
    distance: float = 3.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gaussian blobs: ``(x, y)`` with balanced labels ``y`` ``(n,)`` (long; class
    :math:`k` has :math:`\lfloor n/K \rfloor` or one more samples, in random order) and
    :math:`x = c_y + \text{spread} \cdot N(0, I)` ``(n, in_features)``. In 2-d the centres
    :math:`c_k` lie evenly on a circle of radius ``distance``; otherwise they are drawn as
    ``distance`` times a standard normal vector."""
    _check_n(n)
    _check_n(in_features, "in_features")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgumentError(f"num_classes must be an integer >= 2, got {num_classes}")
    g = _gen(seed)
    if in_features == 2:
        phi = 2 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
        centres = distance * torch.stack([torch.cos(phi), torch.sin(phi)], -1)
    else:
        centres = distance * torch.randn(num_classes, in_features, generator=g, dtype=torch.float64)
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    x = centres[y] + spread * torch.randn(n, in_features, generator=g, dtype=torch.float64)
    return _out(x, dtype, device), y.to(device=device)


__all__ = ["RegressionData", "sinusoid", "toy_regression", "toy_classification"]
