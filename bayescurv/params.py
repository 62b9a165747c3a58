"""Which parameters are in the posterior, and the one flat ordering used everywhere.

A :class:`ParamSet` is an ordered list of ``(name, parameter)`` pairs of a model, in the
order of ``model.named_parameters()``. The flat vector ``theta`` of a set is the
concatenation of ``p.reshape(-1)`` (row-major) over its parameters in that order; every
curvature matrix, posterior and sample in bayescurv uses this ordering.

Frozen parameters (``requires_grad=False``) are never part of a set. Tied parameters (one
``nn.Parameter`` reached under two names) appear once, under their first name.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.errors import InvalidArgumentError

SUBSETS = ("all", "trainable", "last_layer")

OutputKey = str | int | Callable[..., Tensor] | None
"""How to read the network output from what the model returns: ``None`` (the model
returns a tensor), a key / index (``out[key]`` of a dict, tuple or HuggingFace-style
output), or a callable ``out -> Tensor`` or ``(out, inputs) -> Tensor`` (a callable of two
positional parameters also receives the inputs the model was called with, e.g. to read the
attention mask: :func:`last_token`)."""


def _takes_inputs(fn: Callable) -> bool:
    """Whether an ``output_key`` callable takes ``(out, inputs)`` rather than ``out``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def last_token(key: str | int = "logits", mask: str = "attention_mask",
               tokens: Sequence[int] | Tensor | None = None) -> Callable[[Any, Any], Tensor]:
    """An ``output_key`` for sequence outputs ``(B, T, C)`` (a causal LM's next-token logits):
    the output at each sequence's last real position — the last position where
    ``inputs[mask]`` is nonzero, for right or left padding alike (the last position when the
    inputs carry no mask) — restricted to the columns ``tokens`` (e.g. the answer tokens of a
    multiple-choice task) when given. The padding mask is thereby respected in the curvature,
    the evidence and the predictive: padded positions never enter the likelihood.

    Usage: ``Laplace(lm, "classification", output_key=last_token(tokens=answer_ids))``."""
    cols = None if tokens is None else torch.as_tensor(list(tokens) if not torch.is_tensor(
        tokens) else tokens, dtype=torch.long)

    def select(out: Any, inputs: Any) -> Tensor:
        f = out[key]
        if not torch.is_tensor(f) or f.dim() != 3:
            raise InvalidArgumentError(
                f"last_token expects a sequence output (batch, positions, classes) under "
                f"{key!r}; got {getattr(f, 'shape', type(f).__name__)}")
        t = f.shape[1]
        m = inputs.get(mask) if isinstance(inputs, dict) else None
        if m is None:
            last = f[:, -1]
        else:
            pos = torch.arange(t, device=f.device)
            idx = (m.to(f.device) != 0).long().mul(pos + 1).argmax(1)  # last nonzero
            last = f.gather(1, idx[:, None, None].expand(-1, 1, f.shape[-1])).squeeze(1)
        return last if cols is None else last[:, cols.to(f.device)]

    return select


def check_output_key(output_key: OutputKey) -> OutputKey:
    """Validate an ``output_key`` argument (see :data:`OutputKey`)."""
    if output_key is None or callable(output_key) or (
            isinstance(output_key, (str, int)) and not isinstance(output_key, bool)):
        return output_key
    raise InvalidArgumentError(
        f"output_key must be None, a str or int key, or a callable (model output -> tensor); "
        f"got {type(output_key).__name__}"
    )


def select_output(out: Any, output_key: OutputKey, inputs: Any = None) -> Tensor:
    """The network output tensor of ``out`` (what the model returned on ``inputs``), per
    ``output_key``."""
    if output_key is not None:
        try:
            if not callable(output_key):
                out = out[output_key]
            else:
                out = output_key(out, inputs) if _takes_inputs(output_key) else output_key(out)
        except (KeyError, IndexError, TypeError) as err:
            keys = f" (keys: {sorted(out)})" if isinstance(out, dict) else ""
            raise InvalidArgumentError(
                f"output_key={output_key!r} does not select an output of the model's "
                f"{type(out).__name__}{keys}: {err}"
            ) from err
    if not torch.is_tensor(out):
        hint = ("pass output_key= (a key, an index, or a callable) to say which entry is the "
                "network output") if output_key is None else "make output_key return a tensor"
        raise InvalidArgumentError(
            f"the model returned a {type(out).__name__}, not a tensor; {hint}"
        )
    return out


