"""A subset of a multi-output surrogate's outputs (BoTorch's ``Model.subset_output``).

The linearized-Laplace posterior is one Gaussian over all outputs, so the model of outputs
``idcs`` is its marginal: the same joint posterior with ``output_indices=idcs`` — exact, no
refit. Conditioning a subset on observations of only those outputs would need a partially
observed update of the shared weights; it is refused with a clear error (condition the full
model instead).
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.exceptions.errors import BotorchTensorDimensionError
from botorch.models.model import Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from torch import Tensor

from bayescurv.bo.checks import check_output_indices


class OutputSubsetModel(Model):
    """Outputs ``idcs`` of ``base`` (a :class:`~bayescurv.bo.LaplaceModel` or
    :class:`~bayescurv.bo.ConditionedLaplaceModel`); built by ``base.subset_output(idcs)``."""

    def __init__(self, base: Model, idcs: list[int]) -> None:
        super().__init__()
        self.base = [base]  # a list: keep the base out of this module's children
        self.idcs = check_output_indices(idcs, base.num_outputs)

    @property
    def num_outputs(self) -> int:
        return len(self.idcs)

    @property
    def batch_shape(self) -> torch.Size:
        return self.base[0].batch_shape

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """The base model's joint posterior at ``X`` restricted to this model's outputs
        (``output_indices`` relative to them); a noise tensor has this model's outputs."""
        base = self.base[0]
        local = range(len(self.idcs)) if output_indices is None else check_output_indices(
            output_indices, len(self.idcs))
        if torch.is_tensor(observation_noise):
            if observation_noise.shape[-1] != len(self.idcs):
                raise BotorchTensorDimensionError(
                    f"observation_noise must have {len(self.idcs)} outputs, got "
                    f"{tuple(observation_noise.shape)}")
            full = observation_noise.new_zeros(*observation_noise.shape[:-1], base.num_outputs)
            full[..., self.idcs] = observation_noise
            observation_noise = full
        return base.posterior(X, output_indices=[self.idcs[i] for i in local],
                              observation_noise=observation_noise,
                              posterior_transform=posterior_transform)

    def subset_output(self, idcs: list[int]) -> OutputSubsetModel:
        return OutputSubsetModel(self.base[0], [self.idcs[i] for i in
                                                check_output_indices(idcs, len(self.idcs))])

    def condition_on_observations(self, X: Tensor, Y: Tensor, **kwargs: Any) -> Model:
        raise NotImplementedError(
            "conditioning a subset of the outputs is not supported (the outputs share the "
            "network's weights); condition the full model, then call subset_output")
