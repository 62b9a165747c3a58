"""Laplace-LoRA on Hugging Face models with PEFT adapters (issue 27): a posterior over the
LoRA weights only, dict batches with padding masks, the evidence prior, the predictive, the
state dict, and the linearized predictive against dense float64 ``J Σ Jᵀ``; plus the offline
text data of :mod:`bayescurv.data.text`."""

from __future__ import annotations

import warnings

import pytest
import torch

from bayescurv import Laplace
from bayescurv.data import text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

C, V = 3, 40


def _llama(seed: int = 0, dtype=torch.float32, modules_to_save: bool = True):
    """A tiny LlamaForSequenceClassification with LoRA (r = 2) on q and v; B non-zero so the
    adapters' curvature is non-trivial."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      num_labels=C, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForSequenceClassification(cfg)
        config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1,
                                 target_modules=["q_proj", "v_proj"],
                                 task_type="SEQ_CLS" if modules_to_save else None)
        model = peft.get_peft_model(model, config)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return model.to(dtype).eval()


def _batches(seed: int = 1, n: int = 6, width: int = 7):
    """Right-padded dict batches (Llama's sequence classifier reads the last non-pad token)
    with an attention mask, and the same sentences unpadded one by one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    lengths[0] = width
    ids = torch.randint(1, V, (n, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = ids * mask
    y = torch.randint(0, C, (n,), generator=g)
    padded = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": y[i:i + 3]}
              for i in range(0, n, 3)]
    single = [{"input_ids": ids[i:i + 1, :lengths[i]],
               "attention_mask": mask[i:i + 1, :lengths[i]], "labels": y[i:i + 1]}
              for i in range(n)]
    return padded, single, {"input_ids": ids, "attention_mask": mask}


def _lora_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_posterior_covers_only_the_adapters():
    model = _llama()
    padded, _, _ = _batches()
    # the PEFT classifier head (modules_to_save) is trainable too: "trainable" includes it,
    # the pattern selects the adapters only (the paper's Laplace-LoRA)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    la_all = Laplace(model, "classification", subset="trainable", output_key="logits")
    assert any("modules_to_save" in n for n in la_all.params.names)
    la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                 output_key="logits")
    la.fit(padded, y_key="labels")
    assert all("lora_" in n for n in la.params.names)
    assert la.num_params == _lora_numel(model) == 2 * (2 * 8 + 8 * 2) * 1
    # without modules_to_save, "trainable" is exactly the adapters
    plain = _llama(modules_to_save=False)
    assert Laplace(plain, subset="trainable", output_key="logits").params.names == \
        Laplace(plain, subset=["*lora_*"], output_key="logits").params.names


def test_predictive_evidence_prior_and_padding_masks():
    model = _llama()
    padded, single, x = _batches()
    la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                 output_key="logits")
    la.fit(padded, y_key="labels")
    prior = la.optimize_prior_precision()
    assert torch.isfinite(prior).all() and (prior > 0).all()
    assert torch.isfinite(la.log_marginal_likelihood())
    for link in ("probit", "mc"):
        probs = la.predict(x, link=link, generator=torch.Generator().manual_seed(0))
        assert probs.shape == (6, C)
        torch.testing.assert_close(probs.sum(-1), torch.ones(6), rtol=0, atol=1e-5)
    # the predictive on a padded batch equals that of each sentence alone: padding is masked
    # in the forward pass and contributes nothing to the Jacobians
    mean, cov = la.functional(x)
    alone = [la.functional({k: v for k, v in b.items() if k != "labels"}) for b in single]
    torch.testing.assert_close(mean, torch.cat([m for m, _ in alone]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cov, torch.cat([c for _, c in alone]), rtol=1e-4, atol=1e-6)
    # a loader of dict batches (targets included) gives the same as one batch
    torch.testing.assert_close(la.predict(padded), la.predict(x))
    # a validation grid search over dict batches
    la.optimize_prior_precision(method="gridsearch", val_loader=padded, y_key="labels",
                                grid=torch.logspace(-2, 2, 3))
    assert float(la.prior_precision) in [float(v) for v in torch.logspace(-2, 2, 3)]


def test_curvature_ignores_padding_in_every_structure():
    """Padding a batch changes no structure: the exact ones get nothing from padded
    positions, and K-FAC leaves the positions that do not reach the output out of its input
    factor and count (``accumulate.live_positions``; before, K-FAC-expand's ``A`` averaged the
    padded positions' inputs too and moved by ~18% on a tiny BERT)."""
    model = _llama(dtype=torch.float64)
    padded, single, _ = _batches()
    for structure in ("diag", "kfac", "kfac-reduce", "ekfac"):
        curv = {}
        for name, data in (("padded", padded), ("single", single)):
            la = Laplace(model, "classification", subset=["*lora_*"], structure=structure,
                         output_key="logits")
            la.fit(data, y_key="labels")
            curv[name] = la.curvature.to_dense()
        torch.testing.assert_close(curv["padded"], curv["single"])


def test_state_dict_holds_only_the_adapters_and_round_trips(tmp_path):
    model = _llama()
    padded, _, x = _batches()
    la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                 output_key="logits")
    la.fit(padded, y_key="labels")
    la.optimize_prior_precision()
    state = la.state_dict()
    assert all("lora_" in n for n in state["param_names"])
    assert state["mean"].numel() == _lora_numel(model)
    path = tmp_path / "lora_posterior.pt"
    torch.save(state, path)
    # a fresh model with the same base weights but other adapters: load, write θ* back
    other = _llama()
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_" in n:
                p.normal_()
    la2 = Laplace(other, "classification", subset=["*lora_*"], structure="kfac",
                  output_key="logits")
    la2.load_state_dict(torch.load(path, weights_only=True))
    la2.restore_map()
    torch.testing.assert_close(la2.prior_precision, la.prior_precision)
    torch.testing.assert_close(la2.predict(x), la.predict(x))


