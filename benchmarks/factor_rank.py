"""Wide layers: the error that truncated Kronecker factors (``factor_rank``) introduce in the
log evidence and in the GLM predictive variances, against the untruncated K-FAC posterior,
and the memory of the stored factors (issue 26, item 3).

Two trained float32 models (curvature and posterior in float64, as always):

- ``mlp``: MLP 256-512-512-10 (ReLU) on scikit-learn's digits, the 8x8 images upsampled
  bilinearly to 16x16 (256 inputs); 1347 training / 450 test digits; 30 epochs of Adam.
  Factors 257/512, 513/512, 513/10 (input with the bias column / output).
- ``bert``: a BERT sequence classifier (``transformers``, random initialisation: hidden 128,
  2 layers, 4 heads, intermediate 512, word vocabulary 1000) trained for a few epochs on the
  ``topic`` task of :mod:`bayescurv.data.text` (sentences of Python's language reference,
  4 classes; 600 training sentences, test on the first ``--n-test``).
  Factors 129/128 (attention, pooler), 129/512 and 513/128 (feed-forward), embeddings
  (diagonal row counts, kept whole) / 128.

For each model: the prior precision (one scalar) is tuned by the evidence on the untruncated
K-FAC posterior and then held fixed; for ``factor_rank`` in ``--ranks`` the same posterior is
refitted with truncated factors. Columns: ``stored MB`` — bytes of the stored factor
eigenbases and eigenvalues of the Kronecker blocks, and of the other (LayerNorm) blocks
(float64); ``estimate MB`` — :func:`bayescurv.curvature.preflight.estimate_bytes` of the
same, computed before any data;
``rel err lml`` — ``|lml_r - lml| / |lml|`` at the same prior, and ``Δ lml`` in nats;
``var err mean / max`` — relative error of the predictive variances
``diag(J Σ Jᵀ)`` over test points and classes; ``var ratio`` — mean of ``var_r / var``
(truncation only adds variance: ratios >= 1); ``NLL`` — test NLL of the probit predictive;
``fit s`` — wall time of ``fit`` (including the truncation's eigendecompositions).

    OMP_NUM_THREADS=1 python benchmarks/factor_rank.py [--models mlp,bert] [--ranks 8,32,128]
        [--n-test 200] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from bayescurv import Laplace
from bayescurv.curvature import preflight
from bayescurv.linalg import Diagonal, KroneckerEigen


def stored_bytes(curv) -> int:
    """Bytes of the stored curvature as :func:`~bayescurv.curvature.preflight.estimate_bytes`
    counts it: per Kronecker block the factor eigenbases (a diagonal factor: its ``n``
    entries) and the eigenvalues of truncated factors; other blocks dense or diagonal."""
    total = 0
    for b in curv.blocks:
        if not isinstance(b, KroneckerEigen):
            total += 8 * (b.size if isinstance(b, Diagonal) else b.size**2)
            continue
        fe = b.factor_eigenvalues
        for i, q in enumerate(b.eigenbases):
            n = b.factor_sizes[i]
            if q is None:
                total += n * 8
                continue
            total += q.numel() * q.element_size()
            if q.shape[1] < n and fe is not None:
                total += fe[i].numel() * fe[i].element_size()
    return total


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
def mlp_setup(quick: bool):
    from bayescurv.data.digits import load_digits_split

    d = load_digits_split(seed=0)

    def up(x):
        return F.interpolate(x.reshape(-1, 1, 8, 8), size=(16, 16), mode="bilinear",
                             align_corners=False).reshape(len(x), -1)

    xtr, xte = up(d.x_train), up(d.x_test)
    torch.manual_seed(0)
    width = 64 if quick else 512
    model = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(3 if quick else 30):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), d.y_train[idx]).backward()
            opt.step()
    model.eval()
    train = [(xtr[i:i + 256], d.y_train[i:i + 256]) for i in range(0, len(xtr), 256)]
    return model, train, xte, d.y_test, {}


def bert_setup(quick: bool, n_test: int):
    import transformers as tf

    from bayescurv.data.text import WordTokenizer, text_task

    task = text_task("topic")
    tok = WordTokenizer([s for s, _ in task.train], vocab_size=1000)
    hidden, inter = (32, 64) if quick else (128, 512)
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=inter,
                        max_position_embeddings=64, num_labels=task.num_classes,
                        pad_token_id=0, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(cfg)
    model.config._attn_implementation = "eager"

    def batches(items, size):
        out = []
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            b = tok.batch([s for s, _ in chunk], max_len=32)
            b["labels"] = torch.tensor([y for _, y in chunk])
            out.append(b)
        return out

    train = batches(task.train, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(1 if quick else 8):
        for b in train:
            opt.zero_grad()
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            F.cross_entropy(out.logits, b["labels"]).backward()
            opt.step()
    model.eval()
    test = task.test[: (16 if quick else n_test)]
    x = tok.batch([s for s, _ in test], max_len=32)
    y = torch.tensor([t for _, t in test])
    return model, batches(task.train, 64), x, y, {"output_key": "logits"}


# ------------------------------------------------------------------------------------------
def run(name: str, ranks: list[int], quick: bool, n_test: int) -> None:
    t0 = time.perf_counter()
    model, train, x, y, opts = (mlp_setup(quick) if name == "mlp"
                                else bert_setup(quick, n_test))
    fit_kw = {"y_key": "labels"} if name == "bert" else {}
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
        logits = out.logits if hasattr(out, "logits") else out
    acc = (logits.argmax(-1) == y).float().mean().item()
    print(f"\n[{name}] trained in {time.perf_counter() - t0:.0f} s, test accuracy {acc:.3f}")

    def fit(r):
        t = time.perf_counter()
        la = Laplace(model, "classification", structure="kfac", factor_rank=r, **opts)
        la.fit(train, **fit_kw)
        la.log_marginal_likelihood()  # the eigendecompositions of untruncated factors
        return la, time.perf_counter() - t

    base, t_base = fit(None)
    base.optimize_prior_precision(n_steps=100)
    prior = base.prior_precision.detach().clone()
    lml0 = base.log_marginal_likelihood().double()

    def predict(la):
        _, cov = la.functional(x)
        var = cov.diagonal(dim1=-2, dim2=-1).double()
        probs = la.predict(x)
        nll = F.nll_loss(probs.double().clamp_min(1e-12).log(), y).item()
        return var, nll

    var0, nll0 = predict(base)
    sizes = sorted({n for b in base.curvature.blocks if isinstance(b, KroneckerEigen)
                    for n in b.factor_sizes}, reverse=True)
    print(f"P = {base.num_params:,}, prior precision {prior.item():.3g}, log evidence "
          f"{lml0.item():.2f}; Kronecker factor sizes {sizes}")
    head = (f"{'factor_rank':>11} | {'stored MB':>10} | {'estimate MB':>11} | "
            f"{'rel err lml':>11} | {'Δ lml':>9} | {'var err mean':>12} | "
            f"{'var err max':>11} | {'var ratio':>9} | {'NLL':>6} | {'fit s':>6}")
    print(head)
    print("-" * len(head))
    est0 = preflight.estimate_bytes(base.params, "kfac")
    print(f"{'none':>11} | {stored_bytes(base.curvature) / 2**20:>10.2f} | "
          f"{est0 / 2**20:>11.2f} | {0:>11.1e} | {0:>9.2f} | {0:>12.1e} | {0:>11.1e} | "
          f"{1:>9.3f} | {nll0:>6.3f} | {t_base:>6.1f}")
    for r in ranks:
        la, t_fit = fit(r)
        la.prior_precision = prior
        lml = la.log_marginal_likelihood().double()
        var, nll = predict(la)
        rel = ((var - var0).abs() / var0)
        est = preflight.estimate_bytes(la.params, "kfac", factor_rank=r)
        print(f"{r:>11} | {stored_bytes(la.curvature) / 2**20:>10.2f} | {est / 2**20:>11.2f} | "
              f"{((lml - lml0).abs() / lml0.abs()).item():>11.1e} | "
              f"{(lml - lml0).item():>9.2f} | {rel.mean().item():>12.1e} | "
              f"{rel.max().item():>11.1e} | {(var / var0).mean().item():>9.3f} | "
              f"{nll:>6.3f} | {t_fit:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,bert")
    ap.add_argument("--ranks", default="8,32,128")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test only")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    for name in args.models.split(","):
        run(name, ranks, args.quick, args.n_test)


if __name__ == "__main__":
    main()
