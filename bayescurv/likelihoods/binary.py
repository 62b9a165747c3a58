r"""Sigmoid likelihoods beyond one label: multi-label classification and Bradley–Terry
reward modelling.

**Multi-label** (``"multilabel"``): ``C`` independent Bernoulli labels, logits ``f`` ``(B, C)``,
targets ``y ∈ {0, 1}^{B×C}``; :math:`p = \sigma(f)`, :math:`H = \mathrm{diag}(p(1-p))`,
:math:`S = \mathrm{diag}(\sqrt{p(1-p)})`. Predictive: the probit approximation per label,
:math:`\sigma(m_c/\sqrt{1 + \pi\Sigma_{cc}/8})`, ``(B, C)``.

**Reward modelling** (``"reward"``): a reward model ``r(x)`` scored on pairs by
Bradley–Terry, :math:`p(a \succ b) = \sigma(r(a) - r(b))`. In fitting the network output is the
pair of rewards ``f = (r(a), r(b))`` ``(B, 2)`` and ``y`` the index of the preferred item
(``0``: ``a``); the loss is the two-class cross-entropy, with
:math:`H = p(1-p)\,(1, -1)^\top(1, -1)`, :math:`p = \sigma(f_1 - f_2)`, a rank-one square
root. :class:`PairwiseReward` turns a per-item reward model into such a pair model and
:func:`preference_pairs` reads the batches a preference data set has (dicts with
``chosen``/``rejected`` inputs, or ``(B, 2, ...)`` tensors). At prediction on single items the
output is the reward ``(B, 1)`` and the predictive is ``(mean, variance)`` of the reward (no
observation noise); on pairs, ``p(a ≻ b)`` ``(B,)`` by the probit approximation on the
difference :math:`f_1 - f_2 \sim N(m_1 - m_2, \Sigma_{11} + \Sigma_{22} - 2\Sigma_{12})`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods.base import Likelihood, class_indices, register


class MultiLabel(Likelihood):
    r"""Independent Bernoulli per output: :math:`H = \mathrm{diag}(\sigma(f)(1-\sigma(f)))`."""

    name = "multilabel"
    aliases = ("multi-label",)
    links = ("probit", "mc")

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        if not torch.is_tensor(y):
            y = torch.as_tensor(y)
        if y.dim() == 1 and f.shape[1] == 1:
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ShapeError(f"multilabel targets must be 0/1 of the outputs' shape "
                             f"{tuple(f.shape)}; got {tuple(y.shape)}")
        if not bool(((y == 0) | (y == 1)).all()):
            raise ShapeError("multilabel targets must be 0 or 1")
        return f, y.to(f.dtype)

    def log_prob(self, f, y):
        f, y = self.check(f, y)
        return -F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def gradient(self, f, y):
        f, y = self.check(f, y)
        return torch.sigmoid(f) - y

    def hessian_sqrt(self, f):
        p = torch.sigmoid(self.check_outputs(f).detach())
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_diagonal(self, f: Tensor, basis: Tensor | None = None) -> Tensor:
        """``diag(Qᵀ H_b Q) = h_b Q²`` with ``h = p(1-p)``."""
        p = torch.sigmoid(self.check_outputs(f).detach())
        h = p * (1 - p)
        return h if basis is None else h @ basis.square()

    def sample(self, f, num_samples, generator):
        return torch.bernoulli(torch.sigmoid(f).expand(num_samples, *f.shape),
                               generator=generator)

    def inverse_link(self, f):
        return torch.sigmoid(f)

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Probability of each label ``(B, C)``."""
        from bayescurv import links

        self.check_link(link)
        var = torch.diagonal(cov, dim1=-2, dim2=-1) if cov.dim() == 3 else cov
        if link == "probit":
            return torch.sigmoid(mean * links.probit_scale(var))
        return links.mc_expectation(mean, var, self.inverse_link, num_samples, generator)