def test_linearized_predictive_equals_dense_float64():
    model = _llama(dtype=torch.float64)
    padded, _, x = _batches()
    la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                 output_key="logits", prior_precision=0.7)
    la.fit(padded, y_key="labels")
    jac = torch.func.jacrev(lambda v: la.params.functional_call(v, **x))(la.params.vector())
    js = jac.reshape(-1, la.num_params)
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    _, joint = la.functional(x, joint=True)
    torch.testing.assert_close(joint, ref, rtol=1e-9, atol=1e-12)
    # and the K-FAC blocks are G ⊗ A per adapter: lora_A (r x d_in): (r x r) ⊗ (d_in x d_in)
    sizes = [b.factor_sizes for b in la.curvature.blocks]
    assert sorted(sizes) == sorted([(2, 8), (8, 2)] * 2)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_bert_and_gpt2_sequence_classifiers(arch):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import transformers as tf

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "bert":
            cfg = tf.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=16,
                                max_position_embeddings=16, num_labels=C)
            model, targets = tf.BertForSequenceClassification(cfg), ["query", "value"]
        else:  # GPT-2's c_attn is an HF Conv1D; the LoRA adapters beside it are nn.Linear
            cfg = tf.GPT2Config(vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                num_labels=C, pad_token_id=0)
            model, targets = tf.GPT2ForSequenceClassification(cfg), ["c_attn"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=targets, task_type="SEQ_CLS"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    padded, _, x = _batches()
    la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                 output_key="logits")
    la.fit(padded, y_key="labels")
    la.optimize_prior_precision()
    assert la.num_params == _lora_numel(model)
    probs = la.predict(x)
    assert probs.shape == (6, C) and torch.allclose(probs.sum(-1), torch.ones(6))


# ----------------------------------------------------------------------------------------
# offline text
# ----------------------------------------------------------------------------------------
def test_tokenizer_left_pads_and_ends_with_sep():
    tok = text.WordTokenizer(["the cat sat on the mat.", "a dog ran."], vocab_size=10,
                             always=("class",))
    assert tok.words[:4] == list(text.SPECIALS) and tok.words[4] == "class"
    b = tok.batch(["the cat", "a dog ran on the mat"])
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert (b["input_ids"][:, -1] == text.SEP).all()
    assert b["attention_mask"][0, 0] == 0 and b["input_ids"][0, 0] == text.PAD
    assert b["input_ids"][1, 0] == text.BOS
    assert tok.ids(["class"]) == [4]
    with pytest.raises(Exception, match="not in the vocabulary"):
        tok.ids(["zebra"])


def test_sentences_and_corruption():
    s = text.sentences("This is the first sentence here. And a second one follows it.\n\n"
                       ">>> code = 1 + 2 + 3 + 4 + 5")
    assert s == ["This is the first sentence here.", "And a second one follows it."]
    out = text.corrupt(s, 1.0, ["zz"], seed=0)
    assert all(set(o.split()) == {"zz"} for o in out)
    assert text.corrupt(s, 0.0, ["zz"]) == [" ".join(text.tokenize(t)) for t in s]


@pytest.mark.slow
def test_text_tasks_are_disjoint_and_deterministic():
    for name in ("topic", "module", "kind"):
        task = text.text_task(name, n_train=100, n_val=50, n_test=50, n_ood=50)
        splits = [{s for s, _ in part} for part in (task.train, task.val, task.test)]
        assert sum(map(len, splits)) == 200 and len(set.union(*splits)) == 200
        assert not set(task.ood) & set.union(*splits)
        assert {y for _, y in task.train} == set(range(task.num_classes))
        assert text.text_task(name, n_train=100, n_val=50, n_test=50, n_ood=50).test == task.test
