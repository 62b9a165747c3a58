r"""Joint linearized-Laplace moments over BoTorch's ``batch x q x d`` inputs.

For a fitted :class:`~bayescurv.Laplace` the linearized predictive of the ``q`` points of one
t-batch is :math:`N(f(X;\theta^*), J(X)\,\Sigma\,J(X)^\top)` with ``(q m) x (q m)`` covariance
ordered input-major (index ``i * m + c``, GPyTorch's *interleaved* order). Different t-batches
are independent, so only the diagonal blocks are formed: one t-batch per point when ``q = 1``
(per-input covariance), otherwise a few t-batches per joint call so that the cross-batch work
stays bounded by ``max_points``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from botorch.exceptions.errors import BotorchTensorDimensionError, InputDataError
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator import to_linear_operator
from torch import Tensor

from bayescurv.bo.checks import check_output_indices
from bayescurv.laplace import Laplace

#: points per joint ``functional`` call when ``q > 1``
MAX_POINTS = 128


@contextmanager
def params_need_grad(la: Laplace, flag: bool) -> Iterator[None]:
    """Temporarily set ``requires_grad`` of the posterior's parameters.

    When ``x`` requires grad they are frozen, so that acquisition backward passes do not
    compute and accumulate parameter gradients; otherwise ``Laplace.functional`` needs them
    (its Jacobian pass differentiates the outputs)."""
    ps = list(la.params.params)
    old = [p.requires_grad for p in ps]
    try:
        for p in ps:
            p.requires_grad_(flag)
        yield
    finally:
        for p, o in zip(ps, old):
            p.requires_grad_(o)


def functional(la: Laplace, x: Tensor, joint: bool = False) -> tuple[Tensor, Tensor]:
    """``la.functional(x, joint)`` whether or not ``x`` or the parameters require grad;
    results are detached unless ``x`` requires grad."""
    differentiable = torch.is_grad_enabled() and x.requires_grad
    with params_need_grad(la, not differentiable), torch.enable_grad():
        mean, cov = la.functional(x, joint=joint)
    if not differentiable:
        mean, cov = mean.detach(), cov.detach()
    return mean, cov


def joint_functional(la: Laplace, X: Tensor, max_points: int = MAX_POINTS) -> tuple[Tensor, Tensor]:
    """Mean ``(T, q, m)`` and block-diagonal joint covariance ``(T, q m, q m)`` of the
    linearized network at ``X`` of shape ``(T, q, d)`` (transformed inputs)."""
    differentiable = torch.is_grad_enabled() and X.requires_grad
    with params_need_grad(la, not differentiable), torch.enable_grad():
        mean, cov = _joint_functional(la, X, max_points)
    if not differentiable:
        mean, cov = mean.detach(), cov.detach()
    return mean, cov


def _joint_functional(la: Laplace, X: Tensor, max_points: int) -> tuple[Tensor, Tensor]:
    t, q, d = X.shape
    if q == 1:
        f, cov = la.functional(X.reshape(t, d))  # per-input blocks
        return f.unsqueeze(1), cov
    per = max(1, max_points // q)
    means, covs = [], []
    for chunk in X.split(per):
        n = chunk.shape[0]
        f, cov = la.functional(chunk.reshape(n * q, d), joint=True)
        m = f.shape[-1]
        cov = cov.reshape(n, q * m, n, q * m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        means.append(f.reshape(n, q, m))
        covs.append(cov)
    return torch.cat(means), torch.cat(covs)


def expand_noise(
    observation_noise: bool | Tensor, sigma2: Tensor, shape: torch.Size
) -> Tensor | None:
    """Observation noise as a tensor of ``shape = batch x q x m`` (or ``None``)."""
    if observation_noise is False:
        return None
    if observation_noise is True:
        return sigma2.expand(shape)
    if not torch.is_tensor(observation_noise):
        raise InputDataError(
            f"observation_noise must be a bool or a tensor, got {type(observation_noise)}"
        )
    try:
        return observation_noise.expand(shape)
    except RuntimeError as e:
        raise BotorchTensorDimensionError(
            f"observation_noise of shape {tuple(observation_noise.shape)} does not broadcast "
            f"to batch_shape x q x m = {tuple(shape)}"
        ) from e


def make_mvn(
    mean: Tensor, cov: Tensor, output_indices: list[int] | None = None
) -> MultivariateNormal:
    """A ``MultivariateNormal`` (one output) or interleaved ``MultitaskMultivariateNormal``
    from ``mean (..., q, m)`` and ``cov (..., q m, q m)``."""
    q, m = mean.shape[-2:]
    if output_indices is not None:
        idx = torch.as_tensor(check_output_indices(output_indices, m), device=mean.device)
        rows = (torch.arange(q, device=mean.device)[:, None] * m + idx[None, :]).reshape(-1)
        mean = mean[..., idx]
        cov = cov[..., rows[:, None], rows[None, :]]
        m = idx.numel()
    # a lazy (dense) operator: GPyTorch then factorizes with psd_safe_cholesky (jitter
    # escalation) when sampling, instead of torch's strict Cholesky at construction — the
    # NTK covariance of many points has rank at most the number of parameters
    cov = to_linear_operator(0.5 * (cov + cov.transpose(-1, -2)))
    if m == 1:
        return MultivariateNormal(mean.squeeze(-1), cov)
    return MultitaskMultivariateNormal(mean, cov, interleaved=True)
