r"""Likelihoods: everything the curvature engine and the posteriors need to know of a loss.

Each likelihood ``p(y | f)`` of a network output ``f`` (shape ``(B, C)``) gives

- ``nll(f, y)``: :math:`-\sum_n \log p(y_n | f_n)`, the **sum** over the batch, with all
  normalising constants (so the Laplace evidence is a true log evidence);
- ``hessian(f)``: :math:`H_n = \nabla^2_f [-\log p(y_n|f_n)]`, shape ``(B, C, C)``. For the
  canonical-link likelihoods here it does not depend on ``y``, and the GGN
  :math:`\sum_n J_n^\top H_n J_n` equals the Fisher;
- ``hessian_sqrt(f)``: an exact square root :math:`S_n` with :math:`S_n S_n^\top = H_n`,
  shape ``(B, C, K)``;
- ``sampled_hessian_sqrt(f, num_samples, generator)``: columns
  :math:`\nabla_f[-\log p(\hat y_k|f)]/\sqrt{K}` with :math:`\hat y_k \sim p(\cdot|f)`,
  so that :math:`E[S S^\top] = H` (the Monte-Carlo Fisher);
- ``gradient(f, y)``: per-sample :math:`\nabla_f[-\log p(y_n|f_n)]`, ``(B, C)`` (the
  empirical Fisher's square root);
- ``inverse_link(f)`` and ``predictive(mean, cov, link)``: the predictive under a Gaussian
  over ``f`` (approximations in :mod:`bayescurv.links`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError


def class_indices(y: Tensor, batch: int, num_classes: int) -> Tensor:
    """Validate class-index targets: shape ``(batch,)`` (or ``(batch, 1)``), integer values in
    ``[0, num_classes - 1]``; returns them as a long tensor."""
    if not torch.is_tensor(y):
        y = torch.as_tensor(y)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.squeeze(1)
    if y.dim() != 1 or y.shape[0] != batch:
        raise ShapeError(
            f"classification targets must be class indices of shape ({batch},); got "
            f"{tuple(y.shape)}"
        )
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ShapeError("classification targets must be integer class indices")
    y = y.long()
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ShapeError(
            f"class indices must lie in [0, {num_classes - 1}] for {num_classes} classes; "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )
    return y


class Likelihood:
    """Base class. Subclasses set ``name`` and implement the methods below."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    links: ClassVar[tuple[str, ...]] = ("mc",)

    # validation -----------------------------------------------------------------------
    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Validate targets against outputs ``f``; return ``(f, y)`` in canonical shapes."""
        raise NotImplementedError

    def check_outputs(self, f: Tensor) -> Tensor:
        if f.dim() == 1:
            f = f.unsqueeze(-1)
        if f.dim() != 2:
            seq = (" A sequence output (batch, positions, classes) needs one vector per data "
                   "point: pass output_key= a callable that selects it (e.g. the last "
                   "position, lambda out: out.logits[:, -1]); per-token likelihoods are not "
                   "supported.") if f.dim() == 3 else ""
            raise ShapeError(
                f"the {self.name} likelihood needs network outputs of shape (batch, outputs); "
                f"got {tuple(f.shape)}.{seq or ' Flatten extra output dimensions in the model.'}"
            )
        return f

    # loss and its derivatives ---------------------------------------------------------
    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """Per-sample log-likelihood ``(B,)``."""
        raise NotImplementedError

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood summed over the batch (scalar)."""
        return -self.log_prob(f, y).sum()

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradient of the NLL w.r.t. ``f``, shape ``(B, C)``."""
        raise NotImplementedError

    def hessian(self, f: Tensor) -> Tensor:
        """Per-sample Hessian of the NLL w.r.t. ``f``, shape ``(B, C, C)``."""
        s = self.hessian_sqrt(f)
        return s @ s.transpose(-1, -2)

    def hessian_sum(self, f: Tensor) -> Tensor:
        r""":math:`\sum_b H_b` ``(C, C)``, the Hessians of the NLL in ``f`` summed over the
        batch (the K-FAC output factor of a network's output layer, without square roots)."""
        return self.hessian(f).sum(0)

    def hessian_diagonal(self, f: Tensor, basis: Tensor | None = None) -> Tensor:
        """``diag(Qᵀ H_b Q)`` ``(B, C)`` for ``Q = basis`` (identity when ``None``)."""
        h = self.hessian(f)
        if basis is not None:
            h = basis.mT @ h @ basis
        return torch.diagonal(h, dim1=-2, dim2=-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Exact square root ``S`` (``S Sᵀ = H``) of shape ``(B, C, K)``."""
        raise NotImplementedError

    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """``num_samples`` targets from ``p(y|f)``, stacked on a new leading dimension."""
        raise NotImplementedError

    def sampled_hessian_sqrt(
        self, f: Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        """Monte-Carlo square root ``(B, C, num_samples)`` with ``E[S Sᵀ] = H``."""
        if num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be >= 1, got {num_samples}")
        f = self.check_outputs(f).detach()
        ys = self.sample(f, num_samples, generator)
        cols = [self.gradient(f, ys[k]) for k in range(num_samples)]
        return torch.stack(cols, dim=-1) / math.sqrt(num_samples)

    # predictions ----------------------------------------------------------------------
    def inverse_link(self, f: Tensor) -> Tensor:
        """Mean of ``p(y|f)`` as a function of ``f``."""
        raise NotImplementedError

    def predictive(
        self,
        mean: Tensor,
        cov: Tensor,
        link: str = "probit",
        num_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        """Predictive of ``y`` when ``f ~ N(mean, cov)`` (``(B, C)``, ``(B, C, C)``)."""
        raise NotImplementedError

    def predictive_from_samples(self, f: Tensor):
        """Predictive from network outputs ``f`` ``(S, B, C)`` at ``S`` posterior samples
        (``pred_type="nn"``): the average of :meth:`inverse_link`."""
        return self.inverse_link(f).mean(0)

    def check_link(self, link: str) -> None:
        if link not in self.links:
            raise InvalidArgumentError(
                f"link {link!r} is not available for the {self.name} likelihood; "
                f"use one of {self.links}"
            )


class Gaussian(Likelihood):
    r"""Gaussian regression :math:`y \sim N(f, \sigma^2 I)`, multi-output, with scalar or
    per-output observation noise ``sigma_noise``. ``H = diag(1/σ²)``, ``S = diag(1/σ)``."""

    name = "regression"
    aliases = ("gaussian",)
    links = ("probit", "mc")  # "probit" means the exact Gaussian predictive here

    def __init__(self, sigma_noise: float | Tensor = 1.0) -> None:
        self.sigma_noise = sigma_noise

    @property
    def sigma_noise(self) -> Tensor:
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        # python numbers are kept in float64 and cast to the outputs' dtype when used
        s = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float64)
        if s.dim() > 1:
            raise ShapeError(f"sigma_noise must be a scalar or (outputs,), got {tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise InvalidArgumentError(f"sigma_noise must be finite and positive, got {value}")
        self._sigma = s

    def _sigma_like(self, f: Tensor) -> Tensor:
        s = self._sigma.to(device=f.device, dtype=f.dtype)
        if s.dim() == 1 and s.numel() not in (1, f.shape[-1]):
            raise ShapeError(
                f"sigma_noise has {s.numel()} entries but the network has {f.shape[-1]} outputs"
            )
        return s

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        if not y.is_floating_point():
            y = y.to(f.dtype)
        if y.dim() == 1:
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ShapeError(
                f"regression targets of shape {tuple(y.shape)} do not fit network outputs "
                f"{tuple(f.shape)}; targets must be (batch, outputs) (or (batch,) for 1 output)"
            )
        return f, y.to(f.dtype)

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        s = self._sigma_like(f).expand(f.shape[-1])
        z = (y - f) / s
        return -0.5 * (z**2).sum(-1) - torch.log(s).sum() - 0.5 * f.shape[-1] * math.log(
            2 * math.pi
        )

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.check(f, y)
        return (f - y) / self._sigma_like(f) ** 2

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        f = self.check_outputs(f)
        s = self._sigma_like(f).expand(f.shape[-1])
        return torch.diag_embed((1.0 / s).expand_as(f)).detach()

    def sample(self, f, num_samples, generator):
        s = self._sigma_like(f)
        eps = torch.randn(
            (num_samples, *f.shape), generator=generator, device=f.device, dtype=f.dtype
        )
        return f.unsqueeze(0) + s * eps

    def inverse_link(self, f: Tensor) -> Tensor:
        return f

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """``(mean, variance)`` of ``y``: the latent variance plus ``σ²``."""
        self.check_link(link)
        var = torch.diagonal(cov, dim1=-2, dim2=-1) + self._sigma_like(mean) ** 2
        return mean, var

    def predictive_from_samples(self, f: Tensor):
        """``(mean, variance)`` of sampled outputs plus ``σ²``."""
        return f.mean(0), f.var(0, unbiased=False) + self._sigma_like(f) ** 2


class Categorical(Likelihood):
    r"""Softmax classification. With :math:`p = softmax(f)`,
    :math:`H = diag(p) - p p^\top` and :math:`S = diag(\sqrt p) - p \sqrt{p}^\top`
    (then :math:`S S^\top = diag(p) - 2pp^\top + p p^\top \sum p = H`)."""

    name = "classification"
    aliases = ("categorical", "softmax")
    links = ("probit", "bridge", "mc")

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        return f, class_indices(y, f.shape[0], f.shape[1])

    def log_prob(self, f, y):
        f, y = self.check(f, y)
        return -F.cross_entropy(f, y, reduction="none")

    def gradient(self, f, y):
        f, y = self.check(f, y)
        return torch.softmax(f, -1) - F.one_hot(y, f.shape[-1]).to(f.dtype)

    def hessian_sqrt(self, f):
        f = self.check_outputs(f).detach()
        p = torch.softmax(f, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    def hessian_sum(self, f: Tensor) -> Tensor:
        r""":math:`\sum_b diag(p_b) - p_b p_b^\top` in ``O(B C^2)`` (no ``(B, C, C)``)."""
        p = torch.softmax(self.check_outputs(f).detach(), -1)
        return torch.diag(p.sum(0)) - p.T @ p

    def hessian_diagonal(self, f: Tensor, basis: Tensor | None = None) -> Tensor:
        """``diag(Qᵀ H_b Q) = p_b Q² − (p_b Q)²`` ``(B, C)``, never forming ``H_b``."""
        p = torch.softmax(self.check_outputs(f).detach(), -1)
        if basis is None:
            return p - p.square()
        return p @ basis.square() - (p @ basis).square()

    def sample(self, f, num_samples, generator):
        p = torch.softmax(f, -1)
        idx = torch.multinomial(p, num_samples, replacement=True, generator=generator)
        return idx.T.contiguous()

    def inverse_link(self, f):
        return torch.softmax(f, -1)

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Class probabilities ``(B, C)``."""
        from bayescurv import links

        self.check_link(link)
        if link == "probit":
            return links.probit_softmax(mean, cov)
        if link == "bridge":
            return links.laplace_bridge(mean, cov)
        return links.mc_expectation(mean, cov, self.inverse_link, num_samples, generator)


class Bernoulli(Likelihood):
    r"""Binary classification with one logit: :math:`p = \sigma(f)`, :math:`H = p(1-p)`,
    :math:`S = \sqrt{p(1-p)}`. Targets are 0/1 of shape ``(B,)`` or ``(B, 1)``."""

    name = "binary"
    aliases = ("bernoulli",)
    links = ("probit", "mc")

    def check(self, f, y):
        f = self.check_outputs(f)
        if f.shape[1] != 1:
            raise ShapeError(
                f"the binary likelihood needs one output (a logit); the network has {f.shape[1]}"
                ". Use likelihood='classification' for several classes."
            )
        if y.dim() == 2 and y.shape[1] == 1:
            y = y.squeeze(1)
        if y.dim() != 1 or y.shape[0] != f.shape[0]:
            raise ShapeError(f"binary targets must have shape (batch,); got {tuple(y.shape)}")
        if not ((y == 0) | (y == 1)).all():
            raise ShapeError("binary targets must be 0 or 1")
        return f, y.to(f.dtype).unsqueeze(-1)

    def log_prob(self, f, y):
        f, y = self.check(f, y)
        return -F.binary_cross_entropy_with_logits(f, y, reduction="none").squeeze(-1)

    def gradient(self, f, y):
        f, y = self.check(f, y)
        return torch.sigmoid(f) - y

    def hessian_sqrt(self, f):
        f = self.check_outputs(f).detach()
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt().unsqueeze(-1)

    def sample(self, f, num_samples, generator):
        p = torch.sigmoid(f).squeeze(-1).expand(num_samples, -1)
        return torch.bernoulli(p, generator=generator)

    def inverse_link(self, f):
        return torch.sigmoid(f)

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Probability of class 1, shape ``(B,)``."""
        from bayescurv import links

        self.check_link(link)
        if link == "probit":
            return links.probit_sigmoid(mean, cov).squeeze(-1)
        return links.mc_expectation(mean, cov, self.inverse_link, num_samples, generator).squeeze(
            -1
        )

    def predictive_from_samples(self, f: Tensor):
        """Probability of class 1 ``(B,)``."""
        return self.inverse_link(f).mean(0).squeeze(-1)


class Poisson(Likelihood):
    r"""Poisson counts with log link: rate :math:`\lambda = e^f`, :math:`H = e^f`."""

    name = "poisson"
    links = ("mc",)

    def check(self, f, y):
        f = self.check_outputs(f)
        if y.dim() == 1:
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ShapeError(
                f"Poisson targets {tuple(y.shape)} do not fit outputs {tuple(f.shape)}"
            )
        if (y < 0).any() or not torch.equal(y, y.round()):
            raise ShapeError("Poisson targets must be non-negative integers")
        return f, y.to(f.dtype)

    def log_prob(self, f, y):
        f, y = self.check(f, y)
        return (y * f - torch.exp(f) - torch.lgamma(y + 1)).sum(-1)

    def gradient(self, f, y):
        f, y = self.check(f, y)
        return torch.exp(f) - y

    def hessian_sqrt(self, f):
        f = self.check_outputs(f).detach()
        return torch.diag_embed(torch.exp(0.5 * f))

    def sample(self, f, num_samples, generator):
        rate = torch.exp(f).expand(num_samples, *f.shape)
        return torch.poisson(rate, generator=generator)

    def inverse_link(self, f):
        return torch.exp(f)

    def predictive(self, mean, cov, link="mc", num_samples=100, generator=None):
        """Predictive mean of the counts ``(B, C)``."""
        from bayescurv import links

        self.check_link(link)
        return links.mc_expectation(mean, cov, self.inverse_link, num_samples, generator)


LIKELIHOODS: dict[str, type[Likelihood]] = {}


def register(*classes: type[Likelihood]) -> None:
    """Make likelihood classes available by their ``name`` and ``aliases``
    (:func:`get_likelihood`, ``Laplace(model, name)``); each must build without arguments."""
    for cls in classes:
        for n in (cls.name, *cls.aliases):
            LIKELIHOODS[n] = cls


register(Gaussian, Categorical, Bernoulli, Poisson)


def _listing(names: Iterable[str]) -> str:
    """``'a', 'b' or 'c'``: the canonical names of the registered likelihoods ``names``."""
    canon = sorted({LIKELIHOODS[n].name for n in names})
    quoted = [repr(n) for n in canon]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def get_likelihood(
    likelihood: str | Likelihood, sigma_noise: float | Tensor = 1.0, *,
    accepted: Iterable[str] | None = None, caller: str = "",
) -> Likelihood:
    """A likelihood object from its name (``"regression"``, ``"classification"``,
    ``"binary"``, ``"poisson"`` or an alias) or pass an instance through.

    ``accepted``: the names (aliases included) the caller supports, default all registered;
    the errors list exactly those, so they never recommend a name the caller refuses.
    ``caller`` names the caller in the error of a registered name it does not accept.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    names = set(LIKELIHOODS) if accepted is None else set(accepted)
    instance = "or a bayescurv.likelihoods.Likelihood instance"
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS and likelihood not in names:
        raise InvalidArgumentError(
            f"{caller or 'this function'} supports likelihood {_listing(names)} (by name), "
            f"got {likelihood!r}; another likelihood can be passed as a "
            "bayescurv.likelihoods.Likelihood instance"
        )
    if not isinstance(likelihood, str) or likelihood not in names:
        raise InvalidArgumentError(
            f"unknown likelihood {likelihood!r}; use one of {_listing(names)} {instance}"
        )
    cls = LIKELIHOODS[likelihood]
    return cls(sigma_noise) if cls is Gaussian else cls()


def unimplemented(likelihood: Likelihood, methods: Iterable[str | tuple[str, ...]]) -> list[str]:
    """Which of ``methods`` ``likelihood``'s class leaves as the base class's
    ``NotImplementedError`` stub; a tuple is a set of alternatives (one suffices)."""
    def done(name: str) -> bool:
        return getattr(type(likelihood), name, None) is not getattr(Likelihood, name, None)

    missing = []
    for m in methods:
        alts = (m,) if isinstance(m, str) else m
        if not any(done(a) for a in alts):
            missing.append(" or ".join(alts))
    return missing


def check_finite_outputs(f: Tensor) -> None:
    if not torch.isfinite(f).all():
        raise NonFiniteError(
            "the network produced NaN or Inf outputs; check the model and its inputs"
        )


__all__ = [
    "Likelihood",
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "Poisson",
    "get_likelihood",
    "register",
    "unimplemented",
    "LIKELIHOODS",
]