class Reward(Likelihood):
    r"""Bradley–Terry preferences over pairs of rewards ``(B, 2)``; see the module docstring."""

    name = "reward"
    aliases = ("reward_modeling", "bradley-terry")
    links = ("probit", "mc")

    def check_outputs(self, f: Tensor) -> Tensor:
        if f.dim() == 3 and f.shape[-1] == 1:
            f = f.squeeze(-1)
        f = super().check_outputs(f)
        if f.shape[1] not in (1, 2):
            raise ShapeError(
                "the reward likelihood needs one reward per item (batch, 1) or one per item "
                f"of a pair (batch, 2); got outputs {tuple(f.shape)}. Wrap a per-item reward "
                "model in bayescurv.likelihoods.PairwiseReward")
        return f

    def check(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.check_outputs(f)
        if f.shape[1] != 2:
            raise ShapeError(
                "fitting the reward likelihood needs preference pairs: outputs (batch, 2) of "
                f"the two items' rewards, got {tuple(f.shape)}. Read pair batches with "
                "bayescurv.likelihoods.preference_pairs and wrap the model in PairwiseReward")
        return f, class_indices(y, f.shape[0], 2)

    def log_prob(self, f, y):
        f, y = self.check(f, y)
        return -F.cross_entropy(f, y, reduction="none")

    def gradient(self, f, y):
        f, y = self.check(f, y)
        return torch.softmax(f, -1) - F.one_hot(y, 2).to(f.dtype)

    def hessian_sqrt(self, f):
        f = self.check_outputs(f).detach()
        if f.shape[1] != 2:
            raise ShapeError("the reward likelihood's curvature needs pair outputs (batch, 2)")
        p = torch.sigmoid(f[:, 0] - f[:, 1])
        r = (p * (1 - p)).sqrt()
        return torch.stack([r, -r], -1).unsqueeze(-1)

    def sample(self, f, num_samples, generator):
        p = torch.sigmoid(f[:, 1] - f[:, 0]).expand(num_samples, -1)  # p(second preferred)
        return torch.bernoulli(p, generator=generator).long()

    def inverse_link(self, f):
        """Pairs: ``p(a ≻ b)`` ``(B,)``; single items: the reward itself."""
        if f.shape[-1] == 2:
            return torch.sigmoid(f[..., 0] - f[..., 1])
        return f

    def predictive(self, mean, cov, link="probit", num_samples=100, generator=None):
        """Single items: ``(mean, variance)`` of the reward, each ``(B, 1)``. Pairs:
        ``p(a ≻ b)`` ``(B,)``."""
        from bayescurv import links

        self.check_link(link)
        mean = self.check_outputs(mean)
        if cov.dim() == 2:
            cov = torch.diag_embed(cov)
        if mean.shape[1] == 1:
            return mean, cov[:, :, 0]
        dm = (mean[:, 0] - mean[:, 1]).unsqueeze(-1)
        dv = (cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]).clamp_min(0).unsqueeze(-1)
        if link == "probit":
            return links.probit_sigmoid(dm, dv).squeeze(-1)
        return links.mc_expectation(dm, dv, torch.sigmoid, num_samples, generator).squeeze(-1)

    def predictive_from_samples(self, f: Tensor):
        if f.shape[-1] == 1:
            return f.mean(0), f.var(0, unbiased=False)
        return self.inverse_link(f).mean(0)


class PairwiseReward(nn.Module):
    """A per-item reward model ``r: x ↦ (B, 1)`` as a pair model: called with keyword inputs
    ``chosen=``/``rejected=`` (what :func:`preference_pairs` yields) it returns both rewards
    ``(B, 2)``; called with single items it returns ``r(x)``. The inner model runs once per
    item, so each layer is a weight-shared layer over the two items of a pair and every
    curvature structure stays per pair."""

    def __init__(self, reward_model: nn.Module) -> None:
        super().__init__()
        self.reward_model = reward_model

    def forward(self, x: Any = None, *, chosen: Any = None, rejected: Any = None) -> Tensor:
        if chosen is None and rejected is None:
            if x is None:
                raise InvalidArgumentError("PairwiseReward needs inputs x, or chosen= and "
                                           "rejected=")
            return self.reward_model(x)
        if chosen is None or rejected is None or x is not None:
            raise InvalidArgumentError("PairwiseReward takes both chosen= and rejected= (and "
                                       "no positional inputs) for pairs")
        ra, rb = self.reward_model(chosen), self.reward_model(rejected)
        return torch.cat([ra.reshape(ra.shape[0], 1), rb.reshape(rb.shape[0], 1)], 1)


class preference_pairs(Iterable):  # noqa: N801 - used like a function
    """Re-iterable view of a preference data set as ``({"chosen", "rejected"}, y)`` batches
    for :class:`Reward` with :class:`PairwiseReward`.

    A batch may be a dict with ``chosen`` and ``rejected`` inputs (then ``y = 0``: the
    chosen item is preferred; a ``y``/``label`` entry, if present, is the index of the
    preferred one), a ``(B, 2, ...)`` tensor of pairs, or a ``((B, 2, ...), y)`` pair.
    """

    def __init__(self, data: Iterable, chosen: str = "chosen", rejected: str = "rejected",
                 y_key: str = "y") -> None:
        self.data, self.keys, self.y_key = data, (chosen, rejected), y_key

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        for batch in self.data:
            y = None
            if isinstance(batch, dict):
                if not all(k in batch for k in self.keys):
                    raise InvalidArgumentError(
                        f"a preference batch needs the keys {self.keys}; got {sorted(batch)}")
                a, b = (torch.as_tensor(batch[k]) for k in self.keys)
                y = batch.get(self.y_key)
            else:
                if isinstance(batch, (tuple, list)) and len(batch) == 2:
                    batch, y = batch
                pair = torch.as_tensor(batch)
                if pair.dim() < 2 or pair.shape[1] != 2:
                    raise ShapeError("pair batches must be tensors (batch, 2, ...) or dicts "
                                     f"with {self.keys}; got shape {tuple(pair.shape)}")
                a, b = pair[:, 0], pair[:, 1]
            if y is None:
                y = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
            yield {"chosen": a, "rejected": b}, torch.as_tensor(y)


register(MultiLabel, Reward)

__all__ = ["MultiLabel", "Reward", "PairwiseReward", "preference_pairs"]
