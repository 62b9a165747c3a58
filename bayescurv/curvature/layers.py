r"""Per-layer derivative math for the structured curvature extractors.

Index conventions (BackPACK style). For one forward/backward pass over a batch:

- ``K``: columns of the loss-Hessian square root (``C`` for the exact GGN, the number of
  Monte-Carlo samples for the MC Fisher, 1 for the empirical Fisher);
- ``B``: data points in the batch; ``T``: weight-sharing positions (sequence positions,
  spatial patch positions of a convolution, calls of a reused module);
- ``I``: layer input features (for convolutions: ``C_in * prod(kernel)``; with a bias the
  inputs are augmented by a constant 1, so ``I = in + 1``); ``O``: output features.

A *linear-like* layer (Linear, Conv1d/2d/3d) computes ``z[b, t, :] = W a[b, t, :] (+ b)``
after unfolding, so with ``g[k, b, t, :] = ∂(s_kᵀ f_b)/∂z[b, t, :]`` (one column ``s_k`` of
the square root backpropagated to the layer output) the per-sample gradient of
``W̃ = [W | b]`` is ``Σ_t g[k,b,t] a[b,t]ᵀ`` and the GGN block is
``Σ_{k,b} vec(Σ_t g aᵀ) vec(Σ_t g aᵀ)ᵀ``. K-FAC approximates it by ``G ⊗ A``.

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.curvature import attention
from bayescurv.errors import UnsupportedLayerError

LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
    ``g``: ``(K, B, T, O)``.
    """

    a: Tensor
    g: Tensor


def linear_inputs(module: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """Layer input as ``(B, T, I)`` (unfolded patches for convolutions)."""
    if isinstance(module, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"{type(module).__name__} with groups={module.groups} has no Kronecker "
                "factorisation here; use structure='diag' or 'full' for it, or exclude it from "
                "the parameter subset"
            )
        if x.dim() == module.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        a = im2col(x, module)
    if with_bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def linear_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``(K, B, *out)`` as ``(K, B, T, O)``."""
    k, b = g.shape[:2]
    if isinstance(module, nn.Linear):
        return g.reshape(k, b, -1, g.shape[-1])
    o = g.shape[2]
    return g.reshape(k, b, o, -1).transpose(-1, -2)


def linear_per_sample(view: LinearView) -> Tensor:
    """Per-sample, per-column gradients of ``W̃``: ``(K, B, O, I)`` = ``Σ_t g aᵀ``."""
    return torch.einsum("kbto,bti->kboi", view.g, view.a)


CHUNK_ELEMENTS = 2**24
"""Entries of the largest per-input Jacobian chunk ``(b, K, O·I)`` formed at once."""


def linear_jacobian_chunks(g: Tensor, a: Tensor, chunk_elements: int | None = None):
    r"""Per-input Jacobians of one linear-like layer, ``(b, K, O·I)`` =
    :math:`\sum_t g_{kbt} a_{bt}^\top` (row-major ``[o, i]``), for ``g (K, B, T, O)`` and
    ``a (B, T, I)``, over chunks of inputs ``b`` so that at most ``chunk_elements`` entries are
    alive (default :data:`CHUNK_ELEMENTS`); one batched matmul per chunk
    (``(b, K·O, T) @ (b, T, I)``). Yields ``(slice, J_chunk)``, each chunk a fresh tensor
    (safe to modify in place)."""
    k, b, t, o = g.shape
    i = a.shape[-1]
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    step = max(1, chunk_elements // max(1, k * o * i))
    for s in range(0, b, step):
        sl = slice(s, min(b, s + step))
        gs = g[:, sl].permute(1, 0, 3, 2).reshape(-1, k * o, t)  # (b, K·O, T)
        yield sl, torch.bmm(gs, a[sl]).reshape(-1, k, o * i)


def linear_diag(view: LinearView, out_dtype: torch.dtype | None = None) -> Tensor:
    r"""Exact GGN diagonal of ``W̃`` as ``(O, I)``, summed in ``out_dtype`` (default: the
    factors' dtype).

    Without weight sharing (``T = 1``): :math:`\sum_b (\sum_k g_{kbo}^2) a_{bi}^2`, one matmul.
    With sharing the per-input Jacobians are formed in chunks
    (:func:`linear_jacobian_chunks`), squared and summed per chunk in the factors' dtype.
    """
    out_dtype = view.g.dtype if out_dtype is None else out_dtype
    o, i = view.g.shape[-1], view.a.shape[-1]
    if view.a.shape[1] == 1:
        g2 = view.g[:, :, 0, :].square().sum(0)  # (B, O)
        return (g2.T @ view.a[:, 0, :].square()).to(out_dtype)
    out = torch.zeros(o * i, dtype=out_dtype, device=view.g.device)
    for _, jac in linear_jacobian_chunks(view.g, view.a):
        out += jac.square_().sum((0, 1)).to(out_dtype)
    return out.view(o, i)


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


def embedding_counts(module: nn.Embedding, idx: Tensor) -> Tensor:
    """How often each row of the table is used in the batch ``(V,)`` (padding row: 0)."""
    counts = torch.bincount(idx.reshape(-1), minlength=module.num_embeddings)
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
    raise UnsupportedLayerError(
        f"module {name!r} of type {type(module).__name__} holds parameters in the posterior "
        f"but the {structure!r} extractor does not know this layer type (supported: "
        f"{', '.join(c.__name__ for c in SUPPORTED)}, MultiheadAttention). Exclude it from the "
        "subset, or pass "
        "unknown_layers='per_sample' to treat it with per-sample gradients of that module "
        "(exact for modules that act on each data point separately; a dense block in K-FAC)"
    )


def generic_per_sample(
    module: nn.Module, names: list[str], x: Tensor, g: Tensor, batch_dim: int = 0
) -> dict[str, Tensor]:
    """Per-sample, per-column gradients ``(K, B, *p.shape)`` of a module's own parameters
    by ``torch.func``: the vector-Jacobian product of the module applied to one data point.
    Exact for any module that acts on each data point separately (LayerNorm, GroupNorm,
    BatchNorm in eval mode, ...). ``x`` ``(B, ...)`` and ``g`` ``(K, B, ...)`` hold the batch
    in front; the module is called with it back in dimension ``batch_dim`` (its own
    layout)."""
    params = {n: getattr(module, n).detach() for n in names}

    def one(xb: Tensor, gb: Tensor) -> dict[str, Tensor]:
        def fwd(p):
            out = torch.func.functional_call(module, p, (xb.unsqueeze(batch_dim),))
            return out.squeeze(batch_dim)

        _, vjp = torch.func.vjp(fwd, params)
        return vjp(gb)[0]

    over_k = torch.func.vmap(one, in_dims=(None, 0))  # g_b: (K, ...)
    over_b = torch.func.vmap(over_k, in_dims=(0, 1), out_dims=1)  # -> (K, B, ...)
    return over_b(x, g)
