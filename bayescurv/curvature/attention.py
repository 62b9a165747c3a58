r"""``nn.MultiheadAttention`` in the structured curvature engine.

PyTorch's attention passes its weights straight to ``F.multi_head_attention_forward``, so
module hooks cannot see the two linear maps inside it. While the engine captures, the
module's output is recomputed from an explicit decomposition (the same function of the same
parameters, so values and gradients are unchanged):

.. math::
    z = x W_{in}^\top + b_{in} = [q, k, v],\qquad
    o = \mathrm{softmax}\!\big(q_h k_h^\top / \sqrt{d_h} + M\big)\, v_h \ \text{per head},\qquad
    y = \mathrm{out\_proj}(o),

for self-attention (``query is key is value``), computed batch-first whatever the module's
``batch_first`` (so ``out_proj`` is always called on ``(B, T, D)``). The input projection
is then an ordinary linear layer with weight sharing over the ``T`` tokens — its record is an
:class:`InProjection` (an ``nn.Linear`` view of ``in_proj_weight``/``in_proj_bias``) — and
``out_proj`` is called as a module, so its own hook fires. Every structure (full, diag,
K-FAC expand/reduce, EKFAC, low rank) and the linearized predictive then treat attention
like any other linear layer. ``nn.TransformerEncoderLayer`` uses this module and so is
covered too.

Refused with a message: cross-attention (distinct query/key/value tensors: the three
projections see different inputs, so ``in_proj`` has no single Kronecker input factor),
``kdim``/``vdim`` different from ``embed_dim``, ``bias_k``/``bias_v``, ``add_zero_attn``,
active dropout (training mode), unbatched inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bayescurv.errors import UnsupportedLayerError


class InProjection(nn.Linear):
    """``nn.Linear`` view of an attention module's input projection: its ``weight`` and
    ``bias`` *are* ``in_proj_weight`` and ``in_proj_bias`` (the same Parameters); never
    called, only read by the extractors."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        self.in_features = mha.embed_dim
        self.out_features = 3 * mha.embed_dim
        self.weight = mha.in_proj_weight
        self.bias = mha.in_proj_bias


def check_attention(mha: nn.MultiheadAttention, name: str) -> None:
    """Refuse configurations the decomposition does not cover (module docstring)."""
    why = None
    if not mha._qkv_same_embed_dim:
        why = "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    elif mha.bias_k is not None or mha.bias_v is not None:
        why = "add_bias_kv=True"
    elif mha.add_zero_attn:
        why = "add_zero_attn=True"
    if why:
        raise UnsupportedLayerError(
            f"module {name!r} (MultiheadAttention) with {why} is not supported by the "
            "structured extractors; leave it out of the subset, or write the attention with "
            "nn.Linear projections"
        )


def _mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
          b: int, h: int, t: int, s: int, like: Tensor) -> Tensor | None:
    """Additive mask ``(B, H, T, S)`` (or broadcastable) from PyTorch's mask arguments:
    boolean ``True`` = not allowed; floating masks are added."""
    total = None

    def as_float(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(
                m, float("-inf"))
        return m.to(like.dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=like.device).triu(1)
    if attn_mask is not None:
        m = as_float(attn_mask)
        m = m.reshape(b, h, t, s) if m.dim() == 3 else m  # (B*H, T, S) or (T, S)
        total = m
    if key_padding_mask is not None:
        m = as_float(key_padding_mask).reshape(b, 1, 1, s)
        total = m if total is None else total + m
    return total


def recompute(mha: nn.MultiheadAttention, name: str, args: tuple, kwargs: dict,
              on_projection) -> tuple[Tensor, Tensor | None]:
    """The output of ``mha(*args, **kwargs)`` from the explicit decomposition; calls
    ``on_projection(x, z)`` with the batch-first input ``x`` ``(B, T, D)`` and projection
    ``z = x W_inᵀ + b_in`` (the tensor to differentiate with respect to) before using ``z``."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    query, key, value = bound["query"], bound.get("key"), bound.get("value")
    if key is not query or value is not query:
        raise UnsupportedLayerError(
            f"module {name!r} (MultiheadAttention) is called with distinct query, key and "
            "value tensors (cross-attention): its input projection sees three inputs and has "
            "no single Kronecker input factor. Leave it out of the subset, or use the "
            "matrix-free low-rank structures (lowrank_method='lanczos' or 'randomized')"
        )
    if query.dim() != 3:
        raise UnsupportedLayerError(
            f"module {name!r} (MultiheadAttention) got an unbatched input of shape "
            f"{tuple(query.shape)}; pass (B, T, D) (batch_first=True) or (T, B, D)"
        )
    if mha.training and mha.dropout > 0:
        raise UnsupportedLayerError(
            f"module {name!r} (MultiheadAttention) is in training mode with dropout "
            f"{mha.dropout}: the curvature would be random. Call model.eval() first"
        )
    x = query if mha.batch_first else query.transpose(0, 1)  # (B, T, D)
    b, t, d = x.shape
    heads = mha.num_heads
    hd = d // heads
    z = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    z = on_projection(x, z)
    q, k, v = (u.reshape(b, t, heads, hd).transpose(1, 2) for u in z.split(d, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = _mask(bound.get("attn_mask"), bound.get("key_padding_mask"),
                 bool(bound.get("is_causal", False)), b, heads, t, t, scores)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, -1)  # (B, H, T, S)
    o = (weights @ v).transpose(1, 2).reshape(b, t, d)
    out = mha.out_proj(o)  # batch-first, whatever the module's layout (see HookCapture)
    out = out if mha.batch_first else out.transpose(0, 1)
    if not bound.get("need_weights", True):
        return out, None
    if bound.get("average_attn_weights", True):
        return out, weights.mean(1)
    return out, weights
