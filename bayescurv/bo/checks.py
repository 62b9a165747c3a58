"""BoTorch-style validation of the tensors a surrogate receives.

The errors are BoTorch's (``InputDataError``, ``BotorchTensorDimensionError``), as every
BoTorch model raises them: acquisition code and users catch those types at this boundary.
The model's own options are checked with the library's errors (:func:`check_options`).
"""

from __future__ import annotations

import math

import torch
from botorch.exceptions.errors import BotorchTensorDimensionError, InputDataError
from torch import Tensor, nn

from bayescurv.errors import InvalidArgumentError


def check_inputs(X: Tensor, d: int, dtype: torch.dtype, what: str = "X") -> None:
    """BoTorch-style validation of a ``batch x q x d`` input tensor."""
    if not torch.is_tensor(X):
        raise InputDataError(f"{what} must be a tensor, got {type(X).__name__}")
    if X.dim() < 2 or X.shape[-1] != d:
        raise BotorchTensorDimensionError(
            f"{what} must have shape batch_shape x q x {d}, got {tuple(X.shape)}"
        )
    if X.dtype != dtype:
        raise InputDataError(
            f"Expected {what} to have the model's dtype {dtype}, got {X.dtype}; "
            f"convert with {what}.to(dtype)"
        )
    if torch.isnan(X).any():
        raise InputDataError(f"{what} contains NaN values.")


def check_observations(X: Tensor, Y: Tensor, d: int, m: int, dtype: torch.dtype) -> None:
    """Observations to condition on: ``X`` ``batch x n' x d`` (:func:`check_inputs`) and ``Y``
    ``batch' x n' x m`` of the same dtype, without NaN."""
    check_inputs(X, d, dtype)
    if not torch.is_tensor(Y) or Y.dtype != X.dtype:
        raise InputDataError(
            f"Expected all inputs to share the same dtype. Got {X.dtype} for X and "
            f"{getattr(Y, 'dtype', type(Y))} for Y."
        )
    if Y.dim() < 2 or Y.shape[-1] != m or Y.shape[-2] != X.shape[-2]:
        raise BotorchTensorDimensionError(
            f"Y must have shape batch_shape x {X.shape[-2]} x {m} "
            f"(an explicit output dimension), got {tuple(Y.shape)}"
        )
    if torch.isnan(Y).any():
        raise InputDataError("Input data contains NaN values (Y).")


def check_training_data(train_X: Tensor, train_Y: Tensor) -> None:
    """BoTorch conventions for training data: tensors, ``n x d`` / ``n x m``, one dtype and
    device, floating point, finite."""
    if not (torch.is_tensor(train_X) and torch.is_tensor(train_Y)):
        raise InputDataError("train_X and train_Y must be tensors")
    if train_X.dim() != train_Y.dim():
        if train_X.dim() - train_Y.dim() == 1 and train_X.shape[:-1] == train_Y.shape:
            raise BotorchTensorDimensionError(
                "An explicit output dimension is required for targets. Expected Y with "
                f"dimension {train_X.dim()} (got {train_Y.dim()}); use train_Y.unsqueeze(-1)"
            )
        raise BotorchTensorDimensionError(
            f"Expected X and Y to have the same number of dimensions (got X with dimension "
            f"{train_X.dim()} and Y with dimension {train_Y.dim()})."
        )
    if train_X.dim() != 2:
        raise BotorchTensorDimensionError(
            "LaplaceModel does not support batched training data (batch_shape x n x d): "
            "it takes train_X n x d and train_Y n x m, got "
            f"{tuple(train_X.shape)} and {tuple(train_Y.shape)}. Fit one model per batch "
            "element (e.g. combined with botorch.models.ModelList)."
        )
    if train_X.shape[0] != train_Y.shape[0]:
        raise BotorchTensorDimensionError(
            f"train_X has {train_X.shape[0]} points but train_Y has {train_Y.shape[0]}"
        )
    if train_X.shape[0] == 0:
        raise InputDataError("no training data: train_X has 0 rows")
    if not (train_X.is_floating_point() and train_Y.is_floating_point()):
        raise InputDataError("train_X and train_Y must be floating-point tensors")
    if train_X.dtype != train_Y.dtype:
        raise InputDataError(
            "Expected all inputs to share the same dtype. Got "
            f"{train_X.dtype} for X and {train_Y.dtype} for Y."
        )
    if train_X.device != train_Y.device:
        raise InputDataError(
            f"train_X is on {train_X.device} but train_Y on {train_Y.device}"
        )
    for name, t in (("train_X", train_X), ("train_Y", train_Y)):
        if torch.isnan(t).any():
            raise InputDataError(f"Input data contains NaN values ({name}).")
        if torch.isinf(t).any():
            raise InputDataError(f"Input data contains infinite values ({name}).")


