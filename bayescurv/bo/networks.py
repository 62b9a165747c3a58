"""The surrogate's network: the default MLP and the ``network=`` argument turned into a module.

The default Fourier-feature network is :func:`~bayescurv.bo.features.fourier_network`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from botorch.exceptions.errors import InputDataError
from torch import nn

from bayescurv.errors import InvalidArgumentError

#: what ``LaplaceModel(network=...)`` accepts: a module, a factory ``(d, m) -> module`` or None
NetworkSpec = nn.Module | Callable[[int, int], nn.Module] | None
#: an isotropic lengthscale grid (unit-cube input units) for ``lengthscales=LENGTHSCALES``
LENGTHSCALES = (0.1, 0.175, 0.25, 0.35, 0.5, 0.7)
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def default_network(
    input_dim: int, num_outputs: int, hidden: tuple[int, ...] = (50, 50),
    activation: str = "silu",
) -> nn.Sequential:
    """MLP ``d -> hidden... -> m`` with ``activation`` between linear layers."""
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"unknown activation {activation!r}; use one of {list(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def make_network(network: NetworkSpec, d: int, m: int, hidden: tuple[int, ...],
                 activation: str, seed: int | None) -> nn.Module:
    """A fresh module from a :data:`NetworkSpec`: a copy of a module, a factory's result, or
    :func:`default_network` for ``None``; ``seed`` seeds torch's global generator first (the
    initialization of factory and default networks)."""
    if seed is not None:
        torch.manual_seed(seed)
    if network is None:
        return default_network(d, m, tuple(hidden), activation)
    if isinstance(network, nn.Module):
        return copy.deepcopy(network)
    if callable(network):
        net = network(d, m)
        if not isinstance(net, nn.Module):
            raise InputDataError(
                f"the network factory must return an nn.Module, got {type(net).__name__}"
            )
        return net
    raise InputDataError(
        f"network must be an nn.Module, a factory (d, m) -> nn.Module or None; got "
        f"{type(network).__name__}"
    )
