r"""Training-data attribution on the curvature engine: influence functions
:math:`\nabla\ell(z_q)^\top (G + \delta I)^{-1} \nabla\ell(z_n)` with ``G`` in any structure
(EKFAC by default) and the damping :math:`\delta` the (evidence-tuned) prior precision of a
fitted :class:`~bayescurv.Laplace`; pairwise scores streamed over the training set,
self-influence, top-k. See ``docs/influence.md``."""

from bayescurv.influence.gradients import example_losses, loss_gradients
from bayescurv.influence.queries import QueryGradients
from bayescurv.influence.scores import (
    Influence,
    TopK,
    pairwise_scores,
    self_influence,
    top_k,
)

__all__ = ["Influence", "TopK", "top_k", "pairwise_scores", "self_influence",
           "QueryGradients", "loss_gradients", "example_losses"]
