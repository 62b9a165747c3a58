"""Predictions of a fitted :class:`~bayescurv.laplace.Laplace` posterior: the linearized
(GLM) predictive and its joint samples, the sampled-network predictive, parameter samples.

Every prediction first checks that the posterior is fitted and tied to the network's live
weights (:meth:`~bayescurv.laplace.Laplace.check_weights`). Inputs may be one batch (a
tensor, an array or a dict of keyword inputs) or a loader of batches, evaluated batch by
batch and concatenated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from bayescurv import batches
from bayescurv.curvature.engine import HookCapture
from bayescurv.deprecation import UNSET, renamed
from bayescurv.errors import EmptyDataError, InvalidArgumentError, ShapeError
from bayescurv.laplace import positions
from bayescurv.laplace.moments import head_predictive
from bayescurv.laplace.predictive import glm_covariance
from bayescurv.likelihoods import Categorical, PerPosition

PRED_TYPES = ("glm", "nn")

CHUNK_SIZE = 64
"""Inputs per chunk when :meth:`~bayescurv.laplace.Laplace.functional` and
:meth:`~bayescurv.laplace.Laplace.predict` get one batch (the default of their
``chunk_size``). The Jacobian pass of the GLM predictive holds every layer's inputs and its
``C`` output gradients for all inputs it sees, so one large batch would cost memory linear in
its size; cut into chunks the peak is that of ``CHUNK_SIZE`` inputs, flat in the number of
inputs per call (issue 26: unchunked, 512 BERT sequences in one call peaked at 4.0 GB, 64 at
0.8 GB). Smaller chunks lower the peak, larger ones amortise per-pass overhead on small
networks."""


def _check_chunk_size(chunk_size: int | None) -> int:
    """``chunk_size`` validated (``None``: :data:`CHUNK_SIZE`, read at call time)."""
    if chunk_size is None:
        return CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(
            f"chunk_size must be a positive int (inputs per Jacobian pass) or None for the "
            f"default {CHUNK_SIZE}, got {chunk_size!r}")
    return chunk_size


def _cat(outs: list):
    """Concatenate per-chunk results along the (batch-first) output dimension: tensors, or
    tuples of tensors (regression's mean and variance)."""
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


class PredictionsMixin:
    """``functional``, ``predict``, ``functional_samples`` and ``sample`` of
    :class:`~bayescurv.laplace.Laplace`."""

    def _inputs(self, x):
        """Validate and move a batch of inputs; the posterior must be fitted and tied to the
        network's live weights (:meth:`check_weights`)."""
        self.check_fitted()
        self.check_weights()
        x = batches.as_tensor(x)
        if isinstance(x, dict):
            x = batches.to_device(x, self.params.device, self.params.dtype)
        else:
            if not torch.is_tensor(x):
                raise InvalidArgumentError(f"x must be a tensor, got {type(x).__name__}")
            if x.dim() == 1 and x.is_floating_point():
                raise ShapeError(
                    f"x has shape {tuple(x.shape)}: predictions take a batch of inputs; for "
                    "one input of D features use x.unsqueeze(0), for a batch of scalars "
                    "x.unsqueeze(-1)")
            x = x.to(device=self.params.device,
                     dtype=self.params.dtype if x.is_floating_point() else x.dtype)
        batches.check_finite(x, "inputs")
        return x

    def _over_batches(self, data: Iterable, fn: Callable, progress: bool, x_key: str,
                      what: str):
        """Apply ``fn`` to the inputs of every batch of ``data`` and concatenate the results
        along their first dimension (outputs are batch-first whatever ``batch_dim``)."""
        it: Iterable = (batches.inputs_of(b, x_key) for b in data)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=what, leave=False)
        outs = [fn(x) for x in it]
        if not outs:
            raise EmptyDataError(f"{what}: the loader yielded no batches")
        return _cat(outs)

    def _chunks(self, x, chunk_size: int | None) -> list:
        """Validated inputs cut into chunks of at most ``chunk_size`` inputs along
        :attr:`batch_dim` (:func:`bayescurv.batches.split_inputs`)."""
        return batches.split_inputs(x, _check_chunk_size(chunk_size), self.batch_dim)

    def _functional(self, x, joint: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`functional` of validated inputs, in one Jacobian pass; for a dense
        (per-position) likelihood the covariance is its ``(B, |S|, C, C)`` per-position
        blocks, computed over chunks of positions (:mod:`.positions`)."""
        if isinstance(self.likelihood, PerPosition):
            if joint:
                raise InvalidArgumentError("joint=True is not available for dense outputs "
                                           "(the predictive is per position)")
            return positions.functional_blocks(self, x)
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x.values() if isinstance(x, dict) else [x])
        )
        capture = HookCapture(self.params, self.structure, self.unknown_layers,
                              differentiable=needs_grad, batch_dim=self.batch_dim)
        return glm_covariance(capture, self.posterior_precision, x, joint=joint,
                              index=self.index)

    def functional(self, x: Tensor | Iterable, joint: bool = False, *, progress: bool = False,
                   x_key: str = "x", chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Linearized network at ``x``: mean ``f(x; θ*)`` ``(B, C)`` and covariance
        ``J Σ Jᵀ`` ``(B, C, C)`` (or ``(B*C, B*C)`` across inputs with ``joint=True``),
        from the posterior's structure without whole-net Jacobians. ``x`` may be a loader
        (any iterable of batches: inputs, ``(x, y)`` or ``(x,)`` tuples, dicts read with
        ``x_key``): evaluated batch by batch (``progress``: a progress bar) and
        concatenated; ``joint=True`` needs one batch.

        A batch is evaluated in chunks of at most ``chunk_size`` inputs (default
        :data:`CHUNK_SIZE`; dict inputs are cut entry by entry along :attr:`batch_dim`), so
        memory is bounded by the chunk, not by the number of inputs; the results are those
        of one pass. ``joint=True`` couples every pair of inputs and runs in one pass over
        the whole batch (its ``(B*C, B*C)`` result is quadratic in ``B`` anyway)."""
        if batches.is_batch_iterable(x):
            if joint:
                raise InvalidArgumentError("joint=True needs the inputs as one batch, not a "
                                           "loader (the covariance couples every pair)")
            return self._over_batches(
                x, lambda b: self.functional(b, chunk_size=chunk_size), progress, x_key,
                "functional")
        x = self._inputs(x)
        if joint:
            return self._functional(x, joint=True)
        return _cat([self._functional(part) for part in self._chunks(x, chunk_size)])

    def _link(self, link: str | None) -> str:
        """``link`` validated for the likelihood; ``None``: ``"probit"`` when the likelihood
        offers it, else its first link."""
        if link is None:
            links = self.likelihood.links
            link = "probit" if "probit" in links else links[0]
        self.likelihood.check_link(link)
        return link

    def predict(
        self,
        x: Tensor,
        link: str | None = None,
        pred_type: str = "glm",
        num_samples: int = 100,
        generator: torch.Generator | None = None,
        *,
        progress: bool = False,
        x_key: str = "x",
        chunk_size: int | None = None,
    ):
        """Predictive distribution at ``x`` (a batch, or a loader as in :meth:`functional`,
        evaluated batch by batch).

        Classification: class probabilities ``(B, C)`` (``link`` in ``"probit"`` — the
        default —, ``"bridge"``, ``"mc"``). Binary: ``p(y=1)`` ``(B,)``. Regression: predictive
        mean and variance (observation noise included), each ``(B, C)``. Another
        :class:`~bayescurv.likelihoods.Likelihood`: its ``predictive`` (default link
        ``"probit"`` when it offers one, else its first). ``pred_type="nn"`` averages the
        network over ``num_samples`` posterior samples instead of linearizing.

        A batch is evaluated in chunks of at most ``chunk_size`` inputs (default
        :data:`CHUNK_SIZE`), so memory is bounded by the chunk; the result does not depend
        on the chunking (``link="mc"`` draws once for the whole batch, ``pred_type="nn"``
        uses the same parameter samples for every chunk).
        """
        if pred_type not in PRED_TYPES:
            raise InvalidArgumentError(f"unknown pred_type {pred_type!r}; use one of {PRED_TYPES}")
        link = self._link(link)
        if batches.is_batch_iterable(x):
            return self._over_batches(
                x, lambda b: self.predict(b, link, pred_type, num_samples, generator,
                                          chunk_size=chunk_size),
                progress, x_key, "predict")
        x = self._inputs(x)
        parts = self._chunks(x, chunk_size)
        if pred_type == "nn":
            return self._predict_nn(parts, num_samples, generator)
        head = self._head_predictive(parts, link)
        if head is not None:  # an output-layer posterior: O(C) per input, no C x C
            return head
        if link == "mc" or len(parts) == 1:  # one draw for all inputs: chunking-independent
            mean, cov = _cat([self._functional(part) for part in parts])
            return self.likelihood.predictive(mean, cov, link, num_samples, generator)
        return _cat([self.likelihood.predictive(*self._functional(part), link, num_samples,
                                                generator) for part in parts])

    def _head_predictive(self, parts: list, link: str) -> Tensor | None:
        """Probabilities over the input chunks when the probit or bridge link of a
        categorical likelihood reads only two moments of the covariance and the posterior is
        the output layer alone (:func:`~bayescurv.laplace.moments.head_predictive`); else
        ``None``."""
        if (link not in ("probit", "bridge") or type(self.likelihood) is not Categorical
                or self.index is not None or torch.is_grad_enabled() and any(
                    t.requires_grad for p in parts
                    for t in (p.values() if isinstance(p, dict) else [p]))):
            return None
        capture = HookCapture(self.params, self.structure, self.unknown_layers,
                              batch_dim=self.batch_dim)
        return head_predictive(capture, self.posterior_precision, parts, link)

    @torch.no_grad()
    def _predict_nn(self, parts: list, num_samples: int, generator):
        """Sampled-network predictive over validated input chunks: the same ``num_samples``
        parameter draws for every chunk."""
        thetas = self.sample(num_samples, generator)
        outs = []
        try:
            full = self.params.vector()
            for theta in thetas:
                self.params.assign(self.with_posterior_entries(theta, full))
                outs.append(torch.cat([self.likelihood.check_outputs(self.params.forward(p))
                                       for p in parts]))
        finally:
            self.params.assign(full)  # exactly the weights found (== θ*, checked above)
        return self.likelihood.predictive_from_samples(torch.stack(outs))

    def functional_samples(
        self, x: Tensor, num_samples: int = 100, generator: torch.Generator | None = None,
        *, n: int = UNSET,
    ) -> Tensor:
        """``num_samples`` samples of the linearized network's outputs at the inputs ``x`` drawn
        *jointly* across inputs and outputs from ``N(f(x; θ*), J Σ Jᵀ)``: shape ``(n, B, C)``.
        (Draws for different inputs are correlated exactly as the posterior says, not
        perfectly.)"""
        from bayescurv.links import psd_sqrt

        n = renamed(num_samples, n, "num_samples", "n", "Laplace.functional_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"num_samples must be a positive integer, got {n}")
        mean, cov = self.functional(x, joint=True)
        root = psd_sqrt(cov)
        z = torch.randn(cov.shape[0], n, generator=generator, dtype=cov.dtype,
                        device=cov.device)
        return mean.unsqueeze(0) + (root @ z).T.reshape(n, *mean.shape)

    def sample(self, num_samples: int = 100, generator: torch.Generator | None = None,
               *, n: int = UNSET) -> Tensor:
        """``num_samples`` parameter vectors from the posterior, ``(n, num_params)`` in flat order
        (for a masked subnetwork: the masked entries, in flat order)."""
        self.check_fitted()
        n = renamed(num_samples, n, "num_samples", "n", "Laplace.sample")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"num_samples must be a positive integer, got {n}")
        draws = self.mean + self.posterior_precision.sample_inverse(n, generator)
        return draws.to(self.params.dtype)


__all__ = ["PredictionsMixin", "PRED_TYPES", "CHUNK_SIZE"]
