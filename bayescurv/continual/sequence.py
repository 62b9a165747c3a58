"""Plumbing shared by the continual-learning filters: the parameter set and its checks, the
task phases, data validation, and the prior's mean and precision vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.batches import peek_inputs
from bayescurv.continual.dynamics import check_finite_positive
from bayescurv.errors import BayesCurvError, InvalidArgumentError, NotFittedError, ShapeError
from bayescurv.likelihoods import Likelihood, get_likelihood
from bayescurv.params import OutputKey, ParamSet, check_output_key, select

__all__ = ["TaskSequence", "prior_mean_vector", "prior_precision_vector"]


class TaskSequence:
    """Parameter bookkeeping and phase checks shared by the filters."""

    def __init__(self, model: nn.Module, likelihood: str | Likelihood, subset: Any,
                 output_key: OutputKey = None) -> None:
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.subset = subset
        output_key = check_output_key(output_key)
        if isinstance(subset, ParamSet):
            self.params = subset if output_key is None else dataclasses.replace(
                subset, output_key=output_key)
        else:
            self.params = select(model, subset, output_key=output_key)
        self._signature = [(n, tuple(p.shape)) for n, p in zip(self.params.names,
                                                                self.params.params)]
        self._phase = "start"  # start -> predicted -> filtered -> predicted -> ...
        self._input_shape: tuple[int, ...] | None = None  # per-example inputs of the tasks
        self._candidate_shape: tuple[int, ...] | None = None

    @property
    def num_params(self) -> int:
        return self.params.numel

    def _params_of(self, model: nn.Module | None, where: str) -> ParamSet:
        """The parameter set of ``model`` (default: the filter's), checked against the first."""
        if model is None or model is self.model:
            return self.params
        subset = self.subset if not isinstance(self.subset, ParamSet) else self.params.names
        pset = select(model, subset, output_key=self.params.output_key)
        sig = [(n, tuple(p.shape)) for n, p in zip(pset.names, pset.params)]
        if sig != self._signature:
            diff = [(a, b) for a, b in zip(self._signature, sig) if a != b][:3]
            raise ShapeError(
                f"{where}: the model does not match the one the filter was built for "
                f"({len(self._signature)} parameters / P={self.params.numel} before, "
                f"{len(sig)} / P={pset.numel} now; first differences (before, now): {diff}). "
                "Every task must use the same architecture and parameter subset."
            )
        return pset

    def _check_data(self, data: Iterable[Any], where: str) -> Iterable[Any]:
        """``data`` (re-chained when one-shot), its first batch's inputs checked against the
        per-example shape of the earlier tasks' inputs."""
        x, data = peek_inputs(data)
        if isinstance(x, Tensor):
            shape = tuple(x.shape[1:])
            if self._input_shape is not None and shape != self._input_shape:
                raise ShapeError(
                    f"{where}: the data's inputs have per-example shape {shape}, but the filter "
                    f"was built on inputs of shape {self._input_shape} (earlier tasks); every "
                    "task must feed the same model the same input layout"
                )
            self._candidate_shape = shape  # recorded once a pass over the data succeeds
        return data

    @contextmanager
    def _data_pass(self, where: str) -> Iterator[None]:
        """Re-raise torch's shape errors from a pass of the model over the data as a
        library :class:`~bayescurv.errors.ShapeError` that names the problem."""
        try:
            yield
            if self._input_shape is None:
                self._input_shape = self._candidate_shape
        except RuntimeError as err:
            if isinstance(err, BayesCurvError) or not any(
                    w in str(err) for w in ("shape", "size", "dimension")):
                raise
            raise ShapeError(
                f"{where}: the model cannot run on the data (inputs of per-example shape "
                f"{self._candidate_shape}): {err}. Give the data the model "
                "was built for."
            ) from err

    def _require(self, phase: str, what: str) -> None:
        if self._phase != phase:
            hint = {
                "predicted": "call predict() at the start of each task",
                "filtered": "call update(data) after training on the task",
            }[phase]
            raise NotFittedError(f"{what} needs the filter in the {phase!r} phase: {hint}")

    @staticmethod
    def _theta(pset: ParamSet) -> Tensor:
        """The flat parameters, differentiable."""
        return torch.cat([p.reshape(-1) for p in pset.params])


def prior_mean_vector(prior_mean: Any, params: ParamSet) -> Tensor:
    if prior_mean is None:
        return torch.zeros(params.numel, dtype=params.dtype, device=params.device)
    if isinstance(prior_mean, str):
        if prior_mean != "init":
            raise InvalidArgumentError(f"prior_mean must be None, 'init' or a tensor, got "
                                       f"{prior_mean!r}")
        return params.vector().clone()
    m = torch.as_tensor(prior_mean, dtype=params.dtype, device=params.device)
    if m.shape != (params.numel,):
        raise ShapeError(f"prior_mean must have shape ({params.numel},), got {tuple(m.shape)}")
    return m.clone()


def prior_precision_vector(prior_precision: float | Tensor, params: ParamSet) -> Tensor:
    if isinstance(prior_precision, Tensor) and prior_precision.numel() > 1:
        d = prior_precision.detach().to(dtype=params.dtype, device=params.device)
        if d.shape != (params.numel,):
            raise ShapeError(f"prior_precision must be a scalar or ({params.numel},), got "
                             f"{tuple(d.shape)}")
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise InvalidArgumentError("prior_precision must be finite and > 0 everywhere")
        return d.clone()
    delta = check_finite_positive(float(prior_precision), "prior_precision")
    return torch.full((params.numel,), delta, dtype=params.dtype, device=params.device)


