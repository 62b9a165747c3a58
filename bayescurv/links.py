r"""Predictive approximations for a Gaussian over network outputs.

Given a Gaussian :math:`f \sim N(m, \Sigma)` over the outputs of one input (batched:
``mean`` of shape ``(B, C)``, ``cov`` of shape ``(B, C, C)``), these functions approximate
:math:`E[g(f)]` for an inverse link :math:`g`:

- :func:`probit_softmax`: :math:`softmax_c\big(m_c / \sqrt{1 + \tfrac{\pi}{8}\Sigma_{cc}}\big)`
  (MacKay 1992; exact for the sigmoid with the probit substitute
  :math:`\sigma(x) \approx \Phi(\sqrt{\pi/8}\,x)`, a heuristic for several classes);
- :func:`probit_sigmoid`: the same for one logit;
- :func:`laplace_bridge`: the Laplace bridge (Hobbhahn, Kristiadi & Hennig, 2022) to a
  Dirichlet, whose mean is returned;
- :func:`mc_expectation`: Monte Carlo with :math:`f = m + L z`, :math:`L L^\top = \Sigma`.

Every function also accepts ``cov`` of shape ``(B, C)``, read as the diagonal of
:math:`\Sigma` (independent outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError

_PI_OVER_8 = math.pi / 8.0


# ----------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------
def _check_mean(mean: Tensor) -> Tensor:
    if not torch.is_tensor(mean) or not mean.is_floating_point():
        raise ShapeError("mean must be a floating-point tensor of shape (batch, outputs)")
    if mean.dim() == 1:
        mean = mean.unsqueeze(-1)
    if mean.dim() != 2:
        raise ShapeError(f"mean must have shape (batch, outputs); got {tuple(mean.shape)}")
    return mean


def _check_cov(mean: Tensor, cov: Tensor) -> Tensor:
    """Return ``cov`` as ``(B, C, C)``; ``(B, C)`` (and ``(B,)`` for ``C = 1``) is a diagonal."""
    B, C = mean.shape
    if not torch.is_tensor(cov):
        raise ShapeError("cov must be a tensor of shape (batch, outputs, outputs)")
    if cov.dim() == 1 and C == 1:
        cov = cov.unsqueeze(-1)
    if cov.dim() == 2:
        if cov.shape != (B, C):
            raise ShapeError(
                f"variances of shape {tuple(cov.shape)} do not fit mean {tuple(mean.shape)}"
            )
        cov = torch.diag_embed(cov)
    if cov.shape != (B, C, C):
        raise ShapeError(
            f"cov must have shape (batch, outputs, outputs) = {(B, C, C)} (or the variances, "
            f"(batch, outputs)); got {tuple(cov.shape)}"
        )
    return cov.to(dtype=mean.dtype)


def _check_var(mean: Tensor, cov: Tensor) -> Tensor:
    """Marginal variances ``(B, C)`` from a covariance or from variances."""
    if torch.is_tensor(cov) and cov.dim() <= 2:
        if cov.dim() == 1 and mean.shape[-1] == 1:
            cov = cov.unsqueeze(-1)
        if cov.shape != mean.shape:
            raise ShapeError(
                f"variances of shape {tuple(cov.shape)} do not fit mean {tuple(mean.shape)}"
            )
        return cov.to(dtype=mean.dtype)
    return torch.diagonal(_check_cov(mean, cov), dim1=-2, dim2=-1)


# ----------------------------------------------------------------------------------------
# probit
# ----------------------------------------------------------------------------------------
def probit_scale(var: Tensor) -> Tensor:
    r""":math:`\kappa = 1 / \sqrt{1 + \tfrac{\pi}{8}\,v}`, the probit scaling of a logit."""
    return torch.rsqrt(1.0 + _PI_OVER_8 * var.clamp_min(0.0))


def projected_variance(cov: Tensor) -> Tensor:
    r"""Diagonal of :math:`P \Sigma P`, :math:`P = I - \tfrac1C 11^\top`, for a symmetric
    ``cov`` ``(B, C, C)``, in :math:`O(C^2)` per input instead of the :math:`O(C^3)` of the
    two products: with the row-centred :math:`X = \Sigma P`,
    :math:`(P\Sigma P)_{cc} = X_{cc} - \tfrac1C \sum_k X_{kc}`. Centring the entries first
    (rather than combining :math:`\Sigma_{cc}`, :math:`(\Sigma 1)_c` and
    :math:`1^\top\Sigma 1`, which are all dominated by a large common shift) keeps float32
    at the accuracy the entries themselves carry."""
    x = cov - cov.mean(-1, keepdim=True)
    return torch.diagonal(x, dim1=-2, dim2=-1) - x.mean(-2)


def probit_softmax(mean: Tensor, cov: Tensor) -> Tensor:
    r"""Probit (MacKay) approximation of :math:`E[softmax(f)]`, :math:`f \sim N(m, \Sigma)`:

    .. math:: p_c \approx softmax\big(\tilde m_c / \sqrt{1 + \tfrac{\pi}{8}\,\tilde\Sigma_{cc}}
        \big),\qquad \tilde m = P m,\ \tilde\Sigma = P \Sigma P,\ P = I - \tfrac1C 11^\top.

    Since :math:`softmax(f) = softmax(Pf)` exactly, the quantity approximated is unchanged by
    the projection, but the variance along the common shift of all logits — to which
    softmax is invariant and which the likelihood leaves unconstrained (the GGN has
    :math:`1` in its null space) — no longer turns into spurious under-confidence through the
    per-class scaling. On a digits MLP with a marglik-tuned last-layer Laplace: NLL 0.216
    without the projection, 0.120 with it, 0.114 by Monte Carlo. Given only variances
    ``(B, C)`` (independent logits) no projection is made.

    For two classes prefer ``likelihood="binary"`` (one logit, exact binary probit): here the
    projection halves each logit's variance.

    ``mean`` ``(B, C)``, ``cov`` ``(B, C, C)`` or variances ``(B, C)``; returns ``(B, C)``.
    """
    mean = _check_mean(mean)
    if mean.shape[-1] > 1 and cov.shape == (*mean.shape, mean.shape[-1]):
        mean = mean - mean.mean(-1, keepdim=True)
        var = projected_variance(_check_cov(mean, cov))
    else:
        var = _check_var(mean, cov)
    return torch.softmax(mean * probit_scale(var), dim=-1)


def probit_sigmoid(mean: Tensor, cov: Tensor) -> Tensor:
    r"""Probit approximation of :math:`E[\sigma(f)]`, :math:`f \sim N(m, v)`:
    :math:`\sigma(m / \sqrt{1 + \pi v / 8})`.

    ``mean`` ``(B, 1)`` or ``(B,)``; ``cov`` ``(B, 1, 1)``, ``(B, 1)`` or ``(B,)``.
    Returns :math:`p(y = 1)` of shape ``(B, 1)``.
    """
    mean = _check_mean(mean)
    if mean.shape[-1] != 1:
        raise ShapeError(
            f"probit_sigmoid needs one logit per input; got mean of shape {tuple(mean.shape)}. "
            "Use probit_softmax for several classes."
        )
    var = _check_var(mean, cov)
    return torch.sigmoid(mean * probit_scale(var))


# ----------------------------------------------------------------------------------------
# Laplace bridge
# ----------------------------------------------------------------------------------------
def _log_bridge_alpha(mean: Tensor, cov: Tensor) -> Tensor:
    """``log α`` of the Laplace bridge (see :func:`laplace_bridge_alpha`)."""
    mean = _check_mean(mean)
    cov = _check_cov(mean, cov)
    K = mean.shape[-1]
    if K < 2:
        raise ShapeError(
            "the Laplace bridge needs at least 2 classes; use probit_sigmoid for one logit"
        )
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    return _log_bridge_alpha_moments(mean, torch.diagonal(cov, dim1=-2, dim2=-1), cov.sum(-1))


def _log_bridge_alpha_moments(mean: Tensor, diag: Tensor, s: Tensor) -> Tensor:
    """``log α`` of the Laplace bridge from the diagonal and the row sums ``Σ1`` of the
    covariance (all the bridge reads of it), each ``(B, C)``."""
    K = mean.shape[-1]
    finfo = torch.finfo(mean.dtype)
    total = s.sum(-1, keepdim=True)  # 1ᵀΣ1, (B, 1)
    # 1ᵀΣ1 at rounding level means Σ1 = 0: 1ᵀf is deterministic, nothing to condition on.
    ok = total > K * K * finfo.eps * diag.abs().amax(-1, keepdim=True)
    safe_total = torch.where(ok, total, torch.ones_like(total))
    m = mean - torch.where(ok, s * mean.sum(-1, keepdim=True) / safe_total, 0.0)
    var = diag - torch.where(ok, s * s / safe_total, 0.0)
    # A zero Σ'_kk (degenerate covariance) gets a floor that is tiny relative to Σ.
    floor = (diag.abs().amax(-1, keepdim=True) * finfo.eps**2).clamp_min(finfo.tiny)
    var = torch.maximum(var, floor)
    # log(1 - 2/K + e^{m_k} Σ_l e^{-m_l} / K²), stably; the bracket is >= (1 - 1/K)² > 0.
    log_cross = m + torch.logsumexp(-m, dim=-1, keepdim=True) - 2.0 * math.log(K)
    log_const = math.log(1.0 - 2.0 / K) if K > 2 else -math.inf
    log_num = torch.logaddexp(torch.full_like(m, log_const), log_cross)
    return log_num - torch.log(var)


def laplace_bridge_alpha(mean: Tensor, cov: Tensor) -> Tensor:
    r"""Dirichlet concentrations :math:`\alpha` of the Laplace bridge, shape ``(B, C)``.

    Softmax is invariant to adding a constant to the logits, so the Gaussian is first
    conditioned on :math:`\mathbf 1^\top f = 0` (the correction of Hobbhahn et al., 2022):

    .. math::
        m' = m - \frac{\Sigma \mathbf 1\, \mathbf 1^\top m}{\mathbf 1^\top \Sigma \mathbf 1},
        \qquad
        \Sigma' = \Sigma - \frac{\Sigma \mathbf 1 \mathbf 1^\top \Sigma}
        {\mathbf 1^\top \Sigma \mathbf 1},

    then, with :math:`K = C` classes,

    .. math::
        \alpha_k = \frac{1}{\Sigma'_{kk}}\Big(1 - \frac{2}{K}
        + \frac{e^{m'_k}}{K^2} \sum_l e^{-m'_l}\Big).

    This inverts the Laplace approximation of a Dirichlet in the softmax basis exactly.
    Degenerate cases: where :math:`\mathbf 1^\top \Sigma \mathbf 1 = 0` (up to rounding),
    :math:`\mathbf 1^\top f` is deterministic and no correction is applied (the bracket is
    invariant to shifting :math:`m` by a constant), and a zero :math:`\Sigma'_{kk}` is
    floored at a tiny positive number, the limit of a vanishing isotropic covariance:
    :math:`\alpha` is then huge (possibly ``inf``), but :func:`laplace_bridge` stays finite.
    Needs ``C >= 2``; ``cov`` ``(B, C, C)`` or variances ``(B, C)``.
    """
    return torch.exp(_log_bridge_alpha(mean, cov))


def laplace_bridge_moments(mean: Tensor, diag: Tensor, rowsum: Tensor) -> Tensor:
    r""":func:`laplace_bridge` from the two moments of the covariance it reads, its diagonal
    and its row sums :math:`\Sigma 1` (each ``(B, C)``), without the ``C x C`` matrix: the
    same probabilities in :math:`O(C)` per input."""
    mean = _check_mean(mean).to(diag.dtype)
    if diag.shape != mean.shape or rowsum.shape != mean.shape:
        raise ShapeError(f"moments of shapes {tuple(diag.shape)}, {tuple(rowsum.shape)} do "
                         f"not fit mean {tuple(mean.shape)}")
    if mean.shape[-1] < 2:
        raise ShapeError("the Laplace bridge needs at least 2 classes")
    return torch.softmax(_log_bridge_alpha_moments(mean, diag, rowsum), dim=-1)


def laplace_bridge(mean: Tensor, cov: Tensor) -> Tensor:
    r"""Class probabilities from the Laplace bridge: the Dirichlet mean
    :math:`\alpha / \sum_k \alpha_k` with :math:`\alpha` from :func:`laplace_bridge_alpha`
    (computed in log space). ``mean`` ``(B, C)``, ``cov`` ``(B, C, C)`` (or variances
    ``(B, C)``); returns ``(B, C)``. Unlike probit, this does not reduce to
    :math:`softmax(m)` as :math:`\Sigma \to 0`, and with strongly unequal marginal
    variances it can be far from :math:`E[softmax(f)]` (it follows laplace-torch's
    ``link_approx="bridge"`` exactly).
    """
    return torch.softmax(_log_bridge_alpha(mean, cov), dim=-1)


# ----------------------------------------------------------------------------------------
# Monte Carlo
# ----------------------------------------------------------------------------------------
def psd_sqrt(cov: Tensor) -> Tensor:
    r"""A square root :math:`L` with :math:`L L^\top = \Sigma` of a batch of symmetric PSD
    matrices ``(..., C, C)``.

    The Cholesky factor where it exists; for matrices where it fails (singular or
    rank-deficient, e.g. zero), the root :math:`V\,diag(\sqrt{\max(\lambda, 0)})` from the
    eigendecomposition :math:`\Sigma = V diag(\lambda) V^\top`, exact for any PSD matrix
    (no jitter, so no bias in the sampled covariance).
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(cov)
    failed = info != 0
    if bool(failed.any()):
        evals, evecs = torch.linalg.eigh(cov[failed])
        root = evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)
        L = L.clone()
        L[failed] = root
    return L


