r"""Per-layer derivative math for the structured curvature extractors.

Index conventions (BackPACK style). For one forward/backward pass over a batch:

- ``K``: columns of the loss-Hessian square root (``C`` for the exact GGN, the number of
  Monte-Carlo samples for the MC Fisher, 1 for the empirical Fisher);
- ``B``: data points in the batch; ``T``: weight-sharing positions (sequence positions,
  spatial patch positions of a convolution, calls of a reused module);
- ``I``: layer input features (for convolutions: ``C_in * prod(kernel)``; with a bias the
  inputs are augmented by a constant 1, so ``I = in + 1``); ``O``: output features.

A *linear-like* layer (Linear, Conv1d/2d/3d, and the "linear-in-disguise" modules of
:data:`LINEAR_RULES` such as Hugging Face's ``Conv1D``) computes
``z[b, t, :] = W a[b, t, :] (+ b)`` after unfolding, so with
``g[k, b, t, :] = ∂(s_kᵀ f_b)/∂z[b, t, :]`` (one column ``s_k`` of the square root
backpropagated to the layer output) the per-sample gradient of ``W̃ = [W | b]`` (``(O, I)``)
is ``Σ_t g[k,b,t] a[b,t]ᵀ`` and the GGN block is ``Σ_{k,b} vec(Σ_t g aᵀ) vec(Σ_t g aᵀ)ᵀ``.
K-FAC approximates it by ``G ⊗ A`` on the row-major ``vec(W̃)``.

Layouts (:class:`LinearLayout`):

- *grouped convolutions* (``groups = G > 1``; depthwise when ``G = C_in``) are block
  diagonal over the groups: group ``j`` maps input channels ``j C_in/G ...`` to output
  channels ``j C_out/G ...`` and is a linear-like layer of its own with
  ``I = C_in/G · prod(kernel) (+1)`` and ``O = C_out/G``. Their :class:`LinearView` carries
  a leading group dimension, ``a (G, B, T, I)`` and ``g (G, K, B, T, O)``; every function
  here accepts it (``...`` in front of the ungrouped shapes) and returns per-layer results on
  the layer's rows ``o = j O + o_j`` (``(G O, I)``), which is the row-major order of
  ``weight (C_out, C_in/G, *k)`` with the bias as the last column, so the K-FAC block of the
  layer is ``blockdiag_j (G_j ⊗ A_j)`` (:class:`~bayescurv.linalg.KroneckerBatch`);
- *transposed* weights (``weight`` stored ``(I, O)``, ``y = x W + b``: GPT-2's ``Conv1D``)
  are a Linear whose flat order is ``W̃ᵀ``: the extractors work on ``W̃`` ``(O, I)`` as for
  ``nn.Linear`` (same factors ``G``, ``A``) and only the flat positions differ
  (:func:`bayescurv.curvature.accumulate.kron_index`, :func:`split_per_sample`).

Batch dimension. Everything here sees the batch in dimension 0: the hooks of
:mod:`.engine` move it there. Where a layer's tensors hold it is
:func:`layer_batch_dim` of the user's ``batch_dim`` (the dimension of the model's inputs
that indexes data points): ``batch_dim`` for layers whose output has more than two
dimensions (``(T, B, D)`` for ``batch_dim=1``, PyTorch's ``batch_first=False`` layout), 0
for outputs of two dimensions (``(B, features)``, e.g. after pooling over the sequence) and
for convolutions and batch/instance/group norms, which PyTorch defines batch-first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.curvature import attention
from bayescurv.errors import UnsupportedLayerError

LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""PyTorch's linear-like classes; with :data:`LINEAR_RULES` they make the linear route
(:func:`linear_layout`)."""
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
SUPPORTED = (*LINEAR_LIKE, nn.Embedding, *NORMS)
BATCH_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
"""Modules whose inputs PyTorch defines batch-first, whatever the model's ``batch_dim``."""


def layer_batch_dim(module: nn.Module, output: Tensor, batch_dim: int) -> int:
    """Dimension of ``module``'s input and output that indexes data points (see the module
    docstring): ``batch_dim`` for outputs of more than two dimensions, else 0; always 0
    for :data:`BATCH_FIRST` modules."""
    if batch_dim == 0 or isinstance(module, BATCH_FIRST) or output.dim() <= 2:
        return 0
    return batch_dim


