r"""The transition model over the weights between tasks.

.. math::
    \theta_t = A\,\theta_{t-1} + q_t, \qquad q_t \sim N(0, Q),

with ``A = diag(a)`` and ``Q = diag(q)`` in the flat parameter order of a
:class:`~bayescurv.params.ParamSet`: ``a`` and ``q`` are given as one number for all
parameters, as ``{module_or_parameter_name: value}`` (per layer; names not listed keep the
default ``a = 1``, ``q = 0``), or as a ``(P,)`` tensor (per parameter). A layer with
``q > 0`` may drift between tasks (e.g. the head); ``q = 0`` means it is shared exactly.

``decay`` ``γ ∈ (0, 1]`` multiplies the predicted precision, ``Λ⁻ ← γ Λ⁻`` (the "online EWC"
forgetting factor of Schwarz et al., 2018). For ``A = I`` it equals the state-dependent
noise ``Q = (1/γ − 1) Λ⁻¹``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError
from bayescurv.params import ParamSet

Spec = float | int | Mapping[str, float] | Tensor

__all__ = ["Transition"]


@dataclass(frozen=True)
class Transition:
    """``θ_t = diag(scale) θ_{t-1} + N(0, diag(noise))``, then ``Λ⁻ ← decay · Λ⁻``.

    Attributes:
        scale: ``a`` — a number, ``{name: number}`` per layer / parameter, or ``(P,)``.
        noise: ``q ≥ 0`` (the diagonal of a PSD ``Q``) — same forms as ``scale``.
        decay: ``γ ∈ (0, 1]``.
    """

    scale: Spec = 1.0
    noise: Spec = 0.0
    decay: float = 1.0

    def resolve(self, params: ParamSet) -> tuple[Tensor, Tensor, float]:
        """``(a, q, γ)`` as ``(P,)`` tensors on the set's device and dtype.

        Raises:
            InvalidArgumentError: ``q`` has a negative entry (``Q`` not PSD), an unknown
                name, ``decay`` outside ``(0, 1]``, or ``a = q = 0`` for a parameter.
        """
        a = resolve_spec(self.scale, params, 1.0, "scale")
        q = resolve_spec(self.noise, params, 0.0, "noise")
        if bool((q < 0).any()):
            i = int(torch.nonzero(q < 0)[0])
            raise InvalidArgumentError(
                f"the process noise Q = diag(noise) must be PSD, but noise[{i}] = {float(q[i]):.3g}"
                f" < 0 (parameter {_name_of(params, i)!r}); use noise >= 0"
            )
        if bool(((a == 0) & (q == 0)).any()):
            i = int(torch.nonzero((a == 0) & (q == 0))[0])
            raise InvalidArgumentError(
                f"scale = 0 and noise = 0 for parameter {_name_of(params, i)!r}: its predicted "
                "distribution would be a point mass; give it noise > 0 (a fresh prior)"
            )
        decay = float(self.decay)
        if not (0.0 < decay <= 1.0):
            raise InvalidArgumentError(f"decay must lie in (0, 1], got {self.decay}")
        return a, q, decay

    @property
    def is_identity(self) -> bool:
        """``A = I``, ``Q = 0``, ``γ = 1`` given as plain numbers (the static model)."""
        return (
            isinstance(self.scale, (int, float))
            and float(self.scale) == 1.0
            and isinstance(self.noise, (int, float))
            and float(self.noise) == 0.0
            and float(self.decay) == 1.0
        )


def _name_of(params: ParamSet, index: int) -> str:
    for i, name in enumerate(params.names):
        sl = params.slice_of(i)
        if sl.start <= index < sl.stop:
            return name
    return "?"


def resolve_spec(spec: Spec, params: ParamSet, default: float, what: str) -> Tensor:
    """A number, ``{name: value}`` or ``(P,)`` tensor as a ``(P,)`` tensor (``default`` for
    names not listed)."""
    P, dt, dev = params.numel, params.dtype, params.device
    if isinstance(spec, Tensor):
        if spec.numel() == 1:
            out = spec.reshape(()).to(dtype=dt, device=dev).expand(P).clone()
        elif spec.shape != (P,):
            raise ShapeError(
                f"{what} must be a number, a {{name: value}} dict or a ({P},) tensor in the flat "
                f"parameter order; got a tensor of shape {tuple(spec.shape)}"
            )
        else:
            out = spec.detach().to(dtype=dt, device=dev).clone()
    elif isinstance(spec, Mapping):
        out = torch.full((P,), float(default), dtype=dt, device=dev)
        pnames = set(params.names)
        for key, value in spec.items():
            idx = [
                i
                for i, n in enumerate(params.names)
                if n == key or n.startswith(f"{key}.") or key == ""
            ]
            if not idx:
                raise InvalidArgumentError(
                    f"{what}: {key!r} is neither a parameter nor a module of the parameter set; "
                    f"parameters are {sorted(pnames)[:20]}"
                )
            for i in idx:
                out[params.slice_of(i)] = float(value)
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        out = torch.full((P,), float(spec), dtype=dt, device=dev)
    else:
        raise InvalidArgumentError(
            f"{what} must be a number, a {{name: value}} dict or a tensor, "
            f"got {type(spec).__name__}"
        )
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"{what} holds NaN or Inf values")
    return out


def check_finite_positive(x: float, name: str) -> float:
    """``x`` as a float, or an error when it is not finite and ``> 0``."""
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise InvalidArgumentError(f"{name} must be finite and > 0, got {x}")
    return x
