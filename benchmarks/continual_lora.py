"""Continual LoRA fine-tuning of a small pretrained transformer (issue 28, item 5): the
filters over the LoRA parameters only, on three offline text tasks in sequence.

    OMP_NUM_THREADS=1 python benchmarks/continual_lora.py [--seeds 1] [--epochs 6]

The pretrained model, tokenizer and tasks are those of ``benchmarks/lora.py`` (a 2-layer
width-64 Llama pretrained here on CPython's own prose; ``topic`` → ``module`` → ``kind``
sentence classification, 600 training sentences each, answers read through the LM head's
rows of one answer word per class: the task identity picks the answer words, a
task-incremental stream). One PEFT LoRA adapter (r = 8 on q/v, 4,096 weights) is trained
through the tasks with AdamW; ``loss = mean NLL + penalty / N``, ``δ = 1``:

- sequential LoRA fine-tuning (no penalty);
- K-FAC online Laplace over the LoRA parameters (``KFACFilter(subset="*lora_*")``);
- the low-rank filter over the same parameters (``eigensolver="kfac"``, rank ``k``; the
  default ``k = 24`` stores about what K-FAC stores after the three tasks).

Reports the test accuracy on every task after the last one, its mean and the forgetting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora as L  # noqa: E402  (the pretrained model, tokenizer and batches of lora.py)

from bayescurv.continual import KFACFilter, LaplaceFilter  # noqa: E402
from bayescurv.data import text  # noqa: E402

METHODS = ("sequential LoRA", "K-FAC online Laplace", "low-rank filter")


def make_filter(method: str, model: nn.Module, rank: int):
    if method == "K-FAC online Laplace":
        return KFACFilter(model, "classification", subset="*lora_*")
    if method == "low-rank filter":
        return LaplaceFilter(model, "classification", subset="*lora_*", rank=rank,
                             eigensolver="kfac")
    return None


def run(method: str, tasks, tok, lm, seed: int, args) -> dict:
    torch.manual_seed(seed)
    first = L.lora_model(lm, tok.ids(tasks[0].answers), seed, args)
    backbone = first.backbone  # one adapter shared by the tasks; one frozen head per task
    models = [first] + [L.AnswerModel(backbone, lm.lm_head.weight[tok.ids(t.answers)].detach())
                        for t in tasks[1:]]
    for m in models:
        m.head.weight.requires_grad_(False)
    filt = make_filter(method, first, args.filter_rank)
    tests = [L.batches(tok, sorted(t.test, key=lambda p: len(p[0])), 100) for t in tasks]
    T = len(tasks)
    R = torch.zeros(T, T)
    upd = 0.0
    params = L.lora_parameters(first)
    for i, (task, model) in enumerate(zip(tasks, models)):
        if filt is not None:
            filt.predict()
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        n = len(task.train)
        for epoch in range(args.epochs):
            model.train()
            for b in L.batches(tok, task.train, args.batch, shuffle_seed=seed * 1000 + epoch):
                loss = nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]),
                                                   b["y"])
                if filt is not None:
                    loss = loss + filt.penalty(model) / n
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        if filt is not None:
            t0 = time.perf_counter()
            filt.update(L.bucketed(tok, task.train, args.batch), model)
            upd += time.perf_counter() - t0
        for j, (bs, m) in enumerate(zip(tests, models)):
            R[i, j] = float((L.logits_of(m, bs).argmax(-1) == L.labels(bs)).float().mean())
    return {"R": R, "update_s": upd / T,
            "memory": filt.memory_bytes() if filt is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--filter-rank", type=int, default=24)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    names = ("topic", "module", "kind")
    tasks = [text.text_task(t, n_train=args.n_train) for t in names]
    held = set().union(*(t.held_out() for t in tasks))
    corpus = text.corpus(held)
    tok = text.WordTokenizer(corpus, args.vocab, always=tuple(a for t in tasks for a in t.answers))
    lm = L.pretrain(tok, corpus, args)
    rows = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for m in METHODS:
            r = run(m, tasks, tok, lm, seed, args)
            rows[m].append(r)
            print(f"  seed {seed} {m}: final {[round(float(a), 3) for a in r['R'][-1]]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\ncontinual LoRA, tasks {' -> '.join(names)}, {args.seeds} seed(s), "
          f"{args.epochs} epochs/task, filter rank {args.filter_rank}")
    print("| method | " + " | ".join(f"{t} acc" for t in names)
          + " | avg acc | forgetting | update s | state kB |")
    print("|---" * (len(names) + 5) + "|")
    for m, rs in rows.items():
        final = torch.stack([r["R"][-1] for r in rs]).mean(0)
        best = torch.stack([r["R"][:-1, :-1].max(0).values for r in rs]).mean(0)
        fg = float((best - final[:-1]).mean())
        upd = sum(r["update_s"] for r in rs) / len(rs)
        print(f"| {m} | " + " | ".join(f"{float(a):.3f}" for a in final)
              + f" | {float(final.mean()):.3f} | {fg:.3f} | {upd:.2f} | "
              f"{rs[0]['memory'] / 1e3:.0f} |")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