@dataclass(frozen=True)
class LinearRule:
    """A "linear-in-disguise" module type: ``matches(module)`` says whether a module computes
    ``y = x Wᵀ + b`` over the last dimension of its first input (``transposed=False``; weight
    ``(O, I)``), or ``y = x W + b`` (``transposed=True``; weight ``(I, O)``), with a 2-D
    ``weight`` and an optional ``bias`` ``(O,)`` as attributes. Such modules get every
    structure natively (K-FAC expand/reduce, EKFAC, diag, full, low rank, GLM predictive)."""

    name: str
    matches: Callable[[nn.Module], bool]
    transposed: bool = False


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...), recognised by
    duck typing (class name ``Conv1D``, an ``int`` attribute ``nf`` and a weight
    ``(nx, nf)``), so the library never imports transformers."""
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nf, int)
            and isinstance(w, Tensor) and w.dim() == 2 and w.shape[1] == nf)


LINEAR_RULES: list[LinearRule] = [
    LinearRule("transformers Conv1D", _is_hf_conv1d, transposed=True),
]
"""Registry of linear-in-disguise module types, consulted after ``nn.Linear`` and
``nn.Conv*d``; extend it with :func:`register_linear`."""


def register_linear(matches: type[nn.Module] | Callable[[nn.Module], bool], *,
                    transposed: bool = False, name: str | None = None) -> None:
    """Declare a module type as linear-like (see :class:`LinearRule`): ``matches`` is a
    module class or a predicate. Example, a layer storing its weight as ``(in, out)``::

        register_linear(MyDense, transposed=True)
    """
    if isinstance(matches, type):
        cls = matches
        name = name or cls.__name__
        LINEAR_RULES.append(LinearRule(name, lambda m: isinstance(m, cls), transposed))
    else:
        LINEAR_RULES.append(LinearRule(name or getattr(matches, "__name__", "rule"), matches,
                                       transposed))


@dataclass(frozen=True)
class LinearLayout:
    """How a linear-like module's parameters map onto ``W̃ = [W | b]`` (module docstring).

    ``out``: ``O`` over all groups; ``inp``: ``I`` of one group without the bias column;
    ``groups``: ``G``; ``transposed``: the weight is stored ``(I, O)``; ``conv``: the inputs
    are unfolded by :func:`im2col`."""

    out: int
    inp: int
    groups: int = 1
    transposed: bool = False
    conv: bool = False

    @property
    def out_per_group(self) -> int:
        return self.out // self.groups


def linear_layout(module: nn.Module) -> LinearLayout | None:
    """The :class:`LinearLayout` of a linear-like module (``nn.Linear``, ``nn.Conv1d/2d/3d``
    with any ``groups``, a :data:`LINEAR_RULES` match); ``None`` for other modules."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return LinearLayout(w.shape[0], w.shape[1])
    if isinstance(module, CONVS):
        return LinearLayout(w.shape[0], w[0].numel(), module.groups, conv=True)
    for rule in LINEAR_RULES:
        if rule.matches(module):
            o, i = (w.shape[1], w.shape[0]) if rule.transposed else (w.shape[0], w.shape[1])
            return LinearLayout(o, i, transposed=rule.transposed)
    return None


PER_SAMPLE_FLAG = "bayescurv_per_sample"
"""A module class that sets this attribute to ``True`` declares that it acts on each data point
separately, so its own parameters are handled exactly by per-sample gradients of that module
(``torch.func``) without ``unknown_layers="per_sample"`` (e.g. the spectral convolutions of
:mod:`bayescurv.operators`)."""


