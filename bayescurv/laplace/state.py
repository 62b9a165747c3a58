"""Saving and restoring a fitted :class:`~bayescurv.laplace.Laplace` posterior.

A state dict holds tensors, strings and lists only (it loads with
``torch.load(path, weights_only=True)``). Loading validates it completely before anything
is assigned — the keys, the likelihood / structure / kind, the parameter names *and shapes*,
the length of the mean, the curvature's size and the finiteness of every tensor — so that a
state of another model is refused with a message instead of loading and failing (or
predicting NaN) later. A failed load leaves the posterior as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError
from bayescurv.linalg import PSDOperator, from_state, to_state

STATE_VERSION = 1
REQUIRED_KEYS = ("version", "likelihood", "structure", "kind", "param_names", "index", "mean",
                 "prior_precision", "sigma_noise", "curvature", "curvature_outputs", "loss",
                 "num_data", "num_outputs")


def state_tensors(obj: Any) -> list[Tensor]:
    """Every tensor inside a nested dict / list state."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in state_tensors(v)]
    return []


def _operator(state: Any, size: int, what: str, device: torch.device) -> PSDOperator:
    """Rebuild a curvature operator and check that it acts on ``size`` parameters."""
    try:
        op = from_state(state, device=device)
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as err:
        raise InvalidArgumentError(f"the {what} in the state is malformed ({err!r})") from err
    if op.size != size:
        raise ShapeError(f"the {what} in the state acts on {op.size} parameters but this "
                         f"posterior has {size}")
    return op


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`~bayescurv.laplace.Laplace`, and the
    hyperparameters as held (what a state stores)."""

    @property
    def internal_prior_precision(self) -> Tensor:
        """The prior precision as held, in :attr:`internal_dtype` (float64 for float32 models;
        :attr:`prior_precision` is the same in the model's dtype). Read-only: assign
        :attr:`prior_precision` to change it."""
        return self._prior

    @property
    def internal_sigma_noise(self) -> Tensor:
        """The observation noise as held, in :attr:`internal_dtype` (:attr:`sigma_noise` in
        the model's dtype). Read-only: assign :attr:`sigma_noise` to change it."""
        return self._sigma

    def state_dict(self) -> dict:
        """Everything to restore the fitted posterior: tensors, strings and lists only, so it
        loads with ``torch.load(path, weights_only=True)``."""
        self.check_fitted()
        state = {
            "version": STATE_VERSION,
            "likelihood": self.likelihood.name,
            "structure": self.structure,
            "kind": self.kind,
            "param_names": list(self.params.names),
            "param_shapes": [list(p.shape) for p in self.params.params],
            "index": self.index,
            "mean": self.mean,
            "prior_precision": self._prior,
            "sigma_noise": self._sigma,
            "curvature": to_state(self._H),
            "curvature_outputs": None if self._H_outputs is None else [
                to_state(h) for h in self._H_outputs],
            "loss": self.loss,
            "num_data": self.num_data,
            "num_outputs": self.num_outputs,
        }
        if hasattr(self, "_sse"):
            state["sse"] = self._sse
        return state

    def _validate_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise InvalidArgumentError(
                f"state must be a dict from Laplace.state_dict(), got {type(state).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in state]
        if missing:
            raise InvalidArgumentError(
                f"the state lacks the keys {missing}; it was not saved by Laplace.state_dict()")
        if state["version"] != STATE_VERSION:
            raise InvalidArgumentError(f"state version {state['version']!r} is not supported "
                                       f"(this version reads {STATE_VERSION})")
        for key, mine in (("likelihood", self.likelihood.name), ("structure", self.structure),
                          ("kind", self.kind)):
            if state[key] != mine:
                raise InvalidArgumentError(
                    f"state has {key}={state[key]!r} but this posterior has {mine!r}")
        if list(state["param_names"]) != list(self.params.names):
            raise InvalidArgumentError(
                "state was saved for other parameters: "
                f"{list(state['param_names'])[:5]}... vs {self.params.names[:5]}...")
        shapes = state.get("param_shapes")  # absent in states of earlier versions
        mine = [list(p.shape) for p in self.params.params]
        if shapes is not None and [list(s) for s in shapes] != mine:
            bad = next(n for n, s, m in zip(self.params.names, shapes, mine) if list(s) != m)
            raise ShapeError(f"state was saved for parameters of other shapes (first: {bad!r}); "
                             "build the model the posterior was fitted on")
        dev = self.params.device
        saved = state["index"]
        if (saved is None) != (self.index is None) or (
            saved is not None and not torch.equal(saved.to(dev), self.index)
        ):
            raise InvalidArgumentError("state was saved for another subnetwork mask")
        mean = state["mean"]
        if not torch.is_tensor(mean) or mean.dim() != 1 or mean.numel() != self.num_params:
            got = tuple(mean.shape) if torch.is_tensor(mean) else type(mean).__name__
            raise ShapeError(f"the state's mean has shape {got} but this posterior has "
                             f"{self.num_params} parameters")
        for t in state_tensors(state):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError("the state holds NaN or infinite values (a diverged fit?); "
                                     "it would predict NaN")

    def load_state_dict(self, state: dict) -> StateDictMixin:
        """Restore a posterior saved by :meth:`state_dict` into this (unfitted or fitted)
        object, built for the same model, likelihood, subset and structure; tensors move to
        the model's device. The state is validated before anything changes. The network's
        weights are not touched: :meth:`restore_map` writes the saved mean into them."""
        self._validate_state(state)
        dev = self.params.device
        H = _operator(state["curvature"], self.num_params, "curvature", dev)
        outs = state["curvature_outputs"]
        H_outputs = None if outs is None else [
            _operator(h, self.num_params, "per-output curvature", dev) for h in outs]
        sigma = state["sigma_noise"].to(device=dev)
        old = (self._prior, self._sigma)
        try:
            self.prior_precision = state["prior_precision"].to(device=dev)
            self.sigma_noise = sigma
        except Exception:
            self._prior, self._sigma = old
            raise
        self._H, self._H_outputs = H, H_outputs
        self.mean = state["mean"].to(device=dev, dtype=self.internal_dtype)
        self.loss = state["loss"].to(device=dev)
        self.num_data = int(state["num_data"])
        self.num_outputs = int(state["num_outputs"])
        if "sse" in state:
            self._sse = state["sse"].to(device=dev)
        return self


__all__ = ["StateDictMixin", "STATE_VERSION", "state_tensors"]
