r"""Fantasy models: a :class:`~bayescurv.bo.LaplaceModel` conditioned on (batched) observations
by the exact update of its linearized model.

The update :math:`\Lambda' = \Lambda + J'^\top N^{-1} J'` with one Gauss-Newton step from
:math:`\theta^*` (exact MAP for the linearized model) is, in function space, GP conditioning
with the kernel :math:`k(x, x') = J(x)\Sigma J(x')^\top`:

.. math::
    \mu'(x) = \mu(x) + k(x, X')(K' + N)^{-1}(Y' - \mu(X')),\quad
    k'(x, x') = k(x, x') - k(x, X')(K' + N)^{-1}k(X', x').

It is cheap, batched over any number of fantasy samples and differentiable in ``X'`` — what
:class:`~botorch.acquisition.qKnowledgeGradient` needs.
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.exceptions.errors import BotorchTensorDimensionError
from botorch.models.model import Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor

from bayescurv.bo.base import LinearizedModelMixin
from bayescurv.bo.checks import check_inputs


class ConditionedLaplaceModel(LinearizedModelMixin, Model):
    r"""A :class:`LaplaceModel` conditioned on (possibly batched) observations through the exact
    update of its linearized model (GP conditioning with the NTK kernel
    :math:`J\Sigma J^\top`). ``X_cond`` (``batch x n' x d``) is in transformed input space,
    ``Y_cond`` (``batch' x n' x m``) and ``noise`` in transformed outcome space. ``base`` is
    the :class:`~bayescurv.bo.LaplaceModel` (typed by its mixin: this module does not import
    the model, which imports it).
    """

    def __init__(
        self, base: LinearizedModelMixin, X_cond: Tensor, Y_cond: Tensor,
        noise: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.base = [base]  # a list: keep the base out of this module's children
        self.la, self.glm, self.theta_bar, self.gp = base.la, base.glm, base.theta_bar, base.gp
        self._input_dim, self._dtype = base.train_X.shape[-1], base.train_X.dtype
        for name in ("input_transform", "outcome_transform"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        try:
            self._batch_shape = torch.broadcast_shapes(X_cond.shape[:-2], Y_cond.shape[:-2])
        except RuntimeError as e:
            raise BotorchTensorDimensionError(
                f"batch shapes of X {tuple(X_cond.shape)} and Y {tuple(Y_cond.shape)} do not "
                "broadcast"
            ) from e
        self.X_cond = X_cond
        self.Y_cond = Y_cond
        self.noise = noise

    @property
    def num_outputs(self) -> int:
        return self.base[0].num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """Conditioned joint posterior at ``X`` (``batch x q x d`` broadcastable with the
        model's batch shape)."""
        self.eval()
        check_inputs(X, self._input_dim, self._dtype)
        Xt = self.transform_inputs(X)
        q, d = Xt.shape[-2:]
        n = self.X_cond.shape[-2]
        m = self.num_outputs
        try:
            batch = torch.broadcast_shapes(Xt.shape[:-2], self._batch_shape)
        except RuntimeError as e:
            raise BotorchTensorDimensionError(
                f"X batch shape {tuple(Xt.shape[:-2])} does not broadcast with the model "
                f"batch shape {tuple(self._batch_shape)}"
            ) from e
        Xc = self.X_cond.expand(*batch, n, d)
        Xq = Xt.expand(*batch, q, d)
        pts = torch.cat([Xc, Xq], -2).reshape(-1, n + q, d)
        mu, K = self._moments(pts)  # (T, n+q, m), (T, (n+q)m, (n+q)m)
        nm = n * m
        mu1, mu2 = mu[:, :n].reshape(-1, nm), mu[:, n:].reshape(-1, q * m)
        K11, K12, K22 = K[:, :nm, :nm], K[:, :nm, nm:], K[:, nm:, nm:]
        y = self.Y_cond.expand(*batch, n, m).reshape(-1, nm)
        if self.noise is None:
            nz = self.sigma2.expand(y.shape)
        else:
            nz = self.noise.expand(*batch, n, m).reshape(-1, nm)
        L = psd_safe_cholesky(K11 + torch.diag_embed(nz))
        A = torch.linalg.solve_triangular(L, K12, upper=False)  # (T, nm, qm)
        r = torch.linalg.solve_triangular(L, (y - mu1).unsqueeze(-1), upper=False)
        mean = mu2 + (A.transpose(-1, -2) @ r).squeeze(-1)
        cov = K22 - A.transpose(-1, -2) @ A
        mean = mean.reshape(*batch, q, m)
        cov = cov.reshape(*batch, q * m, q * m)
        return self._finish(mean, cov, Xt, observation_noise, posterior_transform,
                            output_indices)

    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> ConditionedLaplaceModel:
        """Condition further (the linearized update is associative: the data are stacked)."""
        Xt, Yt = self._transform_observations(X, Y)
        batch = torch.broadcast_shapes(self._batch_shape, Xt.shape[:-2], Yt.shape[:-2])
        n0, n1 = self.X_cond.shape[-2], Xt.shape[-2]
        m = self.num_outputs
        Xc = torch.cat([self.X_cond.expand(*batch, n0, Xt.shape[-1]),
                        Xt.expand(*batch, n1, Xt.shape[-1])], -2)
        Yc = torch.cat([self.Y_cond.expand(*batch, n0, m), Yt.expand(*batch, n1, m)], -2)
        nz = None
        if self.noise is not None or noise is not None:
            old = self.noise if self.noise is not None else self.sigma2
            new = noise if noise is not None else self.sigma2
            nz = torch.cat([torch.as_tensor(old).expand(*batch, n0, m),
                            torch.as_tensor(new).expand(*batch, n1, m)], -2)
        return ConditionedLaplaceModel(self.base[0], Xc, Yc, nz)
