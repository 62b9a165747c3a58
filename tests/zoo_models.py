"""Tiny configurations of the models users download: torchvision, timm, Hugging Face
transformers and PEFT (random initialisation, no downloads). Each builder returns
``(model, inputs, loader, options)`` in the requested dtype, model in eval mode: ``inputs``
are what the model is called with (a tensor, or a dict of keyword inputs), ``loader`` a list
of two batches, ``options`` the ``Laplace`` keyword arguments the model needs (``output_key``
for Hugging Face outputs, ``subset`` for PEFT). Skipped when the package is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

N, CLASSES = 6, 3


def _bn_stats(model: nn.Module) -> None:
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _images(model: nn.Module, size: int, dtype: torch.dtype):
    model = model.to(dtype).eval()
    _bn_stats(model)
    x = torch.randn(N, 3, size, size, dtype=dtype)
    y = torch.randint(0, CLASSES, (N,))
    return model, x, [(x[:4], y[:4]), (x[4:], y[4:])], {}


def _texts(model: nn.Module, dtype: torch.dtype, vocab: int = 20, pad: int | None = None):
    model = model.to(dtype).eval()
    ids = torch.randint(1, vocab, (N, 5))
    mask = torch.ones_like(ids)
    if pad is not None:  # right padding on two sequences
        ids[:2, 3:] = pad
        mask[:2, 3:] = 0
    y = torch.randint(0, CLASSES, (N,))
    x = {"input_ids": ids, "attention_mask": mask}
    loader = [{**{k: v[:4] for k, v in x.items()}, "labels": y[:4]},
              {**{k: v[4:] for k, v in x.items()}, "labels": y[4:]}]
    return model, x, loader, {"output_key": "logits", "y_key": "labels"}


def tv_vit(dtype):
    tv = pytest.importorskip("torchvision")
    return _images(tv.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=12,
        num_classes=CLASSES), 8, dtype)


def tv_convnext(dtype):
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    model = ConvNeXt([CNBlockConfig(4, 8, 1), CNBlockConfig(8, None, 1)], num_classes=CLASSES,
                     layer_scale=0.5)
    return _images(model, 16, dtype)


def tv_mobilenet(dtype):
    tv = pytest.importorskip("torchvision")
    return _images(tv.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.1), 16,
                   dtype)


def timm_vit(dtype):
    timm = pytest.importorskip("timm")
    return _images(timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
        num_classes=CLASSES, init_values=0.5), 8, dtype)


def timm_relpos(dtype):
    timm = pytest.importorskip("timm")
    return _images(timm.create_model(
        "vit_relpos_small_patch16_224", img_size=8, patch_size=4, embed_dim=8, depth=1,
        num_heads=2, num_classes=CLASSES, rel_pos_type="bias"), 8, dtype)


def timm_convnext(dtype):
    timm = pytest.importorskip("timm")
    return _images(timm.models.convnext.ConvNeXt(
        dims=(4, 4, 8, 8), depths=(1, 1, 1, 1), num_classes=CLASSES, ls_init_value=0.5), 32,
        dtype)


def hf_bert(dtype):
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=12, max_position_embeddings=8,
                        num_labels=CLASSES, pad_token_id=0)
    return _texts(tf.BertForSequenceClassification(cfg), dtype, pad=0)


def hf_gpt2(dtype):
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                        num_labels=CLASSES, pad_token_id=0)
    return _texts(tf.GPT2ForSequenceClassification(cfg), dtype, pad=0)


def hf_llama(dtype):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=12,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=8, num_labels=CLASSES, pad_token_id=0)
    return _texts(tf.LlamaForSequenceClassification(cfg), dtype, pad=0)


def hf_llama_lm(dtype):
    """A causal LM head: the next-token logits at each sequence's last real token
    (right-padded inputs, read through the attention mask) over the first ``CLASSES`` tokens
    (the answer tokens): ``output_key=bayescurv.params.last_token(tokens=...)``."""
    tf = pytest.importorskip("transformers")
    from bayescurv.params import last_token

    cfg = tf.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=12,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=8, pad_token_id=0)
    model, x, loader, opts = _texts(tf.LlamaForCausalLM(cfg), dtype, pad=0)
    return model, x, loader, {**opts, "output_key": last_token(tokens=range(CLASSES))}


def peft_bert(dtype):
    peft = pytest.importorskip("peft")
    model, x, loader, opts = hf_bert(dtype)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # trained adapters: B != 0 (PEFT initialises B to zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.to(dtype), x, loader, {**opts, "subset": "*lora_*"}


MODELS = {
    "tv_vit": tv_vit,
    "tv_convnext": tv_convnext,
    "tv_mobilenet": tv_mobilenet,
    "timm_vit": timm_vit,
    "timm_relpos": timm_relpos,
    "timm_convnext": timm_convnext,
    "hf_bert": hf_bert,
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
    "hf_llama_lm": hf_llama_lm,
    "peft_bert": peft_bert,
}
"""Tiny models of the zoo matrix (the torchvision ResNet, too wide to shrink, is separate)."""


def build(name: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    return MODELS[name](dtype)
