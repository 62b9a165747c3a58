"""What both surrogate models share: moments from whichever posterior they hold, observation
checks and transforms, and the assembly of BoTorch's posterior object.

:class:`~bayescurv.bo.LaplaceModel` and :class:`~bayescurv.bo.ConditionedLaplaceModel` both
derive from :class:`LinearizedModelMixin` (before ``botorch.models.model.Model``).
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.models.model import Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from torch import Tensor

from bayescurv.bo.checks import check_observations
from bayescurv.bo.joint import expand_noise, joint_functional, make_mvn
from bayescurv.bo.ntk import LinearizedGP
from bayescurv.bo.subset import OutputSubsetModel
from bayescurv.laplace import Laplace
from bayescurv.laplace.glm import GaussianGLM


class LinearizedModelMixin:
    """Helpers of the linearized-Laplace models (they hold ``la`` or ``gp``)."""

    la: Laplace | None = None
    glm: GaussianGLM | None = None
    theta_bar: Tensor | None = None
    #: the linearized GP of ``structure="ntk"`` (then ``la`` is ``None``)
    gp: LinearizedGP | None = None
    #: input dimension ``d`` and dtype of the training data
    _input_dim: int
    _dtype: torch.dtype

    def _moments(self, pts: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(T, q, m)`` and joint covariance ``(T, q m, q m)`` at ``(T, q, d)``
        (transformed inputs) from whichever posterior the model holds."""
        if self.gp is not None:
            if torch.is_grad_enabled() and pts.requires_grad:
                return self.gp.moments(pts)
            with torch.no_grad():
                return self.gp.moments(pts)
        mean, cov = joint_functional(self.la, pts)
        return mean + self._mean_offset(pts), cov

    def _mean_offset(self, X: Tensor) -> Tensor | float:
        r""":math:`J(X)(\bar\theta - \theta^*)` for ``X`` of shape ``(T, n, d)`` when the mean
        is the exact linearized-model posterior mean (``evidence="linearized"``), else 0."""
        if self.glm is None:
            return 0.0
        t, n, d = X.shape
        return self.glm.mean_offset(X.reshape(t * n, d), self.theta_bar).reshape(t, n, -1)

    def subset_output(self, idcs: list[int]) -> Model:
        """The model of outputs ``idcs``: the exact marginal of the joint posterior
        (:class:`~bayescurv.bo.subset.OutputSubsetModel`; posterior only, no refit)."""
        return OutputSubsetModel(self, idcs)

    def _set_transformed_inputs(self) -> None:  # training inputs are stored transformed
        pass

    def _revert_to_original_inputs(self) -> None:
        pass

    @property
    def sigma2(self) -> Tensor:
        """Observation-noise variance (outcome-transformed space)."""
        if self.gp is not None:
            return self.gp.sigma_noise.reshape(()) ** 2
        return self.la.sigma_noise.reshape(()) ** 2

    def _transform_observations(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Validated observations in the transformed input and outcome spaces."""
        check_observations(X, Y, self._input_dim, self.num_outputs, self._dtype)
        Xt = self.transform_inputs(X)
        if hasattr(self, "outcome_transform"):
            self.outcome_transform.eval()
            Y, _ = self.outcome_transform(Y, X=Xt)
        return Xt, Y

    def _finish(self, mean: Tensor, cov: Tensor, X: Tensor, observation_noise: bool | Tensor,
                posterior_transform: Any, output_indices: list[int] | None = None,
                ) -> GPyTorchPosterior:
        """BoTorch's posterior from mean ``batch x q x m`` and joint covariance
        ``batch x q m x q m`` (outcome-transformed space) at the transformed inputs ``X``:
        observation noise added, outputs selected, outcome transform undone."""
        noise = expand_noise(observation_noise, self.sigma2, mean.shape)
        if noise is not None:
            cov = cov + torch.diag_embed(noise.reshape(*cov.shape[:-1]))
        posterior = GPyTorchPosterior(distribution=make_mvn(mean, cov, output_indices))
        if hasattr(self, "outcome_transform"):
            transform = self.outcome_transform
            if output_indices is not None:  # untransform only the selected outputs
                transform = transform.subset_output(list(output_indices))
            posterior = transform.untransform_posterior(posterior, X=X)
        if posterior_transform is not None:
            return posterior_transform(posterior=posterior, X=X)
        return posterior