def im2col(x: Tensor, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Tensor:
    """Unfold the input of an N-d convolution into patches ``(B, T, C_in * prod(kernel))``.

    Patch features are ordered (channel, kernel positions...) row-major, matching
    ``conv.weight.reshape(C_out, -1)``; ``T`` runs over output positions row-major.
    """
    d = x.dim() - 2
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [0] * d
        else:  # "same" (stride 1): total padding dilation * (kernel - 1), split left-first
            total = [conv.dilation[i] * (conv.kernel_size[i] - 1) for i in range(d)]
            pads = None
            pad_arg = []
            for i in reversed(range(d)):
                pad_arg += [total[i] // 2, total[i] - total[i] // 2]
            x = F.pad(x, pad_arg, mode=_pad_mode(conv))
    else:
        pads = list(conv.padding)
    if pads is not None and any(pads):
        pad_arg = []
        for i in reversed(range(d)):
            pad_arg += [pads[i], pads[i]]
        x = F.pad(x, pad_arg, mode=_pad_mode(conv))
    for i in range(d):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, span, conv.stride[i])  # (B, C, ..., out_i, ..., span_i)
        if conv.dilation[i] > 1:
            x = x[..., :: conv.dilation[i]]
    # x: (B, C, out_1..out_d, k_1..k_d) -> (B, out..., C, k...)
    b, c = x.shape[:2]
    outs = x.shape[2 : 2 + d]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    x = x.permute(perm).reshape(b, math.prod(outs), c * math.prod(conv.kernel_size))
    return x


def _pad_mode(conv: nn.Module) -> str:
    mode = getattr(conv, "padding_mode", "zeros")
    return "constant" if mode == "zeros" else mode


@dataclass
class LinearView:
    """Unfolded inputs and output gradients of one linear-like layer over a batch.

    ``a``: ``(B, T, I)`` (augmented by ones when the bias is included);
    ``g``: ``(K, B, T, O)``; grouped convolutions: ``(G, B, T, I)`` and ``(G, K, B, T, O)``
    with ``I``, ``O`` of one group.
    """

    a: Tensor
    g: Tensor

    @property
    def groups(self) -> int:
        """``G`` (1 without a group dimension)."""
        return self.a.shape[0] if self.a.dim() == 4 else 1


def linear_inputs(module: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """Layer input as ``(B, T, I)`` (unfolded patches for convolutions), ``(G, B, T, I)``
    for a grouped convolution (group ``j``: input channels ``j C_in/G ...``)."""
    lay = linear_layout(module)
    if not lay.conv:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        if x.dim() == module.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        a = im2col(x, module)
        if lay.groups > 1:  # patch features (channel, kernel...): channels of group j first
            b, t = a.shape[:2]
            a = a.reshape(b, t, lay.groups, lay.inp).permute(2, 0, 1, 3)
    if with_bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def linear_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``(K, B, *out)`` as ``(K, B, T, O)``; ``(G, K, B, T, O/G)`` for a
    grouped convolution."""
    k, b = g.shape[:2]
    lay = linear_layout(module)
    if not lay.conv:
        return g.reshape(k, b, -1, g.shape[-1])
    o = g.shape[2]
    g = g.reshape(k, b, o, -1).transpose(-1, -2)
    if lay.groups > 1:
        g = g.reshape(k, b, g.shape[2], lay.groups, lay.out_per_group).permute(3, 0, 1, 2, 4)
    return g


def group_matmul(x: Tensor, q: Tensor | None) -> Tensor:
    """``x @ q`` on the last dimension; a batched ``q`` ``(G, n, m)`` multiplies group ``j``
    of ``x`` ``(G, ..., n)`` by ``q[j]``; ``None`` is the identity."""
    if q is None:
        return x
    if q.dim() == 2:
        return x @ q
    return x @ q.reshape(q.shape[0], *([1] * (x.dim() - 3)), *q.shape[-2:])


def linear_per_sample(view: LinearView) -> Tensor:
    """Per-sample, per-column gradients of ``W̃``: ``(K, B, O, I)`` = ``Σ_t g aᵀ`` (grouped:
    rows ``o = j O_g + o_j``, ``(K, B, G O_g, I)``)."""
    ps = torch.einsum("...kbto,...bti->...kboi", view.g, view.a)
    return ps if ps.dim() == 4 else ps.permute(1, 2, 0, 3, 4).flatten(2, 3)


def split_per_sample(module: nn.Module, ps: Tensor, with_bias: bool
                     ) -> tuple[Tensor, Tensor | None]:
    """Per-sample gradients ``(K, B, O, I)`` of ``W̃`` (:func:`linear_per_sample`) as the
    weight's ``(K, B, numel)`` in its own flat order (``W`` row-major; ``Wᵀ`` for a
    transposed weight) and the bias' ``(K, B, O)`` (``None`` without a bias)."""
    k, b = ps.shape[:2]
    bias = None
    if with_bias:
        bias, ps = ps[..., -1], ps[..., :-1]
    if linear_layout(module).transposed:
        ps = ps.transpose(-1, -2)
    return ps.reshape(k, b, -1), bias


CHUNK_ELEMENTS = 2**24
"""Entries of the largest per-input Jacobian chunk ``(b, K, O·I)`` formed at once."""


def linear_jacobian_chunks(g: Tensor, a: Tensor, chunk_elements: int | None = None):
    r"""Per-input Jacobians of one linear-like layer, ``(b, K, O·I)`` =
    :math:`\sum_t g_{kbt} a_{bt}^\top` (row-major ``[o, i]``), for ``g (K, B, T, O)`` and
    ``a (B, T, I)``, over chunks of inputs ``b`` so that at most ``chunk_elements`` entries are
    alive (default :data:`CHUNK_ELEMENTS`); one batched matmul per chunk
    (``(b, K·O, T) @ (b, T, I)``). Grouped (``g (G, K, B, T, O)``, ``a (G, B, T, I)``): one
    batched matmul over groups and inputs, ``(b, K, G·O·I)`` in the layer's row order.
    Yields ``(slice, J_chunk)``, each chunk a fresh tensor (safe to modify in place)."""
    k, b, t, o = g.shape[-4:]
    i = a.shape[-1]
    groups = a.shape[0] if a.dim() == 4 else 1
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    step = max(1, chunk_elements // max(1, k * groups * o * i))
    for s in range(0, b, step):
        sl = slice(s, min(b, s + step))
        if a.dim() == 3:
            gs = g[:, sl].permute(1, 0, 3, 2).reshape(-1, k * o, t)  # (b, K·O, T)
            yield sl, torch.bmm(gs, a[sl]).reshape(-1, k, o * i)
            continue
        gs = g[:, :, sl].permute(0, 2, 1, 4, 3).reshape(groups, -1, k * o, t)  # (G, b, K·O, T)
        jac = torch.matmul(gs, a[:, sl]).reshape(groups, -1, k, o, i)  # (G, b, K, O, I)
        yield sl, jac.permute(1, 2, 0, 3, 4).reshape(-1, k, groups * o * i)


def linear_diag(view: LinearView, out_dtype: torch.dtype | None = None) -> Tensor:
    r"""Exact GGN diagonal of ``W̃`` as ``(O, I)`` (grouped: ``(G O, I)``), summed in
    ``out_dtype`` (default: the factors' dtype).

    Without weight sharing (``T = 1``): :math:`\sum_b (\sum_k g_{kbo}^2) a_{bi}^2`, one
    (batched) matmul. With sharing the per-input Jacobians are formed in chunks
    (:func:`linear_jacobian_chunks`), squared and summed per chunk in the factors' dtype.
    """
    out_dtype = view.g.dtype if out_dtype is None else out_dtype
    o, i = view.g.shape[-1], view.a.shape[-1]
    rows = view.groups * o
    if view.a.shape[-2] == 1:
        g2 = view.g[..., 0, :].square().sum(-3)  # (..., B, O)
        return (g2.mT @ view.a[..., 0, :].square()).to(out_dtype).reshape(rows, i)
    out = torch.zeros(rows * i, dtype=out_dtype, device=view.g.device)
    for _, jac in linear_jacobian_chunks(view.g, view.a):
        out += jac.square_().sum((0, 1)).to(out_dtype)
    return out.view(rows, i)


def embedding_per_sample(module: nn.Embedding, idx: Tensor, g: Tensor) -> Tensor:
    """Per-sample gradients of an embedding table ``(K, B, V, D)``: row ``v`` is
    ``Σ_t [x_t = v] g_t``."""
    k, b = g.shape[:2]
    idx = idx.reshape(b, -1)
    g = g.reshape(k, b, idx.shape[1], -1)
    onehot = F.one_hot(idx, module.num_embeddings).to(g.dtype)  # (B, T, V)
    if module.padding_idx is not None:
        onehot[..., module.padding_idx] = 0
    return torch.einsum("btv,kbtd->kbvd", onehot, g)


def embedding_counts(module: nn.Embedding, idx: Tensor, weights: Tensor | None = None
                     ) -> Tensor:
    """How often each row of the table is used in the batch ``(V,)`` (padding row: 0);
    ``weights`` (one per entry of ``idx``) weigh the uses (0 for positions left out)."""
    counts = torch.bincount(idx.reshape(-1), None if weights is None else weights.reshape(-1),
                            minlength=module.num_embeddings)
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0
    return counts


def check_modes(model: nn.Module) -> None:
    """Refuse a model with dropout or batch normalization in training mode (anywhere in it,
    owning posterior parameters or not). Dropout makes the curvature and the predictive
    random draws, so two identical calls would differ; BatchNorm in training mode normalizes
    with the statistics of each batch, so the network output of a data point depends on the
    other points of its batch (the result would change with the batch size), and every
    forward pass would overwrite the running statistics the trained model keeps."""
    active = [n for n, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
              and m.p > 0]
    if active:
        raise UnsupportedLayerError(
            f"dropout module(s) {active[:5]} are in training mode, which makes the curvature "
            "and the predictive random; call model.eval() first"
        )
    norms = [n or type(m).__name__ for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:
        raise UnsupportedLayerError(
            f"batch-norm module(s) {norms[:5]} are in training mode, where batch statistics "
            "couple the data points (the answer would depend on the batch size) and each "
            "forward pass would overwrite the running statistics; call model.eval() first"
        )


def check_module(module: nn.Module, name: str, structure: str, allow_generic: bool) -> None:
    """Refuse modules whose parameters the structured extractors cannot handle."""
    if isinstance(module, nn.RNNBase):
        raise UnsupportedLayerError(
            f"module {name!r} ({type(module).__name__}) is a recurrent layer: it returns a "
            "tuple (outputs, hidden state) and shares its weights over time steps, which the "
            "hook-based structures do not handle (not even with unknown_layers='per_sample'). "
            "Exclude it from the subset (e.g. subset='last_layer'), or use the matrix-free "
            "structure='lowrank' with lowrank_method='lanczos'"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        raise UnsupportedLayerError(
            f"module {name!r} ({type(module).__name__}) is in training mode, where batch "
            "statistics couple the data points and the GGN is not a sum over data; call "
            "model.eval() before computing curvature"
        )
    if isinstance(module, nn.MultiheadAttention):
        attention.check_attention(module, name)
        return
    if isinstance(module, SUPPORTED) or allow_generic or getattr(module, PER_SAMPLE_FLAG, False):
        return
    if linear_layout(module) is not None:
        return
    raise UnsupportedLayerError(
        f"module {name!r} of type {type(module).__name__} holds parameters in the posterior "
        f"but the {structure!r} extractor does not know this layer type (supported: "
        f"{', '.join(c.__name__ for c in SUPPORTED)}, MultiheadAttention, "
        f"{', '.join(r.name for r in LINEAR_RULES)}). Exclude it from the subset, declare it "
        "linear-like with bayescurv.curvature.layers.register_linear, or pass "
        "unknown_layers='auto' (the default) to treat it with per-sample gradients of that "
        "module (exact for modules that act on each data point separately, checked; a dense "
        "block in K-FAC, its diagonal for large ones)"
    )


def generic_per_sample(
    module: nn.Module, names: list[str], x: Tensor, g: Tensor, batch_dim: int = 0
) -> dict[str, Tensor]:
    """Per-sample, per-column gradients ``(K, B, *p.shape)`` of a module's own parameters
    by ``torch.func``: the vector-Jacobian product of the module applied to one data point.
    Exact for any module that acts on each data point separately (LayerNorm, GroupNorm,
    BatchNorm in eval mode, ...). ``x`` ``(B, ...)`` and ``g`` ``(K, B, ...)`` hold the batch
    in front; the module is called with it back in dimension ``batch_dim`` (its own
    layout). ``names`` may be dotted (parameters of a submodule that ``module`` uses)."""
    params = {n: module.get_parameter(n).detach() for n in names}

    def one(xb: Tensor, gb: Tensor) -> dict[str, Tensor]:
        def fwd(p):
            out = torch.func.functional_call(module, p, (xb.unsqueeze(batch_dim),))
            return out.squeeze(batch_dim)

        _, vjp = torch.func.vjp(fwd, params)
        return vjp(gb)[0]

    over_k = torch.func.vmap(one, in_dims=(None, 0))  # g_b: (K, ...)
    over_b = torch.func.vmap(over_k, in_dims=(0, 1), out_dims=1)  # -> (K, B, ...)
    return over_b(x, g)
