"""Laplace-LoRA benchmark (issue 27): Yang et al.'s protocol (ICLR 2024) at a size a 2-core CPU
runs in one sitting.

Protocol, scaled down:

1. *Pretraining.* A Llama-architecture causal LM (Hugging Face ``LlamaForCausalLM``: 2 layers,
   width 64, 4 heads, RoPE, tied embeddings) is pretrained here, from scratch, on the prose
   that ships with every CPython (the language reference's ``pydoc_data.topics`` and the
   standard library's docstrings; :mod:`bayescurv.data.text`), minus every sentence the
   evaluation uses. Word-level tokenizer built from the same text (no hub).
2. *Fine-tuning.* Three sentence-classification tasks from the same offline text (``topic``:
   4 parts of the language reference; ``module``: 4 families of stdlib packages; ``kind``:
   class vs function docstring), 600 training sentences each. The LM answers over answer
   tokens, as in the paper: the logits at the last position (a ``<sep>`` token) restricted to
   one vocabulary word per class, through the LM head's rows for those words (frozen). PEFT
   LoRA (r = 8, alpha = 16, dropout 0.1) on the query and value projections is fine-tuned
   with AdamW long enough to over-fit (the paper's regime, where the MAP is over-confident).
3. *Methods.* MAP; temperature scaling (one temperature fitted on the validation NLL); MC
   dropout (the LoRA dropout kept on, 10 samples); a checkpoint ensemble (the last 3 epochs);
   an ensemble of 3 LoRA fine-tunes (different seeds); last-layer Laplace (K-FAC over the
   answer head, evidence prior: the paper's LLLA); Laplace-LoRA (K-FAC over the LoRA
   adapters only, scalar prior by the evidence, linearized predictive with the probit link
   and by Monte Carlo, 1,000 draws of the logits); Laplace-LoRA with the prior chosen on the
   validation NLL (``optimize_prior_precision(method="gridsearch")``, 13 points on
   ``logspace(-4, 2)``).
4. *Metrics.* Accuracy, NLL and ECE (15 bins) on the test split; the same on the test split
   with 30% of its words replaced by random vocabulary words (covariate shift); OOD AUROC
   (score ``1 - max p``) against sentences of the other source and the mean max-probability
   on them. Fit (curvature + prior tuning) and predict (test split) times as ratios to one
   fine-tuning epoch measured in the same run, the peak rise of the resident memory (RSS,
   sampled every 5 ms) during each, and what each method stores beyond the MAP adapters
   (for the Laplace methods: the tensors of ``la.state_dict()``). Seeds vary the
   fine-tuning (LoRA init, data order, dropout); the pretrained model and the splits are
   shared, as in the paper.
5. *Memory model* (section ``memory``): the K-FAC factor count of LoRA adapters on q and v
   (:func:`kfac_lora_entries`) against ``preflight.estimate_bytes`` and the curvature
   actually stored, for Llama shapes of width 64 to 1024, and the count for LLaMA-2-7B
   (built on the meta device), with and without ``factor_rank``.

Curvature for K-FAC is computed on length-bucketed training batches (no padding; the run in
docs/lora.md predates K-FAC's padding-aware input factor, with which padded batches give the
same curvature); predictions use ordinary left-padded batches.

    OMP_NUM_THREADS=1 python benchmarks/lora.py [--seeds 3] [--png docs/lora_reliability.png]
        [--sections calibration memory] [--cache PATH (reuse the pretrained LM; development)]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from bayescurv import Laplace, metrics
from bayescurv.data import text
from bayescurv.laplace.state import state_tensors

METHODS = ("MAP", "Temperature", "MC dropout", "Checkpoint ens.", "LoRA ensemble (3)",
           "Last-layer LA", "Laplace-LoRA (probit)", "Laplace-LoRA (MC)",
           "Laplace-LoRA, val prior")


# ----------------------------------------------------------------------------------------
# instruments
# ----------------------------------------------------------------------------------------
class PeakRSS:
    """Peak rise of the resident set size inside a ``with`` block, sampled every 5 ms by a
    thread (psutil), in MB."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mb = (self.peak - self.start) / 2**20


# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------
class AnswerModel(nn.Module):
    """A (LoRA-adapted) causal LM answering over answer tokens: the last position's hidden
    state (the ``<sep>`` token; inputs are left-padded) through ``head``, the LM head's rows
    of the answer words. Returns class logits ``(B, C)``."""

    def __init__(self, backbone: nn.Module, head_weight: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, -1])


def llama_config(vocab: int, args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                       num_hidden_layers=args.layers, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=text.PAD, bos_token_id=text.BOS,
                       eos_token_id=text.SEP)


def pretrain(tok: text.WordTokenizer, sentences: list[str], args) -> nn.Module:
    """Causal-LM pretraining on the packed token stream (chunks of 32 tokens), AdamW with a
    cosine schedule."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    lm = LlamaForCausalLM(llama_config(len(tok), args))
    stream = torch.tensor([i for s in sentences for i in tok.encode(s, 64)])
    n = stream.numel() // 32
    chunks = stream[: n * 32].view(n, 32)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.pretrain_steps,
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    lm.train()
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        x = chunks[torch.randint(0, n, (64,), generator=g)]
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == args.pretrain_steps:
            print(f"#   pretrain step {step + 1}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return lm.eval()


def lora_model(lm: nn.Module, answer_ids: list[int], seed: int, args) -> AnswerModel:
    """A fresh LoRA adaptation (seeded) of a copy of the pretrained backbone."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    backbone = copy.deepcopy(lm.model)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1,
                        target_modules=["q_proj", "v_proj"])
    model = AnswerModel(get_peft_model(backbone, config), lm.lm_head.weight[answer_ids].detach())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def state_kb(la: Laplace) -> float:
    """kB of the tensors of ``la.state_dict()`` (the saved posterior)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(la.state_dict())) / 1e3


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
def batches(tok, pairs, size: int, shuffle_seed: int | None = None) -> list[dict]:
    """Left-padded dict batches ``{"input_ids", "attention_mask", "y"}``, in order; with
    ``shuffle_seed``: shuffled, grouped by length within windows of 4 batches (less
    padding), batch order shuffled."""
    pairs = list(pairs)
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        rng.shuffle(pairs)
        chunks = []
        for i in range(0, len(pairs), 4 * size):
            window = sorted(pairs[i:i + 4 * size], key=lambda p: len(p[0]))
            chunks += [window[j:j + size] for j in range(0, len(window), size)]
        rng.shuffle(chunks)
    out = []
    for chunk in chunks:
        b = tok.batch([s for s, _ in chunk])
        b["y"] = torch.tensor([y for _, y in chunk])
        out.append(b)
    return out


def bucketed(tok, pairs, size: int) -> list[dict]:
    """Batches of sentences of one token length each (no padding): for the K-FAC fit."""
    by_len = defaultdict(list)
    for s, y in pairs:
        by_len[len(tok.encode(s))].append((s, y))
    out = []
    for length in sorted(by_len):
        out += batches(tok, by_len[length], size)
    return out


def labels(bs: list[dict]) -> torch.Tensor:
    return torch.cat([b["y"] for b in bs])


# ----------------------------------------------------------------------------------------
# fine-tuning and predictions
# ----------------------------------------------------------------------------------------
def finetune(model: AnswerModel, tok, train, args, seed: int, snapshot_epochs=()):
    """AdamW on the LoRA parameters (the head stays as pretrained); returns the mean epoch
    time and LoRA state snapshots at ``snapshot_epochs`` (1-based)."""
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    torch.manual_seed(seed)
    snaps, times = [], []
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for b in batches(tok, train, args.batch, shuffle_seed=seed * 1000 + epoch):
            logits = model(b["input_ids"], b["attention_mask"])
            loss = nn.functional.cross_entropy(logits, b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        if epoch in snapshot_epochs:
            snaps.append([p.detach().clone() for p in params])
    model.eval()
    return sum(times) / len(times), snaps


@torch.no_grad()
def logits_of(model: nn.Module, bs: list[dict]) -> torch.Tensor:
    return torch.cat([model(b["input_ids"], b["attention_mask"]) for b in bs]).double()


@torch.no_grad()
def mc_dropout(model: nn.Module, bs: list[dict], samples: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model.train()  # LoRA dropout on (the backbone has no other dropout)
    probs = sum(logits_of(model, bs).softmax(-1) for _ in range(samples)) / samples
    model.eval()
    return probs


def fit_temperature(val_logits: torch.Tensor, y: torch.Tensor) -> float:
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(val_logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp())


def laplace_predictions(la: Laplace, sets: dict[str, list[dict]], seed: int,
                        links=("probit",)) -> dict[str, dict[str, torch.Tensor]]:
    """``{link: {set: probs}}`` from one linearized ``functional`` per evaluation set."""
    out: dict[str, dict[str, torch.Tensor]] = {link: {} for link in links}
    g = torch.Generator().manual_seed(seed)
    for name, bs in sets.items():
        mean, cov = la.functional(bs)
        for link in links:
            out[link][name] = la.likelihood.predictive(
                mean.double(), cov.double(), link, 1000, g)
    return out


# ----------------------------------------------------------------------------------------
# one task, one seed
# ----------------------------------------------------------------------------------------
def scores(probs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> dict[str, float]:
    p, y = probs["test"], ys["test"]
    pc, yc = probs["corrupt"], ys["corrupt"]
    return {
        "acc": 100 * metrics.accuracy(p, y), "nll": metrics.nll(p, y),
        "ece": 100 * metrics.ece(p, y),
        "acc_c": 100 * metrics.accuracy(pc, yc), "nll_c": metrics.nll(pc, yc),
        "ece_c": 100 * metrics.ece(pc, yc),
        "auroc": 100 * metrics.auroc(1 - p.amax(-1), 1 - probs["ood"].amax(-1)),
        "maxp_ood": metrics.max_prob(probs["ood"]),
    }


def run_one(task: text.TextTask, tok, lm, seed: int, args, keep: dict | None = None):
    answer_ids = tok.ids(task.answers)
    vocab_words = tok.words[len(text.SPECIALS):]
    corrupted = list(zip(text.corrupt([s for s, _ in task.test], 0.3, vocab_words, seed=7),
                         [y for _, y in task.test]))
    by_length = lambda pairs: sorted(pairs, key=lambda p: len(p[0]))  # noqa: E731
    sets = {name: batches(tok, by_length(pairs), 100) for name, pairs in (
        ("val", task.val), ("test", task.test), ("corrupt", corrupted),
        ("ood", [(s, 0) for s in task.ood]))}
    ys = {k: labels(v) for k, v in sets.items()}
    evals = {k: v for k, v in sets.items() if k != "val"}
    probs: dict[str, dict[str, torch.Tensor]] = {}
    cost: dict[str, dict[str, float]] = {}

    model = lora_model(lm, answer_ids, seed, args)
    with PeakRSS() as m_train:
        epoch_s, snaps = finetune(model, tok, task.train, args, seed,
                                  snapshot_epochs=range(args.epochs - 2, args.epochs + 1))
    with PeakRSS() as m_pred:
        test_logits = logits_of(model, sets["test"])
    map_logits = {k: logits_of(model, v) for k, v in evals.items()}
    probs["MAP"] = {k: v.softmax(-1) for k, v in map_logits.items()}
    cost["MAP"] = {"fit": 0.0, "predict": m_pred.seconds, "fit_mb": m_train.mb,
                   "predict_mb": m_pred.mb}
    del test_logits

    with PeakRSS() as m:
        temp = fit_temperature(logits_of(model, sets["val"]), ys["val"])
    probs["Temperature"] = {k: (v / temp).softmax(-1) for k, v in map_logits.items()}
    cost["Temperature"] = {"fit": m.seconds, "predict": m_pred.seconds, "fit_mb": m.mb,
                           "predict_mb": m_pred.mb}

    with PeakRSS() as m:
        probs["MC dropout"] = {k: mc_dropout(model, v, 10, seed) for k, v in evals.items()}
    cost["MC dropout"] = {"fit": 0.0, "predict": m.seconds / 3, "fit_mb": 0.0,
                          "predict_mb": m.mb}

    final = [p.detach().clone() for p in lora_parameters(model)]
    ce = defaultdict(float)
    with PeakRSS() as m:
        for snap in snaps:
            with torch.no_grad():
                for p, s in zip(lora_parameters(model), snap):
                    p.copy_(s)
            for k, v in evals.items():
                ce[k] = ce[k] + logits_of(model, v).softmax(-1) / len(snaps)
    with torch.no_grad():
        for p, s in zip(lora_parameters(model), final):
            p.copy_(s)
    probs["Checkpoint ens."] = dict(ce)
    cost["Checkpoint ens."] = {"fit": 0.0, "predict": m.seconds / 3, "fit_mb": 0.0,
                               "predict_mb": m.mb}

    # last-layer Laplace: the answer head (frozen in fine-tuning), K-FAC, evidence prior
    with PeakRSS() as m_fit:
        ll = Laplace(model, "classification", subset=["head"], structure="kfac")
        ll.fit(batches(tok, task.train, args.batch))
        ll.optimize_prior_precision()
    with PeakRSS() as m_pred:
        probs["Last-layer LA"] = laplace_predictions(ll, evals, seed)["probit"]
    cost["Last-layer LA"] = {"fit": m_fit.seconds, "predict": m_pred.seconds / 3,
                             "fit_mb": m_fit.mb, "predict_mb": m_pred.mb,
                             "stored_kb": state_kb(ll)}
    del ll

    # Laplace-LoRA: K-FAC over the adapters only, evidence prior
    with PeakRSS() as m_fit:
        la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac")
        la.fit(bucketed(tok, task.train, args.batch))
        la.optimize_prior_precision()
    prior_evidence = float(la.prior_precision)
    with PeakRSS() as m_pred:
        both = laplace_predictions(la, evals, seed, links=("probit", "mc"))
    probs["Laplace-LoRA (probit)"] = both["probit"]
    probs["Laplace-LoRA (MC)"] = both["mc"]
    cost["Laplace-LoRA (probit)"] = {"fit": m_fit.seconds, "predict": m_pred.seconds / 3,
                                     "fit_mb": m_fit.mb, "predict_mb": m_pred.mb,
                                     "stored_kb": state_kb(la)}
    cost["Laplace-LoRA (MC)"] = cost["Laplace-LoRA (probit)"]
    with PeakRSS() as m_grid:
        la.optimize_prior_precision(method="gridsearch", val_loader=sets["val"],
                                    grid=torch.logspace(-4, 2, args.grid))
    prior_val = float(la.prior_precision)
    with PeakRSS() as m_pred:
        probs["Laplace-LoRA, val prior"] = laplace_predictions(la, evals, seed)["probit"]
    cost["Laplace-LoRA, val prior"] = {"fit": m_fit.seconds + m_grid.seconds,
                                       "predict": m_pred.seconds / 3,
                                       "fit_mb": max(m_fit.mb, m_grid.mb),
                                       "predict_mb": m_pred.mb, "stored_kb": state_kb(la)}
    n_lora = la.num_params
    del la

    # ensemble of independently fine-tuned LoRA adapters (the MAP is member 0)
    members = [probs["MAP"]]
    with PeakRSS() as m:
        for k in range(1, args.members):
            other = lora_model(lm, answer_ids, 10_000 * (k + 1) + seed, args)
            finetune(other, tok, task.train, args, 10_000 * (k + 1) + seed)
            members.append({n: logits_of(other, v).softmax(-1) for n, v in evals.items()})
            del other
    probs["LoRA ensemble (3)"] = {n: sum(mb[n] for mb in members) / len(members)
                                  for n in evals}
    cost["LoRA ensemble (3)"] = {"fit": m.seconds,
                                 "predict": cost["MAP"]["predict"] * args.members,
                                 "fit_mb": m.mb, "predict_mb": cost["MAP"]["predict_mb"]}

    adapter_kb = sum(p.numel() * p.element_size() for p in lora_parameters(model)) / 1e3
    extra = {"MAP": 0.0, "Temperature": 0.008, "MC dropout": 0.0,
             "Checkpoint ens.": (len(snaps) - 1) * adapter_kb,
             "LoRA ensemble (3)": (args.members - 1) * adapter_kb}
    for name, kb in extra.items():
        cost[name]["stored_kb"] = kb
    rows = {name: scores(probs[name], ys) for name in METHODS}
    for name in METHODS:
        rows[name]["fit_ratio"] = cost[name]["fit"] / epoch_s
        rows[name]["predict_ratio"] = cost[name]["predict"] / epoch_s
        rows[name]["fit_mb"] = cost[name]["fit_mb"]
        rows[name]["predict_mb"] = cost[name]["predict_mb"]
        rows[name]["stored_kb"] = cost[name]["stored_kb"]
    info = {"epoch_s": epoch_s, "temperature": temp, "prior_evidence": prior_evidence,
            "prior_val": prior_val, "n_lora": n_lora,
            "train_acc": 100 * metrics.accuracy(
                logits_of(model, batches(tok, task.train, 100)).softmax(-1),
                torch.tensor([y for _, y in task.train]))}
    if keep is not None:
        keep.update({"probs": probs, "y": ys["test"]})
    return rows, info


# ----------------------------------------------------------------------------------------
# memory model of the K-FAC factors of LoRA adapters
# ----------------------------------------------------------------------------------------
def kfac_lora_entries(d_in: int, d_out: int, r: int, factor_rank: int | None = None) -> int:
    """Entries of the K-FAC factors of one LoRA-adapted ``Linear(d_in, d_out)``: ``lora_A``
    ``(r, d_in)`` has factors ``r x r`` (output side) and ``d_in x d_in`` (input side),
    ``lora_B`` ``(d_out, r)`` has ``d_out x d_out`` and ``r x r``. With ``factor_rank`` ``k``
    a factor of ``n > k`` rows keeps ``n k + k`` numbers (basis and eigenvalues)."""
    def f(n: int) -> int:
        return n * n if factor_rank is None or n <= factor_rank else n * factor_rank + factor_rank

    return 2 * f(r) + f(d_in) + f(d_out)


def memory_model(sizes: list[tuple[int, int]], r: int, factor_rank: int) -> None:
    """Predicted vs measured bytes of Laplace-LoRA's K-FAC posterior (q and v adapted) for
    Llama-shaped models of width ``d`` and ``L`` layers; then LLaMA-2-7B's count."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bayescurv.curvature.preflight import estimate_bytes
    from bayescurv.params import select

    print(f"\nMemory model: K-FAC over LoRA r = {r} on q and v (float32 model, factors held "
          f"in float64; 'stored' = the curvature tensors of la.state_dict() after the "
          f"posterior was used; 'fit peak' = RSS rise during fit)\n")
    print("| model | LoRA params | predicted MB (formula) | estimate_bytes MB | "
          "stored MB | fit peak MB | predicted MB, factor_rank "
          f"{factor_rank} | stored MB, factor_rank {factor_rank} |")
    print("|---|---|---|---|---|---|---|---|")

    def build(d: int, n_layers: int, device: str = "cpu"):
        cfg = LlamaConfig(vocab_size=128, hidden_size=d, intermediate_size=2 * d,
                          num_hidden_layers=n_layers, num_attention_heads=max(1, d // 128),
                          num_key_value_heads=max(1, d // 128), max_position_embeddings=64)
        with torch.device(device):
            lm = LlamaForCausalLM(cfg)
        lora = get_peft_model(lm, LoraConfig(r=r, lora_alpha=2 * r,
                                             target_modules=["q_proj", "v_proj"]))
        return lora, cfg

    class Last(nn.Module):  # class logits of 4 "answer tokens" at the last position
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits[:, -1, :4]

    for d, n_layers in sizes:
        torch.manual_seed(0)
        lora, cfg = build(d, n_layers)
        for n, p in lora.named_parameters():  # non-zero B: a non-trivial curvature
            if "lora_B" in n:
                nn.init.normal_(p, std=0.02)
        model = Last(lora).eval()
        data = [{"x": torch.randint(0, 128, (8, 16)), "y": torch.randint(0, 4, (8,))}]
        formula = 8 * n_layers * 2 * kfac_lora_entries(d, d, r)
        formula_k = 8 * n_layers * 2 * kfac_lora_entries(d, d, r, factor_rank)
        stored = []
        for k in (None, factor_rank):
            la = Laplace(model, "classification", subset=["*lora_*"], structure="kfac",
                         factor_rank=k)
            with PeakRSS() as m:
                la.fit(data, x_key="x")
            la.prior_precision = 1.0
            la.functional(data[0]["x"][:2])  # decomposes (and truncates)
            curv = la.state_dict()["curvature"]
            stored.append(sum(t.numel() * t.element_size() for t in state_tensors(curv)) / 1e6)
            if k is None:
                peak = m.mb
                est = estimate_bytes(la.params, "kfac") / 1e6
            del la
        print(f"| Llama d={d}, {n_layers} layers | {8 * n_layers * 2 * r * d * 2 // 8:,} | "
              f"{formula / 1e6:.2f} | {est:.2f} | {stored[0]:.2f} | {peak:.0f} | "
              f"{formula_k / 1e6:.2f} | {stored[1]:.2f} |", flush=True)
    # LLaMA-2-7B: 32 layers, d = 4096 (q and v are 4096 x 4096), on the meta device
    lora, _ = build(4096, 32, device="meta")
    pset = select(lora, ["*lora_*"])
    est = estimate_bytes(pset, "kfac") / 1e9
    formula = 8 * 32 * 2 * kfac_lora_entries(4096, 4096, r) / 1e9
    formula_k = 8 * 32 * 2 * kfac_lora_entries(4096, 4096, r, factor_rank) / 1e9
    print(f"| LLaMA-2-7B shape (d=4096, 32 layers) | {pset.numel:,} | {formula:.2f} GB | "
          f"{est:.2f} GB | — | ≥ {formula:.2f} GB (full factors summed first) | "
          f"{formula_k * 1e3:.1f} MB | — |")


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    s = float(t.std()) if len(values) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {s:.{digits}f}"


def table(results, tasks, columns, title):
    print(f"\n{title}\n")
    head = "| method | " + " | ".join(f"{t} {c}" for t in tasks for c, _, _ in columns) + " |"
    print(head)
    print("|" + "---|" * (1 + len(tasks) * len(columns)))
    for name in METHODS:
        cells = [mean_std([r[name][key] for r in results[t]], d)
                 for t in tasks for _, key, d in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def calibration(args) -> None:
    tasks = {t: text.text_task(t, n_train=args.n_train) for t in args.tasks}
    held = set().union(*(t.held_out() for t in tasks.values()))
    corpus = text.corpus(held)
    always = tuple(a for t in tasks.values() for a in t.answers)
    tok = text.WordTokenizer(corpus, args.vocab, always=always)
    n_tokens = sum(len(text.tokenize(s)) for s in corpus)
    unk = sum(t not in tok.index for s in corpus for t in text.tokenize(s)) / n_tokens
    print(f"# corpus: {len(corpus)} sentences, {n_tokens} tokens, vocabulary {len(tok)} "
          f"(<unk> {100 * unk:.1f}% of tokens); python {sys.version.split()[0]}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    if args.cache is not None and args.cache.exists():
        from transformers import LlamaForCausalLM

        lm = LlamaForCausalLM(llama_config(len(tok), args))
        lm.load_state_dict(torch.load(args.cache, weights_only=True))
        lm.eval()
        print(f"# pretrained LM loaded from {args.cache}")
    else:
        t0 = time.perf_counter()
        lm = pretrain(tok, corpus, args)
        print(f"# pretraining: {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s")
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(lm.state_dict(), args.cache)

    results: dict[str, list] = {t: [] for t in tasks}
    infos: dict[str, list] = {t: [] for t in tasks}
    keep: dict = {}
    for name, task in tasks.items():
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            rows, info = run_one(task, tok, lm, seed, args,
                                 keep if (name == args.tasks[0] and seed == 0) else None)
            results[name].append(rows)
            infos[name].append(info)
            print(f"# {name} seed {seed}: {time.perf_counter() - t0:.0f} s; train acc "
                  f"{info['train_acc']:.1f}%, epoch {info['epoch_s']:.2f} s, T = "
                  f"{info['temperature']:.2f}, prior evidence {info['prior_evidence']:.3g} "
                  f"val {info['prior_val']:.3g}, {info['n_lora']} LoRA params; ECE MAP "
                  f"{rows['MAP']['ece']:.1f} LA {rows['Laplace-LoRA (probit)']['ece']:.1f}",
                  flush=True)

    names = list(tasks)
    table(results, names, [("ECE %", "ece", 1), ("NLL", "nll", 3), ("acc %", "acc", 1)],
          f"In distribution (test split), mean ± std over {args.seeds} seeds")
    table(results, names, [("ECE %", "ece_c", 1), ("NLL", "nll_c", 3), ("AUROC %", "auroc", 1)],
          "Shift: 30% of the words replaced (ECE, NLL); OOD detection against the other "
          "source (AUROC of 1 - max p)")
    print("\nCost (mean over tasks and seeds; ratios to one fine-tuning epoch; peak RSS rise)\n")
    print("| method | fit / epoch | predict (test) / epoch | fit peak MB | predict peak MB | "
          "stored beyond the MAP, kB |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        rs = [r[name] for t in names for r in results[t]]
        print(f"| {name} | {mean_std([r['fit_ratio'] for r in rs], 2)} | "
              f"{mean_std([r['predict_ratio'] for r in rs], 2)} | "
              f"{mean_std([r['fit_mb'] for r in rs], 1)} | "
              f"{mean_std([r['predict_mb'] for r in rs], 1)} | "
              f"{sum(r['stored_kb'] for r in rs) / len(rs):.1f} |")
    # relative ECE reduction and the goal
    print("\nGoal check (paper: ECE 30.8 -> 6.9 on WinoGrande-S, a 78% relative reduction; "
          "NLL below temperature scaling):")
    for t in names:
        e_map = sum(r["MAP"]["ece"] for r in results[t]) / args.seeds
        for meth in ("Laplace-LoRA (probit)", "Laplace-LoRA, val prior"):
            e_la = sum(r[meth]["ece"] for r in results[t]) / args.seeds
            n_la = sum(r[meth]["nll"] for r in results[t]) / args.seeds
            n_ts = sum(r["Temperature"]["nll"] for r in results[t]) / args.seeds
            print(f"#   {t}, {meth}: ECE {e_map:.1f} -> {e_la:.1f} "
                  f"({100 * (1 - e_la / e_map):.0f}% lower); NLL {n_la:.3f} vs temperature "
                  f"{n_ts:.3f} ({'lower' if n_la < n_ts else 'not lower'})")
    if args.png is not None and keep:
        diagrams = {m: metrics.reliability_diagram(keep["probs"][m]["test"], keep["y"])
                    for m in ("MAP", "Temperature", "LoRA ensemble (3)",
                              "Laplace-LoRA (probit)")}
        metrics.plot_reliability(diagrams, args.png,
                                 title=f"{args.tasks[0]} task, test split, seed 0")
        print(f"# reliability diagram: {args.png}")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=["topic", "module", "kind"])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--grid", type=int, default=13, help="grid points of the val prior search")
    ap.add_argument("--cache", type=Path, default=None,
                    help="reuse / store the pretrained LM here (development only)")
    ap.add_argument("--png", type=Path, default=None, help="reliability diagram PNG")
    ap.add_argument("--sections", nargs="+", default=["calibration", "memory"])
    ap.add_argument("--memory-sizes", nargs="+", default=["64x2", "512x4", "1024x4"],
                    help="width x layers of the Llama shapes measured in the memory model")
    ap.add_argument("--factor-rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.perf_counter()
    if "calibration" in args.sections:
        calibration(args)
    if "memory" in args.sections:
        memory_model([tuple(int(v) for v in s.split("x")) for s in args.memory_sizes],
                     args.rank, args.factor_rank)
    import resource

    print(f"\n# process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} "
          f"MB; total {time.perf_counter() - start:.0f} s "
          f"({math.ceil((time.perf_counter() - start) / 60)} min)")


if __name__ == "__main__":
    main()
