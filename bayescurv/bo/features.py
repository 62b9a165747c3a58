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


class FourierFeatures(nn.Module):
    """``(..., d) -> (..., num_features)`` random Fourier features (frozen buffers).

    Args:
        input_dim: ``d``.
        num_features: ``F``.
        lengthscale: RBF lengthscale in input units (a float, or ``d`` values for ARD).
        generator: draws the frequencies and phases (reproducible features).
    """

    def __init__(self, input_dim: int, num_features: int, lengthscale: float | Tensor = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if input_dim < 1 or num_features < 1:
            raise ValueError("input_dim and num_features must be positive")
        ls = torch.as_tensor(lengthscale, dtype=torch.get_default_dtype())
        if (ls <= 0).any() or ls.numel() not in (1, input_dim):
            raise ValueError(f"lengthscale must be positive, one value or {input_dim} values")
        omega = torch.randn(num_features, input_dim, generator=generator)
        self.register_buffer("weight", omega / ls.reshape(1, -1))
        self.register_buffer("phase", 2 * math.pi * torch.rand(num_features, generator=generator))
        self.scale = math.sqrt(2.0 / num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.cos(x @ self.weight.T + self.phase)

    def extra_repr(self) -> str:
        return f"input_dim={self.weight.shape[1]}, num_features={self.weight.shape[0]}"


def fourier_network(input_dim: int, num_outputs: int, num_features: int = 512,
                    lengthscale: float | Tensor = 0.25, seed: int | None = None) -> nn.Sequential:
    """:class:`FourierFeatures` followed by a trainable ``Linear(F, m)`` head."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return nn.Sequential(FourierFeatures(input_dim, num_features, lengthscale, gen),
                         nn.Linear(num_features, num_outputs))