def mc_expectation(
    mean: Tensor,
    cov: Tensor,
    fn: Callable[[Tensor], Tensor],
    num_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Monte-Carlo estimate of :math:`E[fn(f)]`, :math:`f \sim N(m, \Sigma)`:

    .. math:: \frac1S \sum_{s=1}^S fn(m + L z_s), \quad z_s \sim N(0, I),\ L L^\top = \Sigma,

    with :math:`L` from :func:`psd_sqrt` (works for rank-deficient :math:`\Sigma`).
    ``fn`` gets samples of shape ``(S, B, C)`` and must act on the last dimension (e.g.
    ``torch.softmax(·, -1)``); the result has ``fn``'s output shape without the sample
    dimension. Reproducible given ``generator`` (which must live on ``mean``'s device).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be a positive integer, got {num_samples}")
    mean = _check_mean(mean)
    z = torch.randn(
        (num_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype
    )
    if torch.is_tensor(cov) and cov.dim() <= 2:  # variances: independent outputs
        f = mean + _check_var(mean, cov).clamp_min(0.0).sqrt() * z
    else:
        f = mean + torch.einsum("bij,sbj->sbi", psd_sqrt(_check_cov(mean, cov)), z)
    return fn(f).mean(0)


__all__ = [
    "probit_scale",
    "projected_variance",
    "probit_softmax",
    "probit_sigmoid",
    "laplace_bridge",
    "laplace_bridge_moments",
    "laplace_bridge_alpha",
    "psd_sqrt",
    "mc_expectation",
]
