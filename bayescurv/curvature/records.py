"""What the hooks of :mod:`.engine` saw of one module over one batch
(:class:`ModuleRecord`), its per-sample gradients, and the check that a module of a type the
extractors do not know acts on each data point separately (:func:`check_per_sample`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bayescurv.curvature import layers, norms
from bayescurv.errors import UnsupportedLayerError


@dataclass
class ModuleRecord:
    """What the hooks saw of one module over one batch.

    ``route``: ``"linear"`` (a linear-like layer, :func:`layers.linear_layout`: Linear,
    Conv, grouped Conv, Hugging Face ``Conv1D``, registered rules; weight in the posterior),
    ``"embedding"``,
    ``"generic"`` (per-sample gradients of the module by ``torch.func``) or ``"broadcast"``
    (loose parameters with a leading dimension of size one, e.g. a class token ``(1, 1, D)``
    or position codes ``(1, T, D)``, replaced during the forward pass by their expansion over
    the batch, so that the batched backward pass yields their per-sample gradients directly:
    ``inputs``/``outputs`` then hold those expanded tensors, one per owned parameter).
    ``owned``: ``{local parameter name: index in the ParamSet}``.
    ``inputs``, ``outputs`` and ``grads`` (``(K, ...)``) hold the batch in dimension 0
    whatever the model's layout; ``batch_dims`` says where each call had it, ``shapes`` the
    call's original ``(input shape, output shape)`` (for error messages).
    ``verify``: check once that the module acts per data point (:func:`check_per_sample`);
    ``parent``: ``(owner's name relative to its parent, parent module)`` for a module of
    unknown type, whose call is captured instead when the owner itself is never called
    (``via`` is then that relative name; see :attr:`evaluated`).
    ``returned``: what the hook handed downstream (to recognise the network's output layer);
    ``output_hessian``: ``(likelihood, f)`` when the module *is* the network's output layer
    and its curvature comes in closed form from the likelihood (:func:`stream`; then
    ``grads`` is empty).
    ``chunk``: ``(index, count)`` of the current chunk of the batch's loss columns (set by
    :func:`stream`); ``reuse``: the batch's loss columns come in several chunks, so
    :meth:`linear_inputs` with ``keep=True`` keeps the unfolded inputs in ``cache`` for the
    later chunks (cleared with the batch) instead of unfolding them again per chunk.
    """

    name: str
    module: nn.Module
    route: str
    owned: dict[str, int]
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    batch_dims: list[int] = field(default_factory=list)
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    returned: list[Tensor] = field(default_factory=list)
    output_hessian: tuple | None = None
    verify: bool = False
    differentiable: bool = False
    parent: tuple[str, nn.Module] | None = None
    via: str | None = None
    reuse: bool = False
    cache: dict = field(default_factory=dict)
    chunk: tuple[int, int] = (0, 1)

    @property
    def last(self) -> bool:
        """Whether the current chunk of loss columns is the batch's last (``chunk``)."""
        return self.chunk[0] == self.chunk[1] - 1

    @property
    def evaluated(self) -> nn.Module:
        """The module whose calls were captured: the owner, or its parent when the owner
        itself was never called (``via``: the owner's name relative to the parent)."""
        return self.parent[1] if self.via is not None and self.parent else self.module

    @property
    def with_bias(self) -> bool:
        return "bias" in self.owned

    @property
    def called(self) -> bool:
        """Whether the module ran in this batch (a module may be skipped by the forward)."""
        return bool(self.inputs)

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.grads.clear()
        self.batch_dims.clear()
        self.shapes.clear()
        self.returned.clear()
        self.output_hessian = None
        self.via = None
        self.cache.clear()
        self.chunk, self.reuse = (0, 1), False

    # views ------------------------------------------------------------------------------
    def linear_inputs(self, augment: bool = True, keep: bool = False) -> Tensor:
        """Unfolded inputs ``(B, T, I)`` alone (calls stacked along ``T``; grouped
        convolutions ``(G, B, T, I)``, :class:`layers.LinearView`); ``keep``: reuse them
        over the batch's chunks of loss columns (see ``reuse``)."""
        if augment in self.cache:
            return self.cache[augment]
        a = [layers.linear_inputs(self.module, x, self.with_bias and augment)
             for x in self.inputs]
        a = a[0] if len(a) == 1 else torch.cat(a, -2)
        if keep and self.reuse:
            self.cache[augment] = a
        return a

    def linear_grads(self) -> Tensor:
        """Output gradients ``(K, B, T, O)`` alone (calls stacked along ``T``; grouped
        ``(G, K, B, T, O)``)."""
        g = [layers.linear_grads(self.module, gi) for gi in self.grads]
        return g[0] if len(g) == 1 else torch.cat(g, -2)

    def linear_view(self, augment: bool = True, keep: bool = False) -> layers.LinearView:
        """Unfolded inputs and gradients, calls of a reused module stacked along ``T``;
        ``augment=False`` leaves out the column of ones of the bias."""
        return layers.LinearView(self.linear_inputs(augment, keep), self.linear_grads())

    def per_sample(self) -> dict[int, Tensor]:
        """Per-sample, per-column gradients ``{param index: (K, B, numel)}``."""
        out: dict[int, Tensor] = {}
        if self.route == "broadcast":  # the gradients of the expanded copies, row b = datum b
            return {i: g.reshape(*g.shape[:2], -1) for i, g in zip(self.owned.values(),
                                                                  self.grads)}
        if self.route == "linear" and self.called:
            ps = layers.linear_per_sample(self.linear_view())  # (K, B, O, I)
            w, b = layers.split_per_sample(self.module, ps, self.with_bias)
            out[self.owned["weight"]] = w
            if b is not None:
                out[self.owned["bias"]] = b
            return out
        for x, g, bd in zip(self.inputs, self.grads, self.batch_dims):
            if self.route == "embedding":
                grads = {"weight": layers.embedding_per_sample(self.module, x, g)}
            else:
                if self.verify:  # the module must act on each data point separately
                    check_per_sample(self, x, bd)
                    self.verify = False
                cache = self.cache.setdefault("norm", {}) if (
                    self.reuse and len(self.inputs) == 1) else None  # x̂ over the chunks
                grads = None if self.via is not None else norms.per_sample(
                    self.module, list(self.owned), x, g, cache)  # norms: Σ g ⊙ x̂, closed
                if grads is None:
                    prefix = f"{self.via}." if self.via is not None else ""
                    grads = layers.generic_per_sample(
                        self.evaluated, [prefix + n for n in self.owned], x, g, bd)
                    grads = {n[len(prefix):]: t if self.differentiable else t.detach()
                             for n, t in grads.items()}  # no autograd history across batches
            for lname, t in grads.items():
                i = self.owned[lname]
                t = t.reshape(*t.shape[:2], -1)
                out[i] = out[i] + t if i in out else t
        return out


def check_per_sample(rec: ModuleRecord, x: Tensor, batch_dim: int) -> None:
    """Refuse a module of a type the extractors do not know when it does not act on each data
    point separately (then per-sample gradients of the module are not the per-sample
    gradients of the network): its output on the batch must equal its outputs on the data
    points one at a time (``torch.func.vmap``), compared once, on the first batch."""
    if not rec.returned:
        return
    ref = rec.returned[0].detach()
    ref = ref.movedim(batch_dim, 0) if batch_dim else ref

    def one(xb: Tensor) -> Tensor:
        return rec.evaluated(xb.unsqueeze(batch_dim)).squeeze(batch_dim)

    try:
        with torch.no_grad():
            out = torch.func.vmap(one)(x.detach())
    except Exception as err:  # an op without a batching rule, a non-tensor output, ...
        raise UnsupportedLayerError(
            f"module {rec.name!r} ({type(rec.module).__name__}) owns parameters in the "
            f"posterior that no structured extractor knows, and it cannot be evaluated one data "
            f"point at a time for their per-sample gradients ({type(err).__name__}: {err}). "
            "Leave its parameters out of the subset"
        ) from err
    scale = ref.abs().max().clamp_min(1e-30)
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    if out.shape != ref.shape or (out - ref).abs().max() > tol * scale:
        raise UnsupportedLayerError(
            f"module {rec.name!r} ({type(rec.module).__name__}) owns parameters in the "
            "posterior that no structured extractor knows, and its output on a batch differs "
            "from its outputs on the data points one at a time: it couples the data points, so "
            "per-sample gradients of the module are not those of the network. Leave its "
            "parameters out of the subset"
        )
