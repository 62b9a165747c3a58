r"""Detecting an under-confident tuned posterior.

All-weights Laplace with an evidence-tuned prior can spread the linearized predictive so
much that it is far less confident than the MAP network *on the training data* (measured:
all-weights K-FAC on a digits CNN takes the ECE from 0.009 to 0.73). The check compares the
mean confidence (largest class probability) of the MAP and of the Laplace predictive on a
few training inputs kept at :meth:`~bayescurv.laplace.Laplace.fit`, relative to chance
:math:`1/C`: it warns when

.. math:: \bar c_{Laplace} - 1/C < \text{FRACTION}\,(\bar c_{MAP} - 1/C),

i.e. when the posterior gives up more than half of the MAP's confidence above chance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayescurv import batches
from bayescurv.errors import UnderconfidenceWarning

FRACTION = 0.5
"""Warn when less than this fraction of the MAP's confidence above chance remains."""
NUM_INPUTS = 32
"""Training inputs kept by ``fit`` for the check (from the first batch)."""


class _Tap:
    """Iterates ``loader``, handing the inputs of the first batch read to ``keep`` once."""

    def __init__(self, loader: Iterable, keep: Callable[[Any], None], x_key: str,
                 y_key: str) -> None:
        self.loader, self.keep, self.keys, self.done = loader, keep, (x_key, y_key), False

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if not self.done:
                self.keep(batches.inputs_of(batch, *self.keys))
                self.done = True
            yield batch


def tap_inputs(loader: Iterable, batch_dim: int, x_key: str, y_key: str,
               store: Callable[[Any], None]) -> Iterable:
    """``loader`` for the fit, handing the first :data:`NUM_INPUTS` inputs of its first batch
    to ``store`` as the fit's first pass reads them (no extra read of the data); re-iterable
    exactly when ``loader`` is."""
    batches.check_data(loader)

    def keep(x) -> None:
        n = min(NUM_INPUTS, batches.batch_size(x, batch_dim))
        store(batches.split_inputs(x, n, batch_dim)[0])

    tap = _Tap(loader, keep, x_key, y_key)
    return iter(tap) if batches.is_one_shot(loader) else tap


def mean_confidence(probs: Tensor) -> Tensor:
    """Mean largest class probability; binary ``p(y=1)`` of shape ``(B,)`` included."""
    if probs.dim() == 1:
        return torch.maximum(probs, 1 - probs).mean()
    return probs.amax(-1).mean()


def warn_if_underconfident(map_probs: Tensor, laplace_probs: Tensor) -> None:
    """Issue an :class:`~bayescurv.errors.UnderconfidenceWarning` when the Laplace predictive
    keeps less than :data:`FRACTION` of the MAP's confidence above chance."""
    num_classes = 2 if map_probs.dim() == 1 else map_probs.shape[-1]
    chance = 1.0 / num_classes
    c_map, c_la = float(mean_confidence(map_probs)), float(mean_confidence(laplace_probs))
    if c_map - chance > 0.05 and c_la - chance < FRACTION * (c_map - chance):
        warnings.warn(
            f"the tuned Laplace predictive is far less confident than the MAP on training "
            f"inputs (mean confidence {c_la:.2f} vs {c_map:.2f}, chance {chance:.2f}): "
            "all-weights Laplace is often under-confident in distribution; consider "
            "subset='last_layer', granularity='layer' or 'tensor', or "
            "method='gridsearch' on validation data (see the guide)",
            UnderconfidenceWarning, stacklevel=3)


__all__ = ["warn_if_underconfident", "mean_confidence", "FRACTION", "NUM_INPUTS"]
