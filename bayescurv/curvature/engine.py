"""The streaming pass: module hooks capture each layer's inputs and outputs in the forward
pass, and ONE batched backward pass sends all ``K`` columns of the loss-Hessian square root
from the network output to the layer outputs (gradients w.r.t. layer outputs only; no
parameter gradients, no per-sample gradients of the whole net).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.curvature import attention, layers
from bayescurv.curvature.columns import (
    SEQUENTIAL_DEVICES,
    column_by_column,
    loss_sqrt,
    residual_squares,
)
from bayescurv.curvature.records import ModuleRecord
from bayescurv.errors import InvalidArgumentError, ShapeError, UnsupportedLayerError
from bayescurv.likelihoods import Gaussian, Likelihood, check_finite_outputs
from bayescurv.params import ParamSet

UNKNOWN_LAYERS = ("auto", "per_sample", "error")
"""How modules of a type the structured extractors do not know are handled when they own
parameters of the posterior (e.g. timm's ``cls_token`` / ``pos_embed`` on the
``VisionTransformer`` itself, a layer-scale ``gamma``, a relative-position bias table):
``"auto"`` (default) handles them exactly — parameters with a leading dimension of size one
by expanding them over the batch (their per-sample gradients come from the same backward
pass), the others by per-sample gradients of the owning module (``torch.func``) after
checking once that it acts on each data point separately; ``"per_sample"`` the same without
that check; ``"error"`` refuses them."""

class HookCapture:
    """Registers forward hooks on every module that owns parameters of ``params`` and runs
    the batched backward pass. Use as a context manager.

    ``batch_dim``: the dimension of the model's inputs that indexes data points (0; 1 for
    sequence-first ``(T, B, ...)`` inputs). Each hooked layer's input and output are seen with
    their batch dimension (:func:`layers.layer_batch_dim`) moved to the front, so every
    consumer of the records works batch-first. Before the backward pass every captured call
    is checked to hold the ``B`` data points of the network output in that dimension; a
    mismatch raises :class:`ShapeError` naming the module. (When the sequence length equals
    ``B`` a wrong ``batch_dim`` cannot be told from the shapes.)
    """

    def __init__(
        self,
        params: ParamSet,
        structure: str,
        unknown_layers: str = "error",
        differentiable: bool = False,
        batch_dim: int = 0,
        column_chunk: int | None = None,
    ) -> None:
        self.batch_dim = batches.check_batch_dim(batch_dim)
        if column_chunk is not None and (isinstance(column_chunk, bool) or not isinstance(
                column_chunk, int) or column_chunk < 1):
            raise InvalidArgumentError(
                f"column_chunk must be a positive integer or None, got {column_chunk!r}")
        self.chunk = column_chunk
        self.recording = False  # hooks record only during the model's forward pass
        if unknown_layers not in UNKNOWN_LAYERS:
            raise InvalidArgumentError(
                f"unknown_layers must be one of {UNKNOWN_LAYERS}, got {unknown_layers!r}"
            )
        layers.check_modes(params.model)  # dropout / BatchNorm in training mode: refused
        self.params = params
        self.structure = structure
        self.records: list[ModuleRecord] = []
        seen: dict[int, list[str]] = {}
        # attention modules recomputed while capturing: {module: in-projection record or None}
        self.attention: dict[nn.Module, tuple[str, ModuleRecord | None]] = {}
        self.batch_size: int | None = None  # data points of the batch being captured
        self._verified = False  # broadcast copies checked to act per data point
        self._expanded: set[str] = set()  # records whose broadcast output was expanded
        for mname, module, owned in params.modules():
            layers.check_module(module, mname, structure, unknown_layers != "error")
            owned_d = dict(owned)
            known = isinstance(module, (*layers.SUPPORTED, nn.MultiheadAttention)) or getattr(
                module, layers.PER_SAMPLE_FLAG, False) or layers.linear_layout(module) is not None
            if not known and self.batch_dim == 0:  # loose parameters broadcast over the batch
                loose = {n: i for n, i in owned_d.items() if params.params[i].dim() >= 2
                         and params.params[i].shape[0] == 1}
                if loose:
                    self.records.append(ModuleRecord(mname, module, "broadcast", loose))
                    for i in loose.values():
                        seen.setdefault(i, []).append(mname)
                    owned_d = {n: i for n, i in owned_d.items() if n not in loose}
                    if not owned_d:
                        continue
            if isinstance(module, nn.MultiheadAttention):
                local = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
                rec = ModuleRecord(mname, attention.InProjection(module), "linear",
                                   {local[n]: i for n, i in owned_d.items()})
                self.records.append(rec)
                self.attention[module] = (mname, rec)
                for _, i in owned:
                    seen.setdefault(i, []).append(mname)
                continue
            if "weight" in owned_d and layers.linear_layout(module) is not None:
                route = "linear"  # Linear, Conv*d (grouped too), layers.LINEAR_RULES
            elif isinstance(module, nn.Embedding):
                route = "embedding"
            else:
                route = "generic"
            loose = route == "generic" and unknown_layers != "error" and not known
            parent = None
            if loose and mname:  # an owner never called (read through another method)
                pname = mname.rpartition(".")[0]
                parent = (mname.rpartition(".")[2], params.model.get_submodule(pname))
            self.records.append(ModuleRecord(
                mname, module, route, owned_d, differentiable=differentiable,
                verify=loose and unknown_layers == "auto", parent=parent))
            for _, i in owned:
                seen.setdefault(i, []).append(mname)
        self.tied = {i for i, mods in seen.items() if len(mods) > 1}
        owners = {id(rec.module) for rec in self.records}
        for mname, module in params.model.named_modules():  # out_proj in, in_proj not
            if isinstance(module, nn.MultiheadAttention) and module not in self.attention and (
                    id(module.out_proj) in owners):
                self.attention[module] = (mname, None)
        # keep the graph of inputs and output gradients (gradients of J Σ Jᵀ w.r.t. x)
        self.differentiable = differentiable
        self._handles: list = []

    def tied_names(self) -> list[str]:
        return [self.params.names[i] for i in sorted(self.tied)]

    def __enter__(self) -> HookCapture:
        # the layer outputs must carry a graph even if the user froze the parameters after
        # selecting them (e.g. a BoTorch model evaluated with frozen weights); restored on exit
        self._frozen = [p for p in self.params.params if not p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(True)
        out_projs = {id(m.out_proj) for m in self.attention}  # called batch-first by us
        for rec in self.records:
            if isinstance(rec.module, attention.InProjection) or rec.route == "broadcast":
                continue  # captured by the attention module's own hook / the substitution
            bd = 0 if id(rec.module) in out_projs else self.batch_dim
            self._handles.append(
                rec.module.register_forward_hook(self._hook(self, rec, bd)))
            if rec.parent is not None:
                self._handles.append(
                    rec.parent[1].register_forward_hook(self._parent_hook(self, rec, bd)))
        for module, (mname, rec) in self.attention.items():
            self._handles.append(module.register_forward_hook(
                self._attention_hook(self, mname, rec), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in getattr(self, "_frozen", []):
            p.requires_grad_(False)
        self._frozen = []
        self.clear()

    def clear(self) -> None:
        for rec in self.records:
            rec.clear()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """The hooks record inside this context only (the model's own forward pass), not when
        the extractors call a module again (per-sample gradients by ``torch.func``)."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def call(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        """The model's forward pass on inputs ``x`` with the hooks recording: the network
        output read with the set's ``output_key``. Loose parameters of ``"broadcast"`` records
        are replaced by their expansion over the ``B`` data points (leaves w.r.t. which the
        backward pass differentiates); the model sees the same values."""
        self.batch_size = b = batches.batch_size(x, self.batch_dim)
        replace = {}
        for rec in self.records:
            if rec.route != "broadcast":
                continue
            prefix = f"{rec.name}." if rec.name else ""
            for lname in rec.owned:
                p = rec.module.get_parameter(lname)
                e = p.detach().expand(b, *p.shape[1:]).requires_grad_(True)
                replace[prefix + lname] = e
                rec.inputs.append(e)
                rec.outputs.append(e)
                rec.batch_dims.append(0)
                rec.shapes.append((tuple(p.shape), tuple(e.shape)))
        with self.forward():
            return self.params.forward(x, replace=replace or None)

    def check_broadcast(self, f: Tensor) -> None:
        """Once per capture, when parameters or layer outputs shared by the whole batch were
        expanded over it (:meth:`call`, the hooks): backpropagate the output of data point 0
        alone and refuse when a copy belonging to another data point receives gradient (the
        model does not use the shared tensor by broadcasting over the batch, so the copies'
        gradients would not be per-sample gradients)."""
        if self._verified or f.shape[0] < 2 or not f.requires_grad:
            return
        self._verified = True
        recs = [r for r in self.records if r.route == "broadcast" or r.name in self._expanded]
        ts = [o for r in recs for o in r.outputs]
        if not ts:
            return
        cot = torch.zeros_like(f)
        cot[0] = 1.0
        grads = torch.autograd.grad(f, ts, cot, retain_graph=True, allow_unused=True)
        j = 0
        for r in recs:
            for _ in r.outputs:
                g = grads[j]
                j += 1
                if g is not None and bool(g[1:].ne(0).any()):
                    raise UnsupportedLayerError(
                        f"module {r.name or type(r.module).__name__!r} holds a tensor shared by "
                        "all data points (a parameter or output with a leading dimension of "
                        "size one), but the model does not use it by broadcasting over the "
                        "batch: the output of one data point depends on the copies of others. "
                        "Leave its parameters out of the subset"
                    )

    @staticmethod
    def _hook(capture: HookCapture, rec: ModuleRecord, batch_dim: int):
        differentiable = capture.differentiable

        def hook(module, inputs, output):
            if not capture.recording:  # e.g. per-sample calls of the module by torch.func
                return None
            if not isinstance(output, Tensor):
                raise UnsupportedLayerError(
                    f"module {rec.name!r} returns {type(output).__name__}, not a tensor"
                )
            if not inputs:
                raise UnsupportedLayerError(
                    f"module {rec.name!r} ({type(module).__name__}) owns parameters in the "
                    "posterior but was called with keyword arguments only; its input cannot be "
                    "captured. Leave its parameters out of the subset"
                )
            x = inputs[0] if differentiable else inputs[0].detach()
            bd = layers.layer_batch_dim(module, output, batch_dim)
            b = capture.batch_size
            if (bd == 0 and b is not None and b > 1 and output.dim() >= 2
                    and output.shape[0] == 1 and torch.is_tensor(x) and x.dim() >= 1
                    and x.shape[0] == 1):
                # a layer applied to an input shared by the batch (position ids (1, T)):
                # its output is broadcast downstream; expand it over the B data points so the
                # backward pass yields per-sample gradients (checked: check_broadcast)
                capture._expanded.add(rec.name)
                x = x.expand(b, *x.shape[1:])
                output = output.expand(b, *output.shape[1:])
            rec.batch_dims.append(bd)
            rec.shapes.append((tuple(x.shape), tuple(output.shape)))
            if bd == 0 or x.dim() <= bd:  # (too few dims: refused by check_batch)
                rec.inputs.append(x)
                rec.outputs.append(output)
                # hand a copy downstream, so in-place ops after the layer
                # (ReLU(inplace=True)) cannot change the tensor we differentiate w.r.t.
                out = output.clone()
                rec.returned.append(out)
                return out
            # the batch in front: differentiate w.r.t. that view, and hand downstream a copy
            # of it in the layer's own layout (so gradients arrive batch-first)
            front = output.movedim(bd, 0)
            rec.inputs.append(x.movedim(bd, 0))
            rec.outputs.append(front)
            return front.movedim(0, bd).clone()

        return hook

    @staticmethod
    def _parent_hook(capture: HookCapture, rec: ModuleRecord, batch_dim: int):
        """Capture the parent's call for a module of unknown type that owns posterior
        parameters but was not called itself in this forward pass (timm's relative-position
        bias, read through ``rel_pos.get_bias()``): its per-sample gradients then come from
        the parent applied to one data point at a time (``via``), checked like the owner's
        would be. The parent's hook fires after its forward, when the owner's own call would
        already have been recorded."""
        inner = HookCapture._hook(capture, rec, batch_dim)

        def hook(module, inputs, output):
            if not capture.recording or rec.inputs or not isinstance(output, Tensor):
                return None
            rec.via = rec.parent[0]
            return inner(module, inputs, output)

        return hook

    @staticmethod
    def _attention_hook(capture: HookCapture, name: str, rec: ModuleRecord | None):
        """Replace an attention module's output by its explicit decomposition
        (:mod:`.attention`), recording the input projection when it is in the posterior."""

        def on_projection(x: Tensor, z: Tensor) -> Tensor:
            if rec is not None:
                rec.batch_dims.append(0)
                rec.shapes.append((tuple(x.shape), tuple(z.shape)))
                rec.inputs.append(x if differentiable else x.detach())
                rec.outputs.append(z)
            return z

        differentiable = capture.differentiable

        def hook(module, args, kwargs, output):
            if not capture.recording:
                return None
            return attention.recompute(module, name, args, kwargs, on_projection)

        return hook

    def check_batch(self, b: int) -> None:
        """Raise :class:`ShapeError` when a captured call does not hold ``b`` data points in
        its batch dimension (the layout ``batch_dim`` says, or a layer whose tensors carry no
        per-data-point dimension at all, such as a positional embedding of ``arange(T)``)."""
        for rec in self.records:
            for x, o, bd, (xs, os) in zip(rec.inputs, rec.outputs, rec.batch_dims, rec.shapes):
                tensors = [o, x]
                if isinstance(rec.module, layers.LINEAR_LIKE[1:]) and (
                        len(xs) == rec.module.weight.dim() - 1):
                    tensors = [o]  # an unbatched convolution input (im2col adds the batch)
                if all(t.dim() > bd and t.shape[0] == b for t in tensors):
                    continue
                where = (f"dim {bd}" if bd == self.batch_dim else
                         f"dim {bd} (a {len(os)}-dim output is read as (B, features))"
                         if len(os) <= 2 else f"dim {bd} (batch-first layer type)")
                raise ShapeError(
                    f"module {rec.name!r} ({type(rec.module).__name__}) received an input of "
                    f"shape {xs} and returned shape {os}; with batch_dim={self.batch_dim} its "
                    f"batch dimension is {where}, which does not have the {b} data points of "
                    "the network output. Pass batch_dim= the dimension of the model's inputs "
                    "that indexes data points (batch_dim=1 for sequence-first (T, B, ...) "
                    "tensors, PyTorch's batch_first=False layout); a layer whose tensors have "
                    "no data-point dimension (e.g. an embedding of positions) cannot be in the "
                    "posterior"
                )

    def _check_uncalled(self, f: Tensor) -> None:
        """Refuse a module whose parameters reach ``f`` although the module was never
        *called* (its forward hook did not fire), e.g. ``nn.MultiheadAttention.out_proj``,
        whose weight enters ``F.multi_head_attention_forward`` directly: the hooks would
        see nothing and give it a zero block. A module skipped by a conditional forward
        (parameters not in the graph) keeps its zero block."""
        silent = [(rec, n) for rec in self.records if not rec.called for n in rec.owned]
        if not silent or not f.requires_grad:
            return
        ps = [rec.module.get_parameter(n) for rec, n in silent]
        used = torch.autograd.grad(f.sum(), ps, retain_graph=True, allow_unused=True)
        bad = sorted({rec.name for (rec, _), g in zip(silent, used) if g is not None})
        if bad:
            raise UnsupportedLayerError(
                f"parameters of module(s) {bad} reach the network output but those modules "
                "are never called (their parent uses the weights directly, as "
                "nn.MultiheadAttention does with out_proj), so forward hooks cannot see them and "
                "their curvature would silently be zero. Leave these parameters out of the "
                "subset (subset= with the other names)"
            )

    def backward(self, f: Tensor, cols: Tensor, retain: bool = False) -> None:
        """Backpropagate the ``K`` columns ``cols`` ``(K, B, C)`` from ``f`` to every
        captured layer output in one batched pass; fills ``record.grads`` (replacing those of
        an earlier chunk of columns). ``retain`` keeps the graph for further chunks. Refuses
        calls whose batch dimension does not hold the ``B`` data points
        (:meth:`check_batch`)."""
        self.check_batch(cols.shape[1])
        self._check_uncalled(f)
        self.check_broadcast(f)
        outs = [o for rec in self.records for o in rec.outputs]
        for rec in self.records:
            rec.grads.clear()
        keep = retain or self.differentiable
        try:
            if cols.shape[0] == 1 or f.device.type in SEQUENTIAL_DEVICES:
                grads = column_by_column(f, outs, cols, self.differentiable, keep)
            else:
                grads = torch.autograd.grad(
                    f, outs, cols, is_grads_batched=True, allow_unused=True,
                    create_graph=self.differentiable, retain_graph=keep,
                )
        except RuntimeError as err:  # an op without a batching rule: one pass per column
            if "vmap" not in str(err) and "batch" not in str(err).lower():
                raise
            warnings.warn(
                f"batched backward failed ({err}); falling back to one backward per column",
                RuntimeWarning,
                stacklevel=3,
            )
            per = [
                torch.autograd.grad(f, outs, cols[k], retain_graph=True, allow_unused=True,
                                    create_graph=self.differentiable)
                for k in range(cols.shape[0])
            ]
            grads = [torch.stack([p[j] for p in per]) for j in range(len(outs))]
        j = 0
        for rec in self.records:
            for o in rec.outputs:
                g = grads[j]
                rec.grads.append(g if g is not None else o.new_zeros(cols.shape[0], *o.shape))
                j += 1
        if not retain:
            for rec in self.records:
                rec.outputs.clear()  # free the graph

    def column_chunk(self, k: int) -> int:
        """Columns per backward pass: all ``k`` when their output gradients fit in
        :data:`GRAD_ELEMENTS` entries, else fewer (at least one), so memory is bounded
        whatever the number of outputs ``C``; ``self.chunk`` (``compute(column_chunk=)``)
        overrides."""
        if self.chunk is not None:
            return max(1, min(k, self.chunk))
        per_column = sum(o.numel() for rec in self.records for o in rec.outputs)
        return max(1, min(k, GRAD_ELEMENTS // max(1, per_column)))


@dataclass
class BatchResult:
    """One chunk of loss columns of one batch. ``batch_size`` and ``loss`` count the batch
    in its first chunk only (zero in the others), so sums over results are per data point;
    ``first`` says whether this is the batch's first chunk (inputs are then new);
    ``residuals``: for a Gaussian likelihood, the batch's :func:`residual_squares` (first
    chunk only, ``None`` in the others and for other likelihoods), so the noise's sufficient
    statistic comes from the same pass as the curvature."""

    records: list[ModuleRecord]
    batch_size: int
    loss: Tensor
    first: bool = True
    residuals: Tensor | None = None



def stream(
    capture: HookCapture,
    likelihood: Likelihood,
    data: Iterable,
    *,
    kind: str = "ggn",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    x_key: str = "x",
    y_key: str = "y",
    progress: bool = False,
) -> Iterator[BatchResult]:
    """One pass over ``data``: for every batch, forward with hooks, compute the loss-Hessian
    square root, one batched backward to the layer outputs; yield the records."""
    params = capture.params
    it = batches.iterate(data, device=params.device, dtype=params.dtype, x_key=x_key,
                         y_key=y_key, check=False, batch_dim=capture.batch_dim)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"curvature ({kind})", leave=False)
    opts = (kind, num_samples, generator)
    sub = [None]  # data points per sub-batch (learned on the first batch), 0: no split
    with capture:
        for x, y in it:
            _check_finite_fast(x, "inputs")
            _check_finite_fast(y, "targets")
            if not (sub[0] and sub[0] < batches.batch_size(x, capture.batch_dim)):
                split = yield from _batch(capture, likelihood, x, y, opts, sub)
                if not split:
                    continue
            for xs, ys in zip(batches.split_inputs(x, sub[0], capture.batch_dim),
                              y.split(sub[0])):
                yield from _batch(capture, likelihood, xs, ys, opts, sub)


def _batch(capture: HookCapture, likelihood: Likelihood, x, y, opts: tuple, sub: list
           ) -> Iterator[BatchResult]:
    """One (sub-)batch of :func:`stream`. When the ``K`` loss columns' output gradients do
    not fit :data:`GRAD_ELEMENTS` but those of fewer data points would (exact GGN, no
    ``column_chunk``), the first batch sets ``sub[0]``, the data points per sub-batch, and
    this returns ``True`` without results: the caller splits every batch (sums are per data
    point: the result of one pass, all columns of a point at once). Else columns in chunks."""
    kind, num_samples, generator = opts
    capture.clear()
    with torch.enable_grad():
        raw = capture.call(x)  # the output selected by params.output_key
        f = likelihood.check_outputs(raw)
        check_finite_outputs(f)
        fc, yc = likelihood.check(f, y)
    loss = likelihood.nll(fc.detach(), yc)
    res = residual_squares(fc, yc) if isinstance(likelihood, Gaussian) else None
    b = fc.shape[0]
    head = output_layer(capture, raw, fc)
    if head is not None:  # ∂(sᵀf)/∂f = s: no backward pass at all
        capture.check_batch(b)
        head.outputs.clear()
        if kind == "ggn" and capture.structure in CLOSED_FORM:
            head.output_hessian = (likelihood, fc.detach())  # not even the columns
        else:
            head.grads.append(loss_sqrt(likelihood, fc, yc, kind, num_samples, generator))
        yield BatchResult(capture.records, b, loss, residuals=res)
        return False
    cols = loss_sqrt(likelihood, fc, yc, kind, num_samples, generator)
    step = capture.column_chunk(cols.shape[0])
    if sub[0] is None:  # first batch: would fewer data points take every column at once?
        per_point = sum(o.numel() for r in capture.records for o in r.outputs) / max(1, b)
        fit = int(GRAD_ELEMENTS // max(1.0, cols.shape[0] * per_point))
        sub[0] = fit if (kind == "ggn" and capture.chunk is None and fit >= 1
                         and step < cols.shape[0]) else 0
        if sub[0]:
            return True  # (the next call clears the capture)
    count = -(-cols.shape[0] // step)
    for rec in capture.records:  # several chunks: unfolded inputs kept over them
        rec.reuse = count > 1
    for k0 in range(0, cols.shape[0], step):  # chunks of columns: bounded memory
        with torch.enable_grad():
            capture.backward(fc, cols[k0:k0 + step], retain=k0 + step < cols.shape[0])
        for rec in capture.records:
            rec.chunk = (k0 // step, count)
        first = k0 == 0
        yield BatchResult(capture.records, b if first else 0,
                          loss if first else torch.zeros_like(loss), first,
                          res if first else None)
    return False


GRAD_ELEMENTS = 2**26
"""Largest number of output-gradient entries (over all captured layers) held at once; the
``K`` loss columns of a batch go back in chunks that fit (:meth:`HookCapture.column_chunk`)."""

CLOSED_FORM = ("kfac", "kfac-reduce", "diag", "ekfac")
"""Structures whose output-layer curvature the accumulators take in closed form from the
likelihood (``Σ_b H_b``, ``diag(Qᵀ H_b Q)``), without square-root columns."""


def output_layer(capture: HookCapture, raw: Tensor, f: Tensor) -> ModuleRecord | None:
    """The record when the posterior is one linear layer, called once, without weight
    sharing, whose output *is* the network output ``raw`` (then its output gradients are
    the loss columns themselves: no backward pass); else ``None``."""
    if len(capture.records) != 1 or capture.differentiable:
        return None
    rec = capture.records[0]
    if (rec.route != "linear" or len(rec.returned) != 1 or rec.returned[0] is not raw
            or rec.outputs[0].shape != f.shape or f.dim() != 2):
        return None
    return rec


def _check_finite_fast(t: Tensor | dict[str, Tensor], what: str) -> None:
    """:func:`batches.check_finite` behind a one-reduction test: a finite sum means finite
    entries; only when the sum is not finite (NaN/Inf, or overflow) are entries checked."""
    for v in t.values() if isinstance(t, dict) else [t]:
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v.sum()):
            batches.check_finite(v, what)


def jacobian_pass(capture: HookCapture, x: Tensor | dict[str, Tensor]) -> Tensor:
    """Forward ``x`` with hooks and backpropagate the ``C`` unit vectors of the output in one
    batched pass, so that each record holds the factors of the per-layer Jacobians
    ``∂f_c/∂θ_layer`` (inputs ``a``, output gradients ``g[c]``). Returns ``f`` (detached)."""
    capture.clear()
    with torch.enable_grad():
        f = capture.call(x)
        if f.dim() == 1:
            f = f.unsqueeze(-1)
        c = f.shape[-1]
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        cols = eye[:, None, :].expand(c, f.shape[0], c)
        capture.backward(f, cols)
    return f if capture.differentiable else f.detach()
