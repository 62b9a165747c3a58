r"""Calibration metrics of Gaussian predictions over function values (all grid points of all
test functions pooled): RMSE, Gaussian NLL, CRPS, :math:`\chi^2`, 95 % coverage and the
correlation of the predicted standard deviation with the actual error."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError


def gaussian_crps(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    r"""CRPS of :math:`N(\mu, \sigma^2)` at ``y`` (closed form, Gneiting & Raftery 2007):
    :math:`\sigma\,[z(2\Phi(z) - 1) + 2\varphi(z) - 1/\sqrt\pi]`, :math:`z = (y-\mu)/\sigma`."""
    z = (y - mean) / std
    phi = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return std * (z * (2 * cdf - 1) + 2 * phi - 1 / math.sqrt(math.pi))


def evaluate(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    r"""``rmse``, ``nll`` (mean Gaussian NLL), ``crps`` (mean), ``chi2`` (mean squared
    standardized error, 1 when calibrated), ``coverage95`` (fraction with
    :math:`|y-\mu| \le 1.96\sigma`), ``corr_std_err`` (Pearson correlation of :math:`\sigma`
    with :math:`|y-\mu|`) and ``mean_std``, over all entries of same-shaped tensors."""
    mean, var, y = (t.detach().double().reshape(-1) for t in (mean, var, y))
    if not mean.shape == var.shape == y.shape:
        raise ShapeError("mean, var and y must have the same number of entries")
    if (var <= 0).any():
        raise InvalidArgumentError("predictive variances must be positive")
    std, err = var.sqrt(), y - mean
    z2 = err**2 / var
    a, b = std - std.mean(), err.abs() - err.abs().mean()
    corr = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)
    return {
        "rmse": err.square().mean().sqrt().item(),
        "nll": (0.5 * (math.log(2 * math.pi) + var.log() + z2)).mean().item(),
        "crps": gaussian_crps(mean, std, y).mean().item(),
        "chi2": z2.mean().item(),
        "coverage95": (z2 <= 1.96**2).double().mean().item(),
        "corr_std_err": corr.item(),
        "mean_std": std.mean().item(),
    }


__all__ = ["gaussian_crps", "evaluate"]
