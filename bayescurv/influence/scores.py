r"""Influence scores from a fitted curvature: damped inverse-curvature products between
query and training gradients.

For a training example :math:`z_n` and a query :math:`z_q`,

.. math::
    \mathrm{score}(z_n, z_q) = \nabla_\theta \ell(z_q)^\top (G + \delta I)^{-1}
    \nabla_\theta \ell(z_n),

with :math:`\ell = -\log p(y | f(x; \theta))` at the trained weights, ``G`` the curvature of
the summed training loss (any structure of :func:`bayescurv.compute`: EKFAC, K-FAC, diag,
low rank, full) and :math:`\delta` the damping. Given a fitted :class:`~bayescurv.Laplace`,
:math:`G + \delta I` is its posterior precision :math:`H/\sigma^2 + diag(\delta)`: the damping
*is* the prior precision, which the evidence tunes (``optimize_prior_precision``).

Sign and scale: when the network was trained on :math:`\sum_n \ell_n + \frac{\delta}{2}
\|\theta\|^2` and ``G`` is its Hessian, removing :math:`z_n` moves the minimiser by
:math:`\approx (G + \delta I)^{-1} \nabla \ell(z_n)`, so the score predicts the change of the
query loss when :math:`z_n` is left out: positive = :math:`z_n` *helps* the query (its removal
raises the query loss), negative = it harms it. Self-influence
:math:`\nabla\ell(z_n)^\top (G+\delta I)^{-1} \nabla \ell(z_n)` is large for examples the model
fits against the rest of the data (mislabeled, atypical).

Every :math:`(G + \delta I)^{-1} v` is the structure's own ``solve``
(:class:`~bayescurv.linalg.KroneckerEigen` eigenbases with EKFAC-corrected eigenvalues,
:class:`~bayescurv.linalg.Diagonal`, low rank by Woodbury, dense by Cholesky), in
:func:`~bayescurv.linalg.internal_dtype` (float64 for float32 models).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from bayescurv.curvature.compute import Curvature
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.influence.gradients import example_losses, loss_gradients
from bayescurv.influence.queries import QueryGradients
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.linalg import PSDOperator, internal_dtype

if TYPE_CHECKING:
    from bayescurv.laplace import Laplace


class TopK(NamedTuple):
    """The ``k`` most helpful and most harmful training examples per query: indices into
    the training set ``(Q, k)`` and their scores, helpful by decreasing score, harmful by
    increasing (most negative first)."""

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def top_k(scores: Tensor, k: int) -> TopK:
    """The ``k`` largest (helpful) and smallest (harmful) entries of each row of
    ``scores`` ``(Q, N)`` (a ``(N,)`` vector counts as one query)."""
    if not torch.is_tensor(scores) or scores.dim() not in (1, 2):
        raise ShapeError("scores must be a (queries, train) or (train,) tensor, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    s = scores if scores.dim() == 2 else scores.unsqueeze(0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s.shape[1]:
        raise InvalidArgumentError(
            f"k must be an int in [1, {s.shape[1]}] (the number of training examples), got {k!r}")
    hv, hi = s.topk(k, dim=1)
    lv, li = s.topk(k, dim=1, largest=False)
    if scores.dim() == 1:
        hv, hi, lv, li = hv[0], hi[0], lv[0], li[0]
    return TopK(hi, hv, li, lv)


def _check_damping(damping: float | Tensor, numel: int) -> float | Tensor:
    d = damping if torch.is_tensor(damping) else torch.as_tensor(float(damping))
    if d.dim() > 1 or (d.dim() == 1 and d.numel() != numel):
        raise ShapeError(f"damping must be a scalar or one value per parameter ({numel},), got "
                         f"shape {tuple(d.shape)}")
    if not torch.isfinite(d).all() or (d <= 0).any():
        raise InvalidArgumentError(
            f"damping must be finite and positive (it is the prior precision δ in G + δI), "
            f"got {damping}")
    return damping


class Influence:
    r"""Influence of training examples on queries, ``∇ℓ(z_q)ᵀ (G + δI)⁻¹ ∇ℓ(z_n)``.

    Args:
        source: a fitted :class:`~bayescurv.Laplace` (``G + δI`` is its posterior precision;
            the network's weights must be its MAP) or a :class:`~bayescurv.curvature.
            Curvature` from :func:`bayescurv.compute` of the *summed* loss (the default
            ``reduction``), then with ``likelihood`` and ``damping``.
        damping: ``δ``. With a ``Laplace``: default its (evidence-tuned) prior precision; a
            value given replaces it (any shape ``Laplace.prior_precision`` accepts). With a
            ``Curvature``: required, a positive scalar or one value per parameter.
        likelihood: with a ``Curvature``: the likelihood it was computed with (a name or a
            :class:`~bayescurv.likelihoods.Likelihood`); a ``Laplace`` brings its own.
        query_rank: keep each preconditioned query gradient of every weight matrix (a
            parameter of two or more dimensions, as ``(shape[0], rest)``) at this rank
            (truncated SVD, as kronfluence's ``query_gradient_low_rank``): the stored queries
            take ``r (m + n)`` instead of ``m n`` numbers per layer (large models, many
            queries); ``None`` keeps them exact.
        unknown_layers, batch_dim: as :func:`bayescurv.compute`.

    Memory: the preconditioned query gradients ``(Q, P)`` (or their low-rank factors; or a
    chunk of them, ``scores(query_chunk=)``) and one training batch of gradients ``(B, P)`` at
    a time; the training set is streamed once per call (per query chunk), in the batches the
    loader gives.

    Usage:

    ```python
    la = Laplace(model, "classification", structure="ekfac").fit(train_loader)
    la.optimize_prior_precision()
    inf = Influence(la)
    scores = inf.scores(query_loader, train_loader)      # (Q, N)
    best = top_k(scores, 5)                              # most helpful / harmful
    suspicious = inf.self_influence(train_loader)        # (N,)
    ```
    """

    def __init__(
        self,
        source: Laplace | Curvature,
        *,
        damping: float | Tensor | None = None,
        likelihood: str | Likelihood | None = None,
        query_rank: int | None = None,
        unknown_layers: str = "auto",
        batch_dim: int | None = None,
    ) -> None:
        from bayescurv.laplace import Laplace

        self.index: Tensor | None = None
        if isinstance(source, Laplace):
            source.check_fitted()
            source.check_weights()
            if likelihood is not None:
                raise InvalidArgumentError(
                    "a Laplace brings its own likelihood; drop likelihood=")
            self.params = source.params
            self.likelihood = source.likelihood
            self.index = source.index
            if damping is None:
                self.operator: PSDOperator = source.posterior_precision
            else:
                from bayescurv.laplace.prior import check_prior

                prior = check_prior(damping, source.num_params, source.num_layers,
                                    source.internal_dtype, source.params.device,
                                    num_tensors=source.num_tensors)
                self.operator = source.posterior_precision_at(prior_precision=prior)
            batch_dim = source.batch_dim if batch_dim is None else batch_dim
        elif isinstance(source, Curvature):
            if likelihood is None or damping is None:
                raise InvalidArgumentError(
                    "from a Curvature, pass likelihood= (the one it was computed with) and "
                    "damping= (δ in G + δI); or pass a fitted Laplace, whose prior precision "
                    "is the damping")
            self.params = source.params
            self.likelihood = get_likelihood(likelihood)
            d = _check_damping(damping, source.matrix.size)
            d = d.to(source.matrix.dtype) if torch.is_tensor(d) else float(d)
            self.operator = source.matrix.add_diagonal(d)
        else:
            raise InvalidArgumentError(
                f"source must be a fitted Laplace or a Curvature from bayescurv.compute, got "
                f"{type(source).__name__}")
        if query_rank is not None:
            if isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1:
                raise InvalidArgumentError(
                    f"query_rank must be a positive int or None, got {query_rank!r}")
            if self.index is not None:
                raise InvalidArgumentError(
                    "query_rank needs whole parameter tensors; a masked subnetwork has none")
        self.query_rank = query_rank
        self.unknown_layers = unknown_layers
        self.batch_dim = 0 if batch_dim is None else batch_dim
        #: dtype of the gradients and solves (float64 for float32/bf16/fp16 models)
        self.dtype = internal_dtype(self.params.dtype)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        likelihood: str | Likelihood,
        train: Iterable,
        *,
        structure: str = "ekfac",
        subset: str | Iterable[str] = "all",
        damping: float | Tensor | None = None,
        query_rank: int | None = None,
        progress: bool = False,
        **laplace_options,
    ) -> Influence:
        """Fit a :class:`~bayescurv.Laplace` of ``structure`` (EKFAC by default) on ``train``
        and take its prior precision as the damping: tuned by the evidence when ``damping``
        is ``None`` (``optimize_prior_precision()``, scalar), else set to ``damping``."""
        from bayescurv.laplace import Laplace

        la = Laplace(model, likelihood, subset=subset, structure=structure,
                     **laplace_options).fit(train, progress=progress)
        if damping is None:
            la.optimize_prior_precision()
        else:
            la.prior_precision = damping
        return cls(la, query_rank=query_rank)

    # gradients ---------------------------------------------------------------------------
    def _gradients(self, data: Iterable, x_key: str, y_key: str, progress: bool = False):
        return loss_gradients(self.params, self.likelihood, data, dtype=self.dtype,
                              index=self.index, unknown_layers=self.unknown_layers,
                              batch_dim=self.batch_dim, x_key=x_key, y_key=y_key,
                              progress=progress)

    def gradients(self, data: Iterable, *, x_key: str = "x", y_key: str = "y") -> Tensor:
        """Per-example loss gradients ``(N, P)`` of ``data`` (in :attr:`dtype`)."""
        return torch.cat(list(self._gradients(data, x_key, y_key)))

    def precondition(self, grads: Tensor) -> Tensor:
        """``(G + δI)⁻¹ g`` for the rows of ``grads`` ``(Q, P)``."""
        if grads.dim() != 2 or grads.shape[1] != self.operator.size:
            raise ShapeError(f"grads must be (queries, {self.operator.size}), got "
                             f"{tuple(grads.shape)}")
        return self.operator.solve(grads.to(self.dtype).T).T

    def queries(self, data: Iterable, *, x_key: str = "x", y_key: str = "y") -> QueryGradients:
        """The preconditioned query gradients of ``data`` (low rank with ``query_rank``)."""
        return self._as_queries(self.gradients(data, x_key=x_key, y_key=y_key))

    # scores ------------------------------------------------------------------------------
    def scores(
        self,
        queries: Iterable | QueryGradients,
        train: Iterable,
        *,
        query_chunk: int | None = None,
        x_key: str = "x",
        y_key: str = "y",
        progress: bool = False,
    ) -> Tensor:
        """Pairwise scores ``(Q, N)``: queries (a loader, or :meth:`queries`' result to reuse
        them) against every example of ``train`` (streamed batch by batch), in the model's
        dtype. ``query_chunk``: hold the preconditioned gradients of at most about this many
        queries at a time (whole query batches; the training set is streamed once per chunk),
        so memory stays bounded for any number of queries; ``None``: all at once."""
        if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(
                query_chunk, int) or query_chunk < 1):
            raise InvalidArgumentError(
                f"query_chunk must be a positive int or None, got {query_chunk!r}")
        if isinstance(queries, QueryGradients):
            chunks: Iterable[QueryGradients] = [queries]
        else:
            chunks = self._query_chunks(queries, query_chunk, x_key, y_key)
        rows = [torch.cat([q.scores(v) for v in self._gradients(train, x_key, y_key, progress)],
                          1) for q in chunks]
        return torch.cat(rows, 0).to(self.params.dtype)

    def _query_chunks(self, data: Iterable, size: int | None, x_key: str, y_key: str):
        """Preconditioned query gradients, ``size`` rows or more (whole batches) at a time."""
        buf: list[Tensor] = []
        for g in self._gradients(data, x_key, y_key):
            buf.append(g)
            if size is not None and sum(len(b) for b in buf) >= size:
                yield self._as_queries(torch.cat(buf))
                buf = []
        if buf:
            yield self._as_queries(torch.cat(buf))

    def _as_queries(self, grads: Tensor) -> QueryGradients:
        return QueryGradients(self.precondition(grads), self.params if self.index is None
                              else None, self.query_rank)

    def self_influence(
        self, train: Iterable, *, x_key: str = "x", y_key: str = "y", progress: bool = False,
    ) -> Tensor:
        """``∇ℓ(z_n)ᵀ (G + δI)⁻¹ ∇ℓ(z_n)`` for every example of ``train``, ``(N,)``."""
        out = [(v * self.operator.solve(v.T).T).sum(1)
               for v in self._gradients(train, x_key, y_key, progress)]
        return torch.cat(out).to(self.params.dtype)

    def losses(self, data: Iterable, *, x_key: str = "x", y_key: str = "y") -> Tensor:
        """Per-example losses ``(N,)`` (the baseline ranking self-influence is compared to)."""
        return example_losses(self.params, self.likelihood, data, x_key=x_key, y_key=y_key,
                              batch_dim=self.batch_dim)

    def __repr__(self) -> str:
        return (f"Influence(operator={type(self.operator).__name__}, "
                f"num_params={self.operator.size}, query_rank={self.query_rank})")


def pairwise_scores(source: Laplace | Curvature, queries: Iterable, train: Iterable,
                    **options) -> Tensor:
    """``Influence(source, **options).scores(queries, train)``: scores ``(Q, N)``."""
    split = {k: options.pop(k) for k in ("x_key", "y_key", "progress", "query_chunk")
             if k in options}
    return Influence(source, **options).scores(queries, train, **split)


def self_influence(source: Laplace | Curvature, train: Iterable, **options) -> Tensor:
    """``Influence(source, **options).self_influence(train)``: ``(N,)``."""
    split = {k: options.pop(k) for k in ("x_key", "y_key", "progress") if k in options}
    return Influence(source, **options).self_influence(train, **split)