def check_keyword_inputs(model: nn.Module, x: dict[str, Any]) -> None:
    """Refuse a dict of keyword inputs that ``model.forward`` does not accept, before the
    call (a dict batch without an ``x_key`` entry is passed to the model as keyword
    arguments; a wrong ``x_key`` would otherwise surface as a ``TypeError`` from inside the
    model)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    try:
        sig.bind(**x)
    except TypeError as err:
        raise InvalidArgumentError(
            f"the batch inputs are a dict with keys {sorted(x)}, passed to the model as keyword "
            f"arguments (the batches have no x_key entry), but "
            f"{type(model).__name__}.forward does not accept them ({err}). Pass x_key= the "
            "name of the entry that holds the inputs (and y_key= that of the targets)"
        ) from None


@dataclass
class ParamSet:
    """An ordered set of a model's trainable parameters.

    Attributes:
        model: the network the parameters belong to.
        names: qualified parameter names, in flat order.
        params: the parameters themselves, same order.
    """

    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    output_key: OutputKey = None
    _offsets: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.params:
            raise InvalidArgumentError(
                "the parameter subset is empty: no trainable parameter was selected"
            )
        self._offsets = [0]
        for p in self.params:
            self._offsets.append(self._offsets[-1] + p.numel())

    # sizes and slices -------------------------------------------------------------
    @property
    def numel(self) -> int:
        """P, the length of the flat vector."""
        return self._offsets[-1]

    def __len__(self) -> int:
        return len(self.params)

    def slice_of(self, index: int) -> slice:
        """Slice of the flat vector that holds parameter ``index``."""
        return slice(self._offsets[index], self._offsets[index + 1])

    def index_of(self, param: Tensor) -> int:
        """Position of ``param`` (by identity) in the set; ``-1`` when absent."""
        for i, p in enumerate(self.params):
            if p is param:
                return i
        return -1

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    # flat <-> per-parameter views ---------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """Concatenate per-parameter tensors (default: the current values) into ``(P,)``.

        Tensors with extra leading dimensions ``(*batch, *p.shape)`` give ``(*batch, P)``.
        """
        if tensors is None:
            return torch.cat([p.detach().reshape(-1) for p in self.params])
        if len(tensors) != len(self.params):
            raise InvalidArgumentError(
                f"expected {len(self.params)} tensors, one per parameter, got {len(tensors)}"
            )
        flat = []
        for t, p in zip(tensors, self.params):
            lead = t.shape[: t.dim() - p.dim()]
            flat.append(t.reshape(*lead, p.numel()))
        return torch.cat(flat, dim=-1)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split ``(*batch, P)`` into per-parameter tensors ``(*batch, *p.shape)``."""
        if vector.shape[-1] != self.numel:
            raise InvalidArgumentError(
                f"vector has length {vector.shape[-1]} but the parameter set has {self.numel}"
            )
        lead = vector.shape[:-1]
        return [
            vector[..., self.slice_of(i)].reshape(*lead, *p.shape)
            for i, p in enumerate(self.params)
        ]

    def vector(self) -> Tensor:
        """The current parameter values as a detached flat vector (theta_MAP after training)."""
        return self.flatten()

    @torch.no_grad()
    def assign(self, vector: Tensor) -> None:
        """Write a flat vector into the model's parameters (in place)."""
        for p, v in zip(self.params, self.unflatten(vector)):
            p.copy_(v)

    def as_dict(self, vector: Tensor | None = None) -> dict[str, Tensor]:
        """``{name: tensor}`` for :func:`torch.func.functional_call`; the current values by
        default, or the slices of ``vector`` (which may carry autograd / vmap state)."""
        if vector is None:
            return dict(zip(self.names, self.params))
        return dict(zip(self.names, self.unflatten(vector)))

    def functional_call(self, vector: Tensor, *args, **kwargs):
        """Evaluate the model with this set's parameters replaced by ``vector``; all other
        parameters and buffers keep their values. Differentiable in ``vector`` and usable
        under ``torch.func`` transforms."""
        if kwargs and not args:
            check_keyword_inputs(self.model, kwargs)
        out = torch.func.functional_call(self.model, self.as_dict(vector), args, kwargs)
        return select_output(out, self.output_key, args[0] if args else kwargs)

    def forward(self, x: Tensor | dict[str, Tensor],
                replace: dict[str, Tensor] | None = None) -> Tensor:
        """The network output at inputs ``x`` (a tensor, or a dict of keyword inputs), read
        with :attr:`output_key`; ``replace`` (``{qualified name: tensor}``) stands in for
        those parameters during the call (:func:`torch.func.functional_call`; module hooks
        still fire)."""
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
        if kwargs:
            check_keyword_inputs(self.model, kwargs)
        if replace:
            out = torch.func.functional_call(self.model, replace, args, kwargs, strict=False)
        else:
            out = self.model(*args, **kwargs)
        return select_output(out, self.output_key, x)

    # per-module view -----------------------------------------------------------------
    def modules(self) -> list[tuple[str, nn.Module, list[tuple[str, int]]]]:
        """Modules that directly own parameters of the set.

        Returns ``(module_name, module, [(local_param_name, index_in_set), ...])`` in
        module order. A tied parameter is listed under every module that owns it.
        """
        ids = {id(p): i for i, p in enumerate(self.params)}
        out = []
        for mname, module in self.model.named_modules():
            owned = [
                (pname, ids[id(p)])
                for pname, p in module.named_parameters(recurse=False)
                if id(p) in ids
            ]
            if owned:
                out.append((mname, module, owned))
        return out


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():  # named_parameters already dedups tied params
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters and contain no other module that does: the *layers*.
    A container that also owns loose parameters (timm's ``VisionTransformer`` with its
    ``cls_token`` and ``pos_embed``, a block with a layer-scale ``gamma``) finishes its forward
    call after its children and is never the output layer; when no module qualifies (a
    single container holding every parameter), every module owning parameters does."""
    owning = [(n, m) for n, m in model.named_modules()
              if next(m.parameters(recurse=False), None) is not None]
    names = [n for n, _ in owning]
    leaves = [(n, m) for n, m in owning
              if not any(o != n and (n == "" or o.startswith(f"{n}.")) for o in names)]
    return leaves or owning


def find_last_layer(model: nn.Module, example_input: Any = None,
                    output_key: OutputKey = None) -> str:
    """Name of the output layer: the layer (:func:`_layer_modules`: a module owning
    parameters that contains no other such module) whose forward call finished last when the
    model runs on ``example_input`` (a batch of inputs: a tensor or a dict of keyword inputs),
    found with forward hooks. Modules never called (registered but unused) are not
    candidates. Without ``example_input``, the last such layer in registration order that owns
    trainable parameters (right for ``nn.Sequential``).

    Warns when the chosen module's output is not itself the network output (an operation
    follows it), since "last" is then a judgement; pass ``last_layer_name=`` to choose.
    Raises :class:`InvalidArgumentError` when the found layer has no trainable parameters
    (a frozen head).
    """
    if example_input is None:
        last = None
        for mname, module in _layer_modules(model):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                last = mname
        if last is None:
            raise InvalidArgumentError("the model has no trainable parameters")
        return last
    order: list[tuple[str, Any]] = []
    handles = []
    for mname, module in _layer_modules(model):
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=mname: order.append((name, o))))
    first = next(model.parameters(), None)
    if first is not None:
        example_input = batches.to_device(example_input, first.device, first.dtype)
    if isinstance(example_input, dict):
        check_keyword_inputs(model, example_input)
    try:
        with torch.no_grad():
            out = model(**example_input) if isinstance(example_input, dict) else model(
                example_input)
            out = select_output(out, output_key, example_input)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise InvalidArgumentError("no module owning parameters was called in the forward pass")
    name, last_out = order[-1]
    module = model.get_submodule(name)
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        raise InvalidArgumentError(
            f"the last layer of the forward pass, {name!r}, has no trainable parameters "
            "(frozen); unfreeze it, or pass last_layer_name= (or a list of names as subset)"
        )
    if not torch.is_tensor(last_out) or last_out.numel() != out.numel():
        # a reshape / view after the layer is common and harmless; a reduction (pooling
        # over positions, a sum with another branch of another size) makes "last" a judgement
        warnings.warn(
            f"subset='last_layer' chose {name!r}, the last module with parameters called in "
            "the forward pass, but its output is not the network output (an operation "
            "that changes its size follows it); pass last_layer_name= to choose another",
            stacklevel=3)
    return name


def select(
    model: nn.Module,
    subset: str | Iterable[str] | dict[str, Tensor] = "all",
    *,
    last_layer_name: str | None = None,
    example_input: Any = None,
    output_key: OutputKey = None,
) -> ParamSet:
    """Select the parameters of the posterior.

    Args:
        model: the network.
        subset: ``"all"`` or its synonym ``"trainable"`` (every parameter with
            ``requires_grad``: after PEFT's ``get_peft_model`` the adapters only),
            ``"last_layer"`` (the parameters of the output layer, or of ``last_layer_name``),
            or an iterable of parameter or module names (a module name selects all its
            parameters) and shell-style patterns (``"*lora_*"``: every trainable parameter
            whose name matches, :func:`fnmatch.fnmatchcase`).
        last_layer_name: module name of the output layer, for ``subset="last_layer"``.
        example_input: a batch of inputs; with it ``"last_layer"`` is found from the forward
            pass (:func:`find_last_layer`).
        output_key: how to read the network output (:data:`OutputKey`).
    """
    named = _trainable(model)
    if not named:
        raise InvalidArgumentError("the model has no trainable parameters (requires_grad=True)")
    if isinstance(subset, str) and subset not in SUBSETS and any(c in subset for c in "*?["):
        subset = [subset]  # one name pattern
    if isinstance(subset, str):
        if subset in ("all", "trainable"):
            chosen = named
        elif subset == "last_layer":
            lname = last_layer_name if last_layer_name is not None else find_last_layer(
                model, example_input, output_key)
            modules = dict(model.named_modules())
            if lname not in modules:
                raise InvalidArgumentError(
                    f"last_layer_name={lname!r} is not a module of the model; "
                    f"modules are {[n for n in modules if n][:20]}"
                )
            prefix = f"{lname}." if lname else ""
            own = {id(p) for p in modules[lname].parameters(recurse=False)}
            chosen = [(n, p) for n, p in named if id(p) in own and n.startswith(prefix)]
            if not chosen:
                chosen = [(n, p) for n, p in named if id(p) in own]
        else:
            raise InvalidArgumentError(
                f"unknown subset {subset!r}; use one of {SUBSETS} or a list of parameter "
                "or module names"
            )
    else:
        wanted = list(subset)
        if not wanted:
            raise InvalidArgumentError("the subset is an empty list of names")
        pnames = {n for n, _ in named}
        mnames = {n for n, _ in model.named_modules()}
        patterns = [w for w in wanted if isinstance(w, str) and any(c in w for c in "*?[")
                    and w not in pnames and w not in mnames]
        empty = [w for w in patterns if not any(fnmatchcase(n, w) for n in pnames)]
        if empty:
            raise InvalidArgumentError(
                f"the name pattern(s) {empty} match no trainable parameter; trainable "
                f"parameters are {sorted(pnames)[:20]}"
            )
        wanted = [w for w in wanted if w not in patterns]
        unknown = [w for w in wanted if w not in pnames and w not in mnames]
        frozen = sorted(set(unknown) & {n for n, p in model.named_parameters()
                                        if not p.requires_grad})
        if frozen:
            raise InvalidArgumentError(
                f"parameters {frozen} are frozen (requires_grad=False) and cannot be in the "
                "posterior; unfreeze them with requires_grad_(True) or leave them out"
            )
        if unknown:
            raise InvalidArgumentError(
                f"unknown parameter or module names {unknown}; trainable parameters are "
                f"{sorted(pnames)[:20]}"
            )
        chosen = [
            (n, p)
            for n, p in named
            if n in wanted or any(n.startswith(f"{w}.") or w == "" for w in wanted if w in mnames)
            or any(fnmatchcase(n, w) for w in patterns)
        ]
    return ParamSet(model, [n for n, _ in chosen], [p for _, p in chosen],
                    check_output_key(output_key))


__all__ = ["ParamSet", "select", "find_last_layer", "select_output", "check_output_key",
           "last_token",
           "check_keyword_inputs", "OutputKey", "SUBSETS"]
