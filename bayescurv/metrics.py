r"""Evaluation metrics for predictive distributions (pure torch).

Classification metrics take probabilities ``probs`` of shape ``(N, C)``, or for binary
problems ``(N,)`` (or ``(N, 1)``) holding :math:`p(y = 1)`, and integer labels ``y`` of
shape ``(N,)``. Scalar metrics return Python floats; per-sample quantities (``entropy``,
``max_prob`` with ``reduction="none"``) return tensors on the input's device.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from bayescurv.errors import EmptyDataError, InvalidArgumentError, ShapeError
from bayescurv.likelihoods import class_indices

_EPS = 1e-12


# ----------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------
def _as_class_probs(probs: Tensor) -> Tensor:
    """``(N, C)`` class probabilities; binary ``(N,)``/``(N, 1)`` p(y=1) become ``[1-p, p]``."""
    if not torch.is_tensor(probs) or not probs.is_floating_point():
        raise ShapeError("probs must be a floating-point tensor")
    if probs.dim() == 2 and probs.shape[1] == 1:
        probs = probs.squeeze(1)
    if probs.dim() == 1:
        probs = torch.stack([1.0 - probs, probs], dim=-1)
    if probs.dim() != 2:
        raise ShapeError(
            f"probs must have shape (N, classes), or (N,) for binary p(y=1); "
            f"got {tuple(probs.shape)}"
        )
    if probs.shape[0] == 0:
        raise EmptyDataError("metrics need at least one prediction; got an empty batch")
    return probs


def _as_labels(y: Tensor, probs: Tensor) -> Tensor:
    if torch.is_tensor(y):
        y = y.to(device=probs.device)
    return class_indices(y, probs.shape[0], probs.shape[1])


def _check_num_bins(num_bins: int) -> None:
    if not isinstance(num_bins, int) or num_bins < 1:
        raise InvalidArgumentError(f"num_bins must be a positive integer, got {num_bins}")


def _reduce(values: Tensor, reduction: str) -> Tensor | float:
    if reduction == "mean":
        return values.mean().item()
    if reduction == "sum":
        return values.sum().item()
    if reduction == "none":
        return values
    raise InvalidArgumentError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------
def accuracy(probs: Tensor, y: Tensor) -> float:
    r"""Fraction of correct arg-max predictions, :math:`\frac1N\sum_n [\arg\max_c p_{nc} = y_n]`.
    For binary ``(N,)`` probabilities the prediction is :math:`p > 1/2`."""
    probs = _as_class_probs(probs)
    y = _as_labels(y, probs)
    return (probs.argmax(-1) == y).double().mean().item()


def nll(probs: Tensor, y: Tensor) -> float:
    r"""Mean negative log-probability of the true class,
    :math:`-\frac1N \sum_n \log \max(p_{n y_n}, 10^{-12})`."""
    probs = _as_class_probs(probs)
    y = _as_labels(y, probs)
    p = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -torch.log(p.double().clamp_min(_EPS)).mean().item()


def max_prob(probs: Tensor, reduction: str = "mean") -> Tensor | float:
    r"""Confidence :math:`\max_c p_{nc}`; mean over samples by default (``"none"`` gives
    the ``(N,)`` per-sample values, e.g. for the OOD score :math:`1 - \max_c p_{nc}`)."""
    return _reduce(_as_class_probs(probs).amax(-1), reduction)


def entropy(probs: Tensor, reduction: str = "none") -> Tensor | float:
    r"""Predictive entropy :math:`H_n = -\sum_c p_{nc} \log p_{nc}` (with :math:`0 \log 0 = 0`),
    per sample ``(N,)`` by default, or its ``"mean"``/``"sum"``."""
    probs = _as_class_probs(probs)
    h = -torch.special.xlogy(probs, probs).sum(-1)
    return _reduce(h, reduction)


def reliability_diagram(probs: Tensor, y: Tensor, num_bins: int = 15) -> dict[str, Any]:
    r"""Confidence histogram for a reliability diagram.

    Confidences :math:`\hat p_n = \max_c p_{nc}` fall into ``num_bins`` equal-width bins
    :math:`B_b = (\frac{b}{M}, \frac{b+1}{M}]` (a confidence of exactly 0 goes into the
    first). Returns a dict of CPU float64 tensors of length ``num_bins``: ``"confidence"``
    (mean :math:`\hat p` per bin), ``"accuracy"`` (fraction correct per bin), ``"count"``
    (samples per bin; empty bins have zero confidence and accuracy), ``"bin_edges"``
    (``num_bins + 1``), and the floats ``"ece"`` and ``"num_samples"``.
    """
    _check_num_bins(num_bins)
    probs = _as_class_probs(probs)
    y = _as_labels(y, probs)
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()
    idx = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=torch.float64, device=probs.device)
    conf_sum = torch.zeros_like(count)
    acc_sum = torch.zeros_like(count)
    count.index_add_(0, idx, torch.ones_like(conf))
    conf_sum.index_add_(0, idx, conf)
    acc_sum.index_add_(0, idx, correct)
    safe = count.clamp_min(1.0)
    confidence, acc = conf_sum / safe, acc_sum / safe
    n = conf.shape[0]
    ece_value = ((count / n) * (acc - confidence).abs()).sum().item()
    return {
        "confidence": confidence.cpu(),
        "accuracy": acc.cpu(),
        "count": count.cpu(),
        "bin_edges": torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64),
        "ece": ece_value,
        "num_samples": n,
    }


def ece(probs: Tensor, y: Tensor, num_bins: int = 15) -> float:
    r"""Expected calibration error with equal-width confidence bins,

    .. math:: ECE = \sum_b \frac{|B_b|}{N}\,\big|acc(B_b) - conf(B_b)\big|,

    bins as in :func:`reliability_diagram`."""
    return reliability_diagram(probs, y, num_bins)["ece"]


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` with ties getting the average of their ranks."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    del values
    counts = counts.double()
    upper = torch.cumsum(counts, 0)  # highest rank in each group of ties
    avg = upper - (counts - 1.0) / 2.0
    return avg[inverse]


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    r"""Area under the ROC curve for telling out-of-distribution from in-distribution
    samples, where OOD samples should have the *higher* score (e.g. :math:`1 - \max_c p`
    or the entropy). Equals :math:`P(s_{out} > s_{in}) + \tfrac12 P(s_{out} = s_{in})`,
    computed from the Mann-Whitney statistic with average ranks for ties:

    .. math:: AUROC = \frac{R_{out} - n_{out}(n_{out}+1)/2}{n_{in}\, n_{out}}.
    """
    s_in = torch.as_tensor(scores_in).reshape(-1)
    s_out = torch.as_tensor(scores_out).reshape(-1).to(s_in.device)
    if s_in.numel() == 0 or s_out.numel() == 0:
        raise EmptyDataError("auroc needs at least one in- and one out-of-distribution score")
    both = torch.cat([s_in.double(), s_out.double()])
    if not torch.isfinite(both).all():
        raise InvalidArgumentError("auroc scores must be finite")
    ranks = _average_ranks(both)
    n_in, n_out = s_in.numel(), s_out.numel()
    r_out = ranks[n_in:].sum()
    return ((r_out - n_out * (n_out + 1) / 2.0) / (n_in * n_out)).item()


# ----------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------
def _regression_inputs(mean: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if mean.dim() == 1:
        mean = mean.unsqueeze(-1)
    y = torch.as_tensor(y).to(device=mean.device, dtype=mean.dtype)
    if y.dim() == 1:
        y = y.unsqueeze(-1)
    if y.shape != mean.shape:
        raise ShapeError(
            f"targets of shape {tuple(y.shape)} do not fit predictions {tuple(mean.shape)}"
        )
    if mean.shape[0] == 0:
        raise EmptyDataError("metrics need at least one prediction; got an empty batch")
    return mean, y


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    r"""Mean Gaussian negative log predictive density,

    .. math:: \frac{1}{N D} \sum_{n,d} \tfrac12 \log(2\pi v_{nd})
              + \frac{(y_{nd} - \mu_{nd})^2}{2 v_{nd}},

    over the ``N x D`` entries. ``mean`` ``(N, D)`` or ``(N,)``; ``var`` the predictive
    variances of the same shape, or covariances ``(N, D, D)`` (their diagonal is used)."""
    mean, y = _regression_inputs(mean, y)
    var = torch.as_tensor(var).to(device=mean.device, dtype=mean.dtype)
    if var.dim() == 3:
        var = torch.diagonal(var, dim1=-2, dim2=-1)
    if var.dim() == 1:
        var = var.unsqueeze(-1)
    if var.shape != mean.shape:
        raise ShapeError(
            f"variances of shape {tuple(var.shape)} do not fit predictions {tuple(mean.shape)}"
        )
    if (var <= 0).any():
        raise InvalidArgumentError("predictive variances must be positive")
    terms = 0.5 * (math.log(2 * math.pi) + torch.log(var) + (y - mean) ** 2 / var)
    return terms.double().mean().item()


def rmse(mean: Tensor, y: Tensor) -> float:
    r"""Root mean squared error :math:`\sqrt{\frac{1}{ND}\sum_{n,d}(y_{nd}-\mu_{nd})^2}`."""
    mean, y = _regression_inputs(mean, y)
    return torch.sqrt(((y - mean).double() ** 2).mean()).item()


# ----------------------------------------------------------------------------------------
# plotting
# ----------------------------------------------------------------------------------------
def plot_reliability(
    diagrams: dict[str, dict[str, Any]],
    path: str | os.PathLike[str],
    dpi: int = 100,
    title: str | None = None,
) -> str:
    """Write a PNG with one reliability diagram per model (``name -> reliability_diagram
    output``), side by side.

    Each model gets a column of two panels. Top: per confidence bin, the accuracy of the
    points in the bin as an opaque bar (lighter for a bin of fewer than 10 points), the bin's
    mean confidence as a black tick, and the diagonal of perfect calibration (accuracy =
    confidence): a bar below the diagonal (and below its tick) is over-confident, above it
    under-confident; ECE in the panel title.
    Bottom: the number of points of each bin (log scale), written above its bar, so that a
    bin of one point does not pass for evidence. A legend under the panels says what each mark
    is; ``title`` (e.g. the data set and models) goes above them. Renders with matplotlib's
    Agg canvas (no pyplot); returns the path.
    """
    if not diagrams:
        raise InvalidArgumentError("plot_reliability needs at least one diagram")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(diagrams)
    # A bare Figure on the Agg canvas: no pyplot state, the user's backend is untouched.
    height = (5.4 if title else 4.9) + (0.6 if n == 1 else 0.0)  # n = 1: legend in one column
    fig = Figure(figsize=(3.6 * n, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bar_color, few_color, edge, few_points = "tab:blue", "#a9c8e6", "white", 10
    for col, (name, d) in enumerate(diagrams.items()):
        ax, ax_n = axes[0, col], axes[1, col]
        edges = torch.as_tensor(d["bin_edges"], dtype=torch.float64).cpu().numpy()
        acc = torch.as_tensor(d["accuracy"], dtype=torch.float64).cpu().numpy()
        conf = torch.as_tensor(d["confidence"], dtype=torch.float64).cpu().numpy()
        counts = torch.as_tensor(d["count"], dtype=torch.float64).cpu().numpy()
        mask = counts > 0
        left, width = edges[:-1][mask], (edges[1:] - edges[:-1])[mask]
        few = counts[mask] < few_points
        colors = [few_color if f else bar_color for f in few]
        ax.bar(left, acc[mask], width=width, align="edge", color=colors, edgecolor=edge,
               lw=0.8, zorder=2)
        ax.plot([0, 1], [0, 1], color="0.3", ls="--", lw=1, zorder=4)
        ax.hlines(conf[mask], left + 0.15 * width, left + 0.85 * width, color="k", lw=2,
                  zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}\nECE {float(d.get('ece', float('nan'))):.3f}", fontsize=10)
        ax.grid(axis="y", color="0.9", lw=0.6, zorder=0)

        shown = counts[mask]
        ax_n.bar(left, shown, width=width, align="edge", color="0.55", edgecolor=edge, lw=0.8)
        ax_n.set_yscale("log")
        top = float(shown.max()) if shown.size else 1.0
        rotate = any(c >= 1000 for c in shown)  # 4 digits would collide side by side
        ax_n.set_ylim(0.5, top * (100 if rotate else 12))  # head-room (log) for the labels
        for x0, w, c in zip(left, width, shown):  # points per bin, above its bar
            ax_n.text(x0 + w / 2, c * 1.25, str(int(c)), ha="center", va="bottom",
                      fontsize=7, rotation=90 if rotate else 0)
        ax_n.set_xlabel("confidence (max. probability)")
        ax_n.tick_params(axis="y", labelsize=7)
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("points per bin")
    handles = [
        Patch(facecolor=bar_color, label="accuracy of the bin's points"),
        Patch(facecolor=few_color, label=f"same, bin of < {few_points} points"),
        Line2D([], [], color="k", lw=2, label="their mean confidence"),
        Line2D([], [], color="0.3", ls="--", lw=1, label="perfect calibration"),
        Patch(facecolor="0.55", label="points per bin (log scale)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols={1: 1, 2: 3}.get(n, 5),
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path


__all__ = [
    "accuracy",
    "nll",
    "ece",
    "reliability_diagram",
    "auroc",
    "max_prob",
    "entropy",
    "gaussian_nll",
    "rmse",
    "plot_reliability",
]
