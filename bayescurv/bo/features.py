r"""Random Fourier features: the default feature map of the BO surrogate.

:math:`\phi(x) = \sqrt{2/F}\,\cos(\Omega\,(x/\ell) + b)` with frozen
:math:`\Omega_{ij} \sim N(0, 1)` and :math:`b_j \sim U(0, 2\pi)` (Rahimi & Recht, 2007):
:math:`\phi(x)^\top\phi(x') \to \exp(-\|x - x'\|^2/(2\ell^2))` as :math:`F \to \infty`. A
linear layer on top, with the linearized (here: exact) Laplace posterior over it, is then a
sparse-spectrum approximation of a GP with an RBF kernel of lengthscale :math:`\ell`
(Lázaro-Gredilla et al., 2010) whose cost is linear in the number of observations.

Why this default: the NTK of an MLP (ReLU or tanh) is not stationary; its linearized-Laplace
mean extrapolates and its variance grows towards the corners of the search box, so expected
improvement keeps proposing corners (measured in ``docs/bo.md``). Stationary features keep the
predictive calm away from data, as a GP's is. Trained frequencies overfit with the few points
of a BO run (also measured), so they are frozen buffers and the lengthscale is chosen by the
evidence instead (:class:`~bayescurv.bo.LaplaceModel` with ``lengthscales``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayescurv.errors import InvalidArgumentError, ShapeError


class FourierFeatures(nn.Module):
    """``(..., d) -> (..., num_features)`` random Fourier features (frozen buffers).

    Args:
        input_dim: ``d``.
        num_features: ``F``.
        lengthscale: RBF lengthscale in input units (a float, or ``d`` values for ARD).
        generator: draws the frequencies and phases (reproducible features).

    Buffers: ``omega`` (``F x d``, unit-lengthscale frequencies), ``phase`` (``F``) and
    ``lengthscale`` (``d``); :meth:`features` evaluates the map at any lengthscale,
    differentiably (what :func:`~bayescurv.bo.ard.fit_lengthscales` optimizes).
    """

    def __init__(self, input_dim: int, num_features: int, lengthscale: float | Tensor = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if input_dim < 1 or num_features < 1:
            raise InvalidArgumentError(
                f"input_dim and num_features must be positive, got {input_dim} and {num_features}")
        self.register_buffer("omega", torch.randn(num_features, input_dim, generator=generator))
        self.register_buffer("phase", 2 * math.pi * torch.rand(num_features, generator=generator))
        self.register_buffer("lengthscale", torch.ones(input_dim))
        self.set_lengthscale(lengthscale)
        self.scale = math.sqrt(2.0 / num_features)

    def set_lengthscale(self, lengthscale: float | Tensor) -> None:
        """Set the lengthscale (one value, or ``d`` for ARD; positive)."""
        ls = torch.as_tensor(lengthscale, dtype=self.lengthscale.dtype,
                             device=self.lengthscale.device).detach()
        if ls.numel() not in (1, self.lengthscale.numel()):
            raise ShapeError(f"lengthscale must be one value or {self.lengthscale.numel()} "
                             f"values (one per input), got {ls.numel()}")
        if not (ls > 0).all():
            raise InvalidArgumentError(f"lengthscale must be positive, got {ls.tolist()}")
        self.lengthscale.copy_(ls.reshape(-1).expand_as(self.lengthscale))

    @property
    def weight(self) -> Tensor:
        r"""Frequencies :math:`\Omega\,diag(1/\ell)` (``F x d``)."""
        return self.omega / self.lengthscale

    def features(self, x: Tensor, lengthscale: Tensor | None = None) -> Tensor:
        r""":math:`\sqrt{2/F}\cos(\Omega (x/\ell) + b)` at ``lengthscale`` (default: the
        stored one); differentiable in ``x`` and ``lengthscale``."""
        ls = self.lengthscale if lengthscale is None else lengthscale
        return self.scale * torch.cos((x / ls) @ self.omega.T + self.phase)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def extra_repr(self) -> str:
        return f"input_dim={self.omega.shape[1]}, num_features={self.omega.shape[0]}"


def fourier_network(input_dim: int, num_outputs: int, num_features: int = 512,
                    lengthscale: float | Tensor = 0.25, seed: int | None = None) -> nn.Sequential:
    """:class:`FourierFeatures` followed by a trainable ``Linear(F, m)`` head."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return nn.Sequential(FourierFeatures(input_dim, num_features, lengthscale, gen),
                         nn.Linear(num_features, num_outputs))
