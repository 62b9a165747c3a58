r"""Dense outputs: one likelihood term per position (pixel, voxel, token).

:class:`PerPosition` wraps a per-position likelihood (softmax classification, Gaussian
regression with fixed noise, multi-label, binary) for a network whose output is
``(B, C, *S)`` — PyTorch's class-dimension-1 convention of ``F.cross_entropy`` for
segmentation ``(B, C, H, W)`` and per-token ``(B, C, T)`` logits, and image-to-image
regression ``(B, C, H, W)``. The data term is the **sum over positions**,

.. math:: -\log p(y_n | f_n) = \sum_{s \in S} \ell(y_{n,s}, f_{n,:,s}),

so the loss Hessian in the flattened output :math:`f_n \in \mathbb R^{|S| C}` (position-major,
channel innermost) is block diagonal, :math:`H_n = \mathrm{blockdiag}_s H_{n,s}`, with the
square root :math:`\mathrm{blockdiag}_s S_{n,s}`: the curvature engine sees an ordinary
``(B, |S|C)`` output and every structure is exact for the sum (``|S|K`` square-root columns
per datum; the square root itself takes ``B·|S|²·C·K`` entries, and the engine backpropagates
its columns in chunks of bounded memory).

Targets: class indices ``(B, *S)`` for classification and binary, ``(B, C, *S)`` for
regression and multi-label. Names: ``"dense-classification"``, ``"dense-regression"`` (unit
noise unless a :class:`~bayescurv.likelihoods.Gaussian` with another ``sigma_noise`` is
wrapped; the noise is not tuned), ``"dense-multilabel"``, ``"dense-binary"``.

Predictions (``Laplace.predict``) are per position, from the ``C x C`` diagonal blocks of
:math:`J\Sigma J^\top`, computed over chunks of positions so that no
``(B·|S|·C) x P`` Jacobian exists (see :mod:`bayescurv.laplace.positions`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods.base import (
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    register,
)
from bayescurv.likelihoods.binary import MultiLabel

_INDEX_TARGETS = (Categorical, Bernoulli)


class PerPosition(Likelihood):
    """Sum of ``base`` over the positions of ``(B, C, *S)`` outputs; see the module docstring.

    The positions' shape ``S`` is read from the network output (``(B, C, *S)``, three or
    more dimensions) and kept, so outputs already flattened to ``(B, |S|C)`` are understood.
    """

    name = "dense"

    def __init__(self, base: Likelihood) -> None:
        if not isinstance(base, (Categorical, Gaussian, MultiLabel, Bernoulli)):
            raise InvalidArgumentError(
                "PerPosition wraps a Categorical, Gaussian, MultiLabel or Bernoulli "
                f"likelihood; got {type(base).__name__}")
        self.base = base
        self.name = f"dense-{base.name}"
        self.links = base.links
        self.channels: int | None = None
        self.positions: tuple[int, ...] | None = None

    # shapes ------------------------------------------------------------------------------
    def check_outputs(self, f: Tensor) -> Tensor:
        """``(B, C, *S)`` → ``(B, |S|C)`` (position-major); ``(B, |S|C)`` passes through."""
        if f.dim() >= 3:
            self.channels, self.positions = f.shape[1], tuple(f.shape[2:])
            return f.movedim(1, -1).reshape(f.shape[0], -1)
        if f.dim() == 2 and self.channels is not None and f.shape[1] == self.size * self.channels:
            return f
        raise ShapeError(
            f"the {self.name} likelihood needs network outputs (batch, channels, *positions) "
            f"with at least one position dimension; got {tuple(f.shape)}")

    @property
    def size(self) -> int:
        """Number of positions ``|S|``."""
        return math.prod(self.positions or ())

    def _per_position(self, f: Tensor) -> Tensor:
        """``(B, |S|C)`` → ``(B·|S|, C)``."""
        return self.check_outputs(f).reshape(-1, self.channels)

    def _targets(self, f: Tensor, y: Tensor) -> Tensor:
        """User targets → per-position targets in the base's format."""
        if not torch.is_tensor(y):
            y = torch.as_tensor(y)
        b, s = f.shape[0], self.positions
        if isinstance(self.base, _INDEX_TARGETS):
            if tuple(y.shape) != (b, *s):
                raise ShapeError(f"{self.name} targets must be class indices (batch, *positions)"
                                 f" = {(b, *s)}; got {tuple(y.shape)}")
            return y.reshape(-1)
        if tuple(y.shape) != (b, self.channels, *s):
            raise ShapeError(f"{self.name} targets must have the outputs' shape "
                             f"{(b, self.channels, *s)}; got {tuple(y.shape)}")
        return y.movedim(1, -1).reshape(-1, self.channels)

    def _unflatten(self, t: Tensor, lead: int) -> Tensor:
        """``(…, B·|S|[, C])`` per-position values → ``(…, B[, C], *S)``."""
        s = self.positions
        if t.dim() == lead + 1:
            return t.reshape(*t.shape[:lead], -1, *s)
        out = t.reshape(*t.shape[:lead], -1, *s, t.shape[-1])
        return out.movedim(-1, lead + 1)

    # loss --------------------------------------------------------------------------------
    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        fp, yp = self.base.check(f.reshape(-1, self.channels), self._targets(f, y))
        return f, yp

    def _base_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Targets as :meth:`check` returns them (per position) or as the user gives them."""
        n = f.shape[0] * self.size
        if y.shape[0] == n:
            return y
        return self.base.check(f.reshape(-1, self.channels), self._targets(f, y))[1]

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f = self.check_outputs(f)
        lp = self.base.log_prob(f.reshape(-1, self.channels), self._base_targets(f, y))
        return lp.reshape(f.shape[0], -1).sum(-1)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f = self.check_outputs(f)
        g = self.base.gradient(f.reshape(-1, self.channels), self._base_targets(f, y))
        return g.reshape(f.shape)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Block-diagonal ``(B, |S|C, |S|K)``."""
        f = self.check_outputs(f)
        s = self.base.hessian_sqrt(f.reshape(-1, self.channels))  # (B|S|, C, K)
        b, n = f.shape[0], self.size
        s = s.reshape(b, n, self.channels, -1)
        eye = torch.eye(n, dtype=s.dtype, device=s.device)
        return torch.einsum("bsck,st->bsctk", s, eye).reshape(b, n * self.channels, -1)

    def hessian_diagonal(self, f: Tensor, basis: Tensor | None = None) -> Tensor:
        if basis is not None:
            return super().hessian_diagonal(f, basis)
        f = self.check_outputs(f)
        return self.base.hessian_diagonal(f.reshape(-1, self.channels)).reshape(f.shape)

    def sample(self, f, num_samples, generator):
        ys = self.base.sample(self._per_position(f), num_samples, generator)
        return self._unflatten(ys, 1)

    # predictions -------------------------------------------------------------------------
    def inverse_link(self, f: Tensor) -> Tensor:
        """Per position: ``(…, B, C, *S)`` (binary: ``(…, B, *S)``)."""
        lead = f.dim() - 2
        p = self.base.inverse_link(f.reshape(*f.shape[:-1], -1, self.channels))
        if isinstance(self.base, Bernoulli):
            p = p.squeeze(-1)
        return self._unflatten(p.reshape(*f.shape[:lead], -1, *p.shape[lead + 2:]), lead)

    def predictive_blocks(self, mean: Tensor, blocks: Tensor, link: str, num_samples: int,
                          generator: torch.Generator | None):
        """The base predictive of every position from the means ``(B, |S|C)`` and the
        ``C x C`` covariance blocks ``(B, |S|, C, C)``, in the outputs' layout."""
        out = self.base.predictive(mean.reshape(-1, self.channels),
                                   blocks.reshape(-1, self.channels, self.channels), link,
                                   num_samples, generator)
        parts = out if isinstance(out, tuple) else (out,)
        res = tuple(self._unflatten(t, 0) for t in parts)
        return res if isinstance(out, tuple) else res[0]

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Per-position predictive from the per-input covariance ``(B, |S|C, |S|C)`` (only
        its ``C x C`` diagonal blocks are read) or from those blocks ``(B, |S|, C, C)``."""
        self.check_link(link)
        mean = self.check_outputs(mean)
        b, n, c = mean.shape[0], self.size, self.channels
        if cov.dim() == 4:  # already the blocks (B, |S|, C, C)
            blocks = cov
        else:
            blocks = torch.diagonal(cov.reshape(b, n, c, n, c), dim1=1, dim2=3
                                    ).permute(0, 3, 1, 2)
        return self.predictive_blocks(mean, blocks, link, num_samples, generator)

    def predictive_from_samples(self, f: Tensor):
        if isinstance(self.base, Gaussian):
            mean, var = self.base.predictive_from_samples(f.reshape(*f.shape[:2], -1,
                                                                    self.channels))
            return self._unflatten(mean.reshape(-1, self.channels), 0), self._unflatten(
                var.reshape(-1, self.channels), 0)
        return self.inverse_link(f).mean(0)

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.base = copy.deepcopy(self.base, memo)
        return new


def _factory(base: type[Likelihood]) -> type[PerPosition]:
    class _Named(PerPosition):
        __doc__ = f"``PerPosition({base.__name__}())``, registered as ``dense-{base.name}``."

        def __init__(self) -> None:
            super().__init__(base())

    _Named.name = f"dense-{base.name}"
    _Named.__name__ = _Named.__qualname__ = f"Dense{base.__name__}"
    return _Named


DenseCategorical = _factory(Categorical)
DenseGaussian = _factory(Gaussian)
DenseMultiLabel = _factory(MultiLabel)
DenseBernoulli = _factory(Bernoulli)

register(DenseCategorical, DenseGaussian, DenseMultiLabel, DenseBernoulli)

__all__ = ["PerPosition", "DenseCategorical", "DenseGaussian", "DenseMultiLabel",
           "DenseBernoulli"]
