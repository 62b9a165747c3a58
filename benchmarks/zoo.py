"""Real-size zoo models, random initialisation (issue 26): ResNet-50 (torchvision), ViT-S/16
at 224 (timm), a BERT-base-size and a GPT-2-small-size sequence classifier (transformers),
each of the two transformers also with LoRA adapters (peft, rank 8 on the attention
projections, posterior over the adapters only), as ratios to one gradient pass.

Every row runs in a fresh process, which first times one gradient pass (forward + backward of
the summed cross-entropy over the row's data) and then the operation, so each ratio is taken
in one process under the same load. ``peak MB`` is the process's peak resident memory
(``getrusage``: imports, model and data included, after each operation). Row ``kfac`` prints
three lines from one process: ``fit`` (all-weights K-FAC, or the adapters' for ``+lora``),
``marglik`` (``optimize_prior_precision``, 100 evidence steps, on the fitted posterior; the
tuning alone, including the factors' eigendecompositions) and ``predict`` (GLM predictive,
probit, on ``--n`` test inputs; ratio to a gradient pass over them). Row ``laplace-torch``: its
``Laplace(..., 'all', 'kron')`` fit where it runs (its refusals are reported);
``laplace-torch-asdl`` the same with its ASDL backend (``AsdlGGN``, its route for Hugging Face
models).

    OMP_NUM_THREADS=2 python benchmarks/zoo.py [--models resnet50,vit-s16] [--rows kfac]
        [--n 16] [--seq 64] [--device cpu|cuda] [--quick]

Inputs: random 224x224 RGB images / random token ids of length ``--seq`` (no download).
``--quick`` shrinks every model so that the table runs in seconds (a smoke test only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

MODELS = ("resnet50", "vit-s16", "bert-base", "bert-base+lora", "gpt2-small",
          "gpt2-small+lora")
ROWS = ("kfac", "laplace-torch", "laplace-torch-asdl")
CLASSES = 10


def build(name: str, n: int, seq: int, quick: bool):
    """``(model, batches, x_test, options)`` seeded identically in every process."""
    torch.manual_seed(0)
    base = name.split("+")[0]
    if base in ("resnet50", "vit-s16"):
        size = 32 if quick else 224
        if base == "resnet50":
            import torchvision

            model = (torchvision.models.resnet50(num_classes=CLASSES) if not quick else
                     torchvision.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.1))
        else:
            import timm

            model = timm.create_model("vit_small_patch16_224", num_classes=CLASSES,
                                      img_size=size, **({"depth": 1, "embed_dim": 48,
                                                         "num_heads": 2} if quick else {}))
        x = torch.randn(2 * n, 3, size, size)
        y = torch.randint(0, CLASSES, (2 * n,))
        data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]
        return model.eval(), data, x[n:], {}
    import transformers as tf

    if base == "bert-base":
        cfg = tf.BertConfig(num_labels=CLASSES, **({"num_hidden_layers": 1, "hidden_size": 32,
                                                    "intermediate_size": 64,
                                                    "num_attention_heads": 2,
                                                    "vocab_size": 1000} if quick else {}))
        model = tf.BertForSequenceClassification(cfg)
        targets = ["query", "value"]
    else:
        cfg = tf.GPT2Config(num_labels=CLASSES, pad_token_id=0,
                            **({"n_layer": 1, "n_embd": 32, "n_head": 2,
                                "vocab_size": 1000} if quick else {}))
        model = tf.GPT2ForSequenceClassification(cfg)
        targets = ["c_attn"]
    ids = torch.randint(1, 1000, (2 * n, seq))
    mask = torch.ones_like(ids)
    y = torch.randint(0, CLASSES, (2 * n,))
    data = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": y[i:i + 8]}
            for i in range(0, n, 8)]
    options = {"output_key": "logits", "y_key": "labels"}
    if name.endswith("+lora"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
        options["subset"] = "*lora_*"
    return model.eval(), data, {"input_ids": ids[n:], "attention_mask": mask[n:]}, options


class _DictLogits(torch.nn.Module):
    """A Hugging Face classifier called with the whole dict batch (laplace-torch's way)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits


def _inputs(batch):
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch


def _logits(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def gradient_pass(model, data) -> None:
    for batch in data:
        x, y = _inputs(batch)
        loss = torch.nn.functional.cross_entropy(_logits(model, x), y, reduction="sum")
        loss.backward()
    model.zero_grad(set_to_none=True)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_row(name: str, row: str, args) -> dict:
    from bayescurv import Laplace

    warnings.filterwarnings("ignore")
    model, data, x_test, options = build(name, args.n, args.seq, args.quick)
    grad_s = timed(lambda: gradient_pass(model, data))
    y_key = options.pop("y_key", "y")
    subset = options.pop("subset", "all")
    out = {"model": name, "row": row,
           "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if row.startswith("laplace-torch"):  # "-asdl": its ASDL backend (its route for HF)
        from laplace import Laplace as PeerLaplace
        from laplace.curvature import AsdlGGN

        extra = {"backend": AsdlGGN} if row.endswith("-asdl") else {}
        from torch.utils.data import DataLoader, TensorDataset

        if isinstance(data[0], dict):  # its documented HF route: a dict batch, a wrapper
            rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(len(b["labels"]))]
            loader = DataLoader(rows, batch_size=8)
            net = _DictLogits(model)
            la = PeerLaplace(net, "classification", subset_of_weights="all",
                             hessian_structure="kron", dict_key_x="input_ids",
                             dict_key_y="labels", **extra)
        else:
            x = torch.cat([b[0] for b in data])
            y = torch.cat([b[1] for b in data])
            loader = DataLoader(TensorDataset(x, y), batch_size=8)
            la = PeerLaplace(model, "classification", subset_of_weights="all",
                             hessian_structure="kron", **extra)
        seconds = timed(lambda: la.fit(loader, progress_bar=False))
    else:  # fit, then the evidence tuning and the predictive on that posterior
        la = Laplace(model, "classification", subset=subset, structure="kfac", **options)
        fit_s = timed(lambda: la.fit(data, y_key=y_key, progress=False))
        out["posterior_params"] = la.params.numel
        out["fit_peak_mb"] = _peak_mb()
        out["marglik_s"] = timed(lambda: la.optimize_prior_precision(n_steps=100))
        out["marglik_ratio"] = out["marglik_s"] / grad_s
        out["marglik_peak_mb"] = _peak_mb()
        test_grad_s = timed(lambda: gradient_pass(model, [_pair(x_test, data)]))
        out["predict_s"] = timed(lambda: la.predict(x_test))
        out["predict_ratio"] = out["predict_s"] / test_grad_s
        seconds = fit_s
    out.update(seconds=seconds, ratio=seconds / grad_s, grad_s=grad_s, peak_mb=_peak_mb())
    return out


def _pair(x_test, data):
    """A batch of the test inputs with dummy labels (for the gradient pass they are timed
    against)."""
    if isinstance(x_test, dict):
        n = x_test["input_ids"].shape[0]
        return {**x_test, "labels": torch.zeros(n, dtype=torch.long)}
    return x_test, torch.zeros(x_test.shape[0], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default="kfac,laplace-torch")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        name, row = args.row.split(":")
        try:
            print(json.dumps(run_row(name, row, args)))
        except Exception as err:  # a refusal is a result
            traceback.print_exc(file=sys.stderr)
            print(json.dumps({"model": name, "row": row,
                              "error": f"{type(err).__name__}: {str(err)[:160]}"}))
        return
    print(f"# zoo benchmark: n={args.n}, seq={args.seq}, device={args.device}, "
          f"threads={torch.get_num_threads()}{' (quick)' if args.quick else ''}")
    print(f"{'model':18s} {'row':14s} {'params':>11s} {'seconds':>9s} {'ratio':>8s} "
          f"{'peak MB':>8s}  note")
    base = [sys.executable, __file__, "--n", str(args.n), "--seq", str(args.seq),
            "--device", args.device] + (["--quick"] if args.quick else [])
    for name in args.models.split(","):
        for row in args.rows.split(","):
            proc = subprocess.run(base + ["--row", f"{name}:{row}"], capture_output=True,
                                  text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if not lines:
                why = ("killed (exit -9: the kernel's out-of-memory killer)"
                       if proc.returncode == -9 else
                       f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
                print(f"{name:18s} {row:14s} crashed: {why}")
                continue
            r = json.loads(lines[-1])
            if "error" in r:
                print(f"{name:18s} {row:14s} {'':>11s} {'':>9s} {'':>8s} {'':>8s}  "
                      f"refused: {r['error']}")
                continue
            if row.startswith("laplace-torch"):
                print(f"{name:18s} {row:14s} {r['params']:11,d} {r['seconds']:9.2f} "
                      f"{r['ratio']:8.1f} {r['peak_mb']:8.0f}  x grad pass (its kron fit)",
                      flush=True)
                continue
            post = f"posterior over {r['posterior_params']:,}"
            for op, s_, ratio, peak, what in (
                    ("fit", r["seconds"], r["ratio"], r["fit_peak_mb"], "x grad pass"),
                    ("marglik", r["marglik_s"], r["marglik_ratio"], r["marglik_peak_mb"],
                     "x grad pass (100 steps)"),
                    ("predict", r["predict_s"], r["predict_ratio"], r["peak_mb"],
                     f"x grad pass over the {args.n} test inputs")):
                print(f"{name:18s} {op:14s} {r['params']:11,d} {s_:9.2f} {ratio:8.1f} "
                      f"{peak:8.0f}  {what}; {post}", flush=True)


if __name__ == "__main__":
    main()
