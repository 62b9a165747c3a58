"""Plots of :class:`~bayescurv.diagnostics.TrainingMonitor` histories (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LOG_SCALE = ("trace", "trace_kfac", "top_eigenvalue", "tic", "grad_norm", "grad_variance",
             "snr", "noise_scale")
LABELS = {"loss": "batch loss", "trace": "tr G (Hutchinson)", "trace_kfac": "tr G (K-FAC)",
          "top_eigenvalue": "top Hessian eigenvalue", "tic": "TIC penalty tr(H⁻¹C)",
          "grad_norm": "‖mean gradient‖", "grad_variance": "tr Σ (gradient variance)",
          "snr": "gradient SNR", "noise_scale": "gradient noise scale",
          "alpha": "effective step α"}


def plot_histories(monitors: Mapping[str, Any], path: str | None = None, *,
                   title: str | None = None, axes=None, lrs: Mapping[str, float] | None = None):
    """One panel per quantity, one line per monitor (``{label: TrainingMonitor}``). With
    ``lrs`` (``{label: learning rate}``) the top-eigenvalue panel also shows the stability
    threshold ``2 / lr`` of each run. Saved to ``path`` when given; returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for m in monitors.values():
        keys += [k for k in m.history if k not in keys]
    if axes is None:
        cols = 3
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        axes = axes.reshape(-1)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
    fig = axes[0].figure
    for ax, key in zip(axes, keys):
        for i, (label, m) in enumerate(monitors.items()):
            if key not in m.history:
                continue
            ys = m.history[key]
            ax.plot(m.steps[:len(ys)], ys, label=label or None, color=f"C{i}", lw=1.3)
            if key == "top_eigenvalue" and lrs and label in lrs:
                ax.axhline(2 / lrs[label], color=f"C{i}", ls=":", lw=1)
        ax.set_title(LABELS.get(key, key), fontsize=9)
        if key in LOG_SCALE:
            ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    if len(monitors) > 1:
        axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