def check_output_indices(idcs: list[int], m: int) -> list[int]:
    """``idcs`` as non-negative output indices (negative ones count from the end); a
    ``BotorchTensorDimensionError`` when empty or out of range for ``m`` outputs."""
    idcs = [int(i) for i in idcs]
    if not idcs or min(idcs) < -m or max(idcs) >= m:
        raise BotorchTensorDimensionError(f"output indices {idcs} out of range for {m} outputs")
    return [i % m for i in idcs]


def check_options(**options) -> None:
    """Numeric options of :class:`~bayescurv.bo.LaplaceModel`: counts are positive integers
    (``steps``, ``marglik_steps``, ``rounds``, ``refine_steps`` may be 0), scales are finite
    and positive. Raises :class:`~bayescurv.errors.InvalidArgumentError` naming the option."""
    may_be_zero = ("steps", "marglik_steps", "refine_steps", "rounds", "patience")
    for name, value in options.items():
        if value is None:
            continue
        if name in ("prior_precision", "sigma_noise", "lr", "min_noise"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isfinite(value) and value > 0)
            if not ok:
                raise InvalidArgumentError(
                    f"{name} must be a finite positive number, got {value!r}")
            continue
        low = 0 if name in may_be_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a non-negative" if low == 0 else "a positive"
            raise InvalidArgumentError(f"{name} must be {kind} integer, got {value!r}")



def check_embedding(embedding, network, hidden, center: float | tuple[float, ...],
                    prior_granularity: str) -> str | None:
    """``LaplaceModel(embedding=...)`` resolved: ``"auto"`` is ``"fourier"`` for the MLP
    (``hidden`` given, no ``network``) and ``None`` otherwise; ``"fourier"`` needs ``hidden``
    or network factories (called with the number of features as input size), not modules,
    and refuses what acts on the raw inputs: a ``center`` scale (from :func:`check_center`)
    other than on/off and ``prior_granularity="ard"``."""
    if embedding == "auto":
        embedding = "fourier" if network is None and hidden is not None else None
    elif embedding is not None:
        if embedding != "fourier":
            raise InvalidArgumentError(
                f"embedding must be 'auto', 'fourier' or None, got {embedding!r}")
        if network is None and hidden is None:
            raise InvalidArgumentError(
                "embedding='fourier' is for network surrogates (hidden=... or a network "
                "factory); the default network already is Fourier features")
        specs = network if isinstance(network, (list, tuple)) else [network]
        if any(isinstance(s, nn.Module) for s in specs):
            raise InvalidArgumentError(
                "embedding='fourier' feeds embedding_features inputs to the network: pass a "
                "factory (d, m) -> nn.Module (called with d = embedding_features) instead of a "
                "module")
    if embedding is None:
        return None
    if center not in (0.0, 1.0):
        raise InvalidArgumentError(
            "center is for networks on the raw inputs; with embedding='fourier' the "
            "features' ARD lengthscales set the input scale (pass center=True or False)")
    if prior_granularity == "ard":
        raise InvalidArgumentError(
            "prior_granularity='ard' acts on the first layer's input columns; with "
            "embedding='fourier' the embedding's ARD lengthscales do that: use "
            "'scalar' (the default then) or 'layer'")
    return embedding


def check_center(center) -> float | tuple[float, ...]:
    """``LaplaceModel(center=...)`` as a scale (``True`` is 1, ``False`` 0) or a tuple of
    candidate scales (all ``> 0``); anything else is refused."""
    def scale(c) -> float | None:
        ok = isinstance(c, (bool, int, float)) and math.isfinite(c) and c >= 0
        return float(c) if ok else None

    if isinstance(center, (tuple, list)):
        scales = tuple(scale(c) for c in center)
        if scales and all(c is not None and c > 0 for c in scales):
            return scales  # type: ignore[return-value]
    elif scale(center) is not None:
        return float(center)
    raise InvalidArgumentError(
        f"center must be a bool, a scale >= 0 or a non-empty tuple of scales > 0, got {center!r}")
