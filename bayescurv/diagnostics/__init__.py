"""Training-time instruments on the curvature engine: loss-curvature trace (Hutchinson and
K-FAC), top eigenvalue (Lanczos), the Takeuchi information criterion, gradient
signal-to-noise / noise scale and Cockpit's local effective step size, as functions and as a
callback for any training loop (:class:`TrainingMonitor`). See ``docs/diagnostics.md``."""

from bayescurv.diagnostics.instruments import (
    curvature_trace,
    effective_step,
    gradient_noise,
    tic,
    top_eigenvalue,
)
from bayescurv.diagnostics.monitor import INSTRUMENTS, TrainingMonitor
from bayescurv.diagnostics.plot import plot_histories

__all__ = ["TrainingMonitor", "INSTRUMENTS", "curvature_trace", "top_eigenvalue", "tic",
           "gradient_noise", "effective_step", "plot_histories"]
