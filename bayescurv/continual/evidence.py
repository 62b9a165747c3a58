r"""Process noise chosen by the evidence of the new task's data (empirical Bayes for ``Q``).

With ``Q = diag(q)``, ``q = ρ_l`` on the parameters of tensor ``l`` (only the tensors allowed
to drift), the Laplace evidence of task ``t``'s data under the predicted prior
:math:`N(A m_{t-1}, \Lambda^-(\rho)^{-1})` is, up to terms free of ``ρ``,

.. math::
    \log Z_t(\rho) \approx -\tfrac12 \delta^\top \Lambda^-(\rho)\, \delta
    + \tfrac12 \log|\Lambda^-(\rho)| - \tfrac12 \log|\Lambda^-(\rho) + G_t|,
    \qquad \delta = \theta^*_t - A m_{t-1},

evaluated at the task's MAP :math:`\theta^*_t`. Under the mean-field (diagonal) view of the
filter — :math:`\lambda_i = \mathrm{diag}(\Lambda_{t-1})_i`, predicted
:math:`\lambda^-_i = \lambda_i / (a_i^2 + \rho \lambda_i)`, :math:`G_{ii}` the task
curvature's diagonal — it separates over tensors:

.. math::
    \log Z_t = \sum_l \sum_{i \in l} -\tfrac12 \delta_i^2 \lambda^-_i
    + \tfrac12 \log \lambda^-_i - \tfrac12 \log(\lambda^-_i + G_{ii}),

so each tensor's ``ρ_l`` is the maximiser over a log grid (``O(P · grid)``, no data pass).
``ρ = 0`` (no drift) is on the grid, so a tensor whose weights moved no more than the
posterior allows keeps ``q = 0``. The rule: a tensor drifts by as much as the jump of its
weights between tasks, measured in its posterior standard deviations, supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.continual.dynamics import resolve_spec
from bayescurv.errors import InvalidArgumentError
from bayescurv.params import ParamSet

__all__ = ["EvidenceNoise", "evidence_noise"]

DEFAULT_GRID = (0.0, *(10.0 ** (k / 4) for k in range(-40, 5)))  # 0 and 1e-10 ... 10


@dataclass(frozen=True)
class EvidenceNoise:
    """``Q`` re-estimated after every task by :func:`evidence_noise`; pass as
    ``LaplaceFilter(..., transition=Transition(noise=EvidenceNoise()))``.

    Attributes:
        layers: names of the modules / parameters allowed to drift (``None``: all), e.g.
            ``("2",)`` for the head of ``nn.Sequential(..., nn.Linear)`` at index 2.
        grid: candidate ``ρ ≥ 0`` (variance added per weight and task).
    """

    layers: Sequence[str] | None = None
    grid: Sequence[float] = DEFAULT_GRID

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            raise InvalidArgumentError("EvidenceNoise.layers must be a sequence of names, "
                                       f"got the string {self.layers!r}; wrap it in a tuple")
        grid = list(self.grid)
        if not grid or any(not (g >= 0 and g < float("inf")) for g in grid):
            raise InvalidArgumentError(f"EvidenceNoise.grid must hold finite ρ >= 0, got {grid}")

    def mask(self, params: ParamSet) -> Tensor:
        """``(P,)``: 1 where a parameter may drift."""
        if self.layers is None:
            return torch.ones(params.numel, dtype=params.dtype, device=params.device)
        spec = {name: 1.0 for name in self.layers}
        return resolve_spec(spec, params, 0.0, "EvidenceNoise.layers")


def evidence_noise(rule: EvidenceNoise, params: ParamSet, delta: Tensor, prec_diag: Tensor,
                   curv_diag: Tensor, scale: Tensor) -> Tensor:
    """The ``(P,)`` noise ``q`` maximising the mean-field evidence (module docstring).

    Args:
        delta: ``θ*_t − A m_{t-1}``; prec_diag: ``diag(Λ_{t-1})``; curv_diag: ``diag(G_t)``;
        scale: ``a``.
    """
    grid = torch.as_tensor(list(rule.grid), dtype=delta.dtype, device=delta.device)
    lam = prec_diag.unsqueeze(0)
    pred = lam / (scale.square().unsqueeze(0) + grid.unsqueeze(-1) * lam)  # (grid, P)
    f = -0.5 * delta.square() * pred + 0.5 * pred.log() - 0.5 * (pred + curv_diag).log()
    sizes = [params.slice_of(i).stop - params.slice_of(i).start for i in range(len(params.names))]
    per_tensor = torch.stack([part.sum(-1) for part in torch.split(f, sizes, dim=-1)], -1)
    best = grid[per_tensor.argmax(0)]  # (tensors,)
    q = torch.repeat_interleave(best, torch.as_tensor(sizes, device=delta.device))
    return q * rule.mask(params)
