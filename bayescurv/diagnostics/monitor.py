"""A callback for any training loop: every ``every`` steps it measures the instruments of
:mod:`bayescurv.diagnostics.instruments` on the current batch and keeps their history.

```python
monitor = TrainingMonitor(model, "classification", every=10)
for step, (x, y) in enumerate(loader):
    monitor.before_step(step, (x, y))       # instruments at θ_t (a logged step only)
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    monitor.after_step(step, (x, y))        # α from θ_t -> θ_{t+1}
monitor.history["top_eigenvalue"]           # one value per logged step
monitor.plot("diagnostics.png")
```

The instruments are measured with the network in eval mode (BatchNorm running statistics,
no dropout), its training flags restored afterwards; they never touch ``.grad`` or the
optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.diagnostics import instruments as ins
from bayescurv.errors import InvalidArgumentError
from bayescurv.influence.gradients import example_losses, loss_gradients
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.params import ParamSet, select

INSTRUMENTS = ("loss", "trace", "trace_kfac", "top_eigenvalue", "tic", "gradient_noise",
               "alpha")
"""What :class:`TrainingMonitor` can measure. ``gradient_noise`` logs ``grad_norm``,
``grad_variance``, ``snr`` and ``noise_scale``."""


class TrainingMonitor:
    """Curvature and gradient-noise instruments as a training-loop callback.

    Args:
        model: the network being trained.
        likelihood: its loss as a likelihood (``"classification"``: cross-entropy,
            ``"regression"``: squared error, ...).
        every: log every ``every``-th step (``step % every == 0``).
        instruments: a subset of :data:`INSTRUMENTS`.
        subset: the parameters measured (as :func:`bayescurv.compute`).
        hutchinson_samples: probes of the Hutchinson trace (``kind="ggn"``).
        lanczos_iter: Lanczos steps of the top Hessian eigenvalue.
        tic_structure: the curvature structure of the TIC (``"diag"``: Cockpit's TICDiag).
        generator: random source of the probes and Lanczos start vectors.
        x_key, y_key: keys of dict batches.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        *,
        every: int = 10,
        instruments: Sequence[str] = INSTRUMENTS,
        subset: str | Iterable[str] = "all",
        hutchinson_samples: int = 4,
        lanczos_iter: int = 10,
        tic_structure: str = "diag",
        generator: torch.Generator | None = None,
        x_key: str = "x",
        y_key: str = "y",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgumentError(f"every must be a positive int, got {every!r}")
        unknown = [i for i in instruments if i not in INSTRUMENTS]
        if unknown or isinstance(instruments, str):
            raise InvalidArgumentError(
                f"unknown instruments {unknown or instruments!r}; choose from {INSTRUMENTS}")
        if tic_structure not in ins.TIC_STRUCTURES:
            raise InvalidArgumentError(
                f"tic_structure must be one of {ins.TIC_STRUCTURES}, got "
                f"{tic_structure!r}")
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.params: ParamSet = select(model, subset)
        self.every = every
        self.instruments = tuple(instruments)
        self.options = dict(hutchinson_samples=hutchinson_samples, lanczos_iter=lanczos_iter,
                            tic_structure=tic_structure)
        self.generator = generator
        self.keys = {"x_key": x_key, "y_key": y_key}
        self.steps: list[int] = []
        self.history: dict[str, list[float]] = {}
        self._start: dict[str, Any] | None = None

    def logs(self, step: int) -> bool:
        """Whether ``step`` is a logged step."""
        return step % self.every == 0

    def before_step(self, step: int, batch: Any) -> dict[str, float] | None:
        """Measure the instruments at the current weights on ``batch`` (an ``(x, y)`` pair or
        a dict batch) if ``step`` is logged; return what was logged (else ``None``)."""
        if not self.logs(step):
            return None
        with _eval_mode(self.model):
            data = [batch]
            grads, losses = self._gradients(data)
            row: dict[str, float] = {"loss": float(losses.mean())}
            want = set(self.instruments)
            lik, opt, gen = self.likelihood, self.options, self.generator
            if "trace" in want:
                row["trace"] = float(ins.curvature_trace(
                    self.model, lik, data, subset=self.params, generator=gen,
                    num_samples=opt["hutchinson_samples"], **self.keys))
            if "trace_kfac" in want:
                row["trace_kfac"] = float(ins.curvature_trace(
                    self.model, lik, data, method="kfac", subset=self.params, **self.keys))
            if "top_eigenvalue" in want:
                row["top_eigenvalue"] = float(ins.top_eigenvalue(
                    self.model, lik, data, subset=self.params, num_iter=opt["lanczos_iter"],
                    generator=gen, **self.keys))
            if "tic" in want:
                row["tic"] = float(ins.tic(grads, self.model, lik, data,
                                                   structure=opt["tic_structure"],
                                                   subset=self.params, **self.keys))
            if "gradient_noise" in want:
                row.update({k: float(v) for k, v in ins.gradient_noise(grads).items()})
        if "alpha" in self.instruments:
            self._start = {"step": step, "theta": self.params.vector(), "grads": grads,
                           "losses": losses}
        self._record(step, row)
        return row

    def after_step(self, step: int, batch: Any) -> float | None:
        """After the optimizer step of a logged ``step``: Cockpit's α on the same batch
        (needs :meth:`before_step` of that step); returns it (else ``None``)."""
        start, self._start = self._start, None
        if start is None or start["step"] != step:
            return None
        with _eval_mode(self.model):
            grads, losses = self._gradients([batch])
        alpha = float(ins.effective_step(
            self.params.vector() - start["theta"], (start["losses"], losses),
            (start["grads"], grads)))
        self.history.setdefault("alpha", []).append(alpha)
        return alpha

    # ------------------------------------------------------------------------------------
    def _gradients(self, data: list) -> tuple[Tensor, Tensor]:
        grads = torch.cat(list(loss_gradients(self.params, self.likelihood, data, **self.keys)))
        return grads, example_losses(self.params, self.likelihood, data, **self.keys)

    def _record(self, step: int, row: dict[str, float]) -> None:
        self.steps.append(step)
        for k, v in row.items():
            self.history.setdefault(k, []).append(v)

    def plot(self, path: str | None = None, *, title: str | None = None, axes=None):
        """One panel per logged quantity over the logged steps (matplotlib); saved to
        ``path`` (PNG) when given. Returns the figure."""
        from bayescurv.diagnostics.plot import plot_histories

        return plot_histories({"": self}, path, title=title, axes=axes)


class _eval_mode:
    """Context: the model in eval mode, every module's training flag restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag
