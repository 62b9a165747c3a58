"""Influence functions (issue 32): bayescurv's scores against the exact inverse-GGN influence,
against leave-one-out / leave-k-out retraining, and side by side with kronfluence 1.0.1,
measured in one run.

Case: scikit-learn digits (1,347 training images 8x8, 450 test), a CNN
Conv2d(1, 4, 3, padding 1) - ReLU - MaxPool 2 - Linear(64, 10) (690 parameters, the layer
types kronfluence supports), trained in float64 to convergence (L-BFGS) on the summed
cross-entropy plus weight decay ``δ/2 ‖θ‖²`` with ``δ = 1``; every method uses damping ``δ``
(kronfluence, whose curvature is the *mean* Fisher, ``δ / N``; scores are compared by rank).

- ``spearman`` / ``pearson``: the mean over 20 test queries of the Spearman / Pearson
  correlation between a method's scores of the 1,347 training images and the exact
  inverse-GGN influence (``structure="full"``, dense Cholesky); ``top-50``: the fraction of
  the exact 50 most helpful examples among the method's 50 most helpful; ``self``: Spearman
  of the self-influences;
- ``time``: seconds of the whole call (fit of the factors included) divided by one plain
  forward + backward pass over the training set in the same process;
- ``memory``: peak resident memory above the process's state before the call (MiB), each
  method in a forked child;
- retraining: the change of query loss when 30 training images (the 15 with the largest
  exact |score| and 15 at random) are left out one at a time, and 15 random groups of 40,
  retrained from the optimum by L-BFGS; Spearman of predicted (sum of the scores) vs actual.

Measured on a shared 2-core machine (ratios are robust to its load, seconds are not).

    OMP_NUM_THREADS=1 python benchmarks/influence.py [--skip-retraining]
"""

from __future__ import annotations

import argparse
import builtins
import copy
import functools
import logging
import multiprocessing as mp
import resource
import tempfile
import time
import warnings

import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace
from bayescurv.data.digits import load_digits_split
from bayescurv.influence import Influence

DT = torch.float64
WD = 1.0
NUM_QUERIES = 20


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10)).to(DT)


def train(model: nn.Module, x, y, steps: int = 500) -> nn.Module:
    """Minimise Σ CE + WD/2 ‖θ‖² (L-BFGS, strong Wolfe)."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") + 0.5 * WD * sum(
            p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def data():
    d = load_digits_split()
    x, y = d.x_train.to(DT).reshape(-1, 1, 8, 8), d.y_train
    xq, yq = d.x_test.to(DT).reshape(-1, 1, 8, 8)[:NUM_QUERIES], d.y_test[:NUM_QUERIES]
    return x, y, xq, yq


# methods: (model, x, y, xq, yq) -> (pairwise (Q, N), self (N,))
def ours(structure: str, query_rank: int | None = None):
    def run(model, x, y, xq, yq):
        loader = DataLoader(TensorDataset(x, y), batch_size=256)
        la = Laplace(model, "classification", structure=structure,
                     prior_precision=WD).fit(loader)
        inf = Influence(la, query_rank=query_rank)
        return inf.scores([(xq, yq)], loader), inf.self_influence(loader)
    return run


def kronfluence(model, x, y, xq, yq):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            f = model(xb)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    yb = torch.multinomial(torch.softmax(f.detach(), -1), 1).squeeze(-1)
            return nn.functional.cross_entropy(f, yb, reduction="sum")

        def compute_measurement(self, batch, model):
            return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = Classification()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        an = Analyzer("bench", prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                      output_dir=out, log_level=logging.ERROR)
        train_set, query_set = TensorDataset(x, y), TensorDataset(xq, yq)
        an.fit_all_factors("ekfac", train_set, per_device_batch_size=256,
                           factor_args=FactorArguments(strategy="ekfac"))
        args = ScoreArguments(damping_factor=WD / len(y))
        an.compute_pairwise_scores("pair", "ekfac", query_set, train_set,
                                   per_device_query_batch_size=NUM_QUERIES,
                                   per_device_train_batch_size=256, score_args=args)
        an.compute_self_scores("self", "ekfac", train_set, per_device_train_batch_size=256,
                               score_args=args)
        return (an.load_pairwise_scores("pair")["all_modules"],
                an.load_self_scores("self")["all_modules"])


METHODS = {
    "full (exact GGN)": ours("full"),
    "ekfac": ours("ekfac"),
    "ekfac, query rank 1": ours("ekfac", query_rank=1),
    "kfac": ours("kfac"),
    "diag": ours("diag"),
    "kronfluence ekfac": kronfluence,
}


def _child(name, model, args, queue):
    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    pair, self_ = METHODS[name](copy.deepcopy(model), *args)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # numpy arrays: torch tensors would travel as shared-memory handles that die with us
    queue.put((seconds, (peak - base) / 1024, pair.double().numpy(), self_.double().numpy()))


def run_method(name, model, args):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, model, args, queue))
    proc.start()
    seconds, mib, pair, self_ = queue.get()
    proc.join()
    return seconds, mib, torch.from_numpy(pair), torch.from_numpy(self_)


def plain_pass_seconds(model, x, y) -> float:
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    t0 = time.perf_counter()
    for _ in range(3):
        for xb, yb in loader:
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
    return (time.perf_counter() - t0) / 3


def spearman_rows(a, b) -> float:
    return sum(spearmanr(r.numpy(), s.numpy())[0] for r, s in zip(a, b)) / len(a)


def pearson_rows(a, b) -> float:
    return float(sum(torch.corrcoef(torch.stack([r, s]))[0, 1] for r, s in zip(a, b)) / len(a))


def top_overlap(a, b, k: int = 50) -> float:
    """Mean over queries of the fraction of the reference's k most helpful training
    examples among the method's k most helpful."""
    return sum(len(set(r.topk(k).indices.tolist()) & set(s.topk(k).indices.tolist())) / k
               for r, s in zip(a, b)) / len(a)


def retraining(model, x, y, xq, yq, scores: dict[str, torch.Tensor]):
    """Actual vs predicted change of the first query's loss under leave-one-out (30) and
    leave-40-out (15 groups) retraining."""
    g = torch.Generator().manual_seed(0)
    exact = scores["full (exact GGN)"][0]
    n = len(y)
    top = exact.abs().topk(15).indices
    rest = torch.tensor([i for i in torch.randperm(n, generator=g).tolist()
                         if i not in set(top.tolist())][:15])
    singles = [[int(i)] for i in torch.cat([top, rest])]
    groups = [torch.randperm(n, generator=g)[:40].tolist() for _ in range(15)]
    with torch.no_grad():
        base = nn.functional.cross_entropy(model(xq[:1]), yq[:1])

    def actual(removed):
        keep = torch.ones(n, dtype=torch.bool)
        keep[removed] = False
        m = train(copy.deepcopy(model), x[keep], y[keep], steps=200)
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(xq[:1]), yq[:1]) - base)

    out = {}
    for label, sets in (("leave-one-out (30)", singles), ("leave-40-out (15 groups)", groups)):
        act = torch.tensor([actual(s) for s in sets])
        out[label] = {name: spearmanr(torch.stack([s[0, r].sum() for r in sets]).numpy(),
                                      act.numpy())[0]
                      for name, s in scores.items() if "rank" not in name}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-retraining", action="store_true",
                        help="leave out the leave-one-out / leave-k-out retraining (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print = functools.partial(builtins.print, flush=True)  # noqa: A001
    x, y, xq, yq = data()
    model = train(build(), x, y)
    with torch.no_grad():
        acc = (model(xq).argmax(1) == yq).double().mean()
    print(f"digits CNN, {sum(p.numel() for p in model.parameters())} parameters, "
          f"N = {len(y)}, query accuracy {acc:.2f}")
    unit = plain_pass_seconds(model, x, y)
    results = {}
    for name in METHODS:
        try:
            results[name] = run_method(name, model, (x, y, xq, yq))
        except ImportError as err:
            print(f"{name}: skipped ({err})")
    ref_pair, ref_self = results["full (exact GGN)"][2:]
    print(f"\n{'method':24s} {'spearman':>9s} {'pearson':>8s} {'top-50':>7s} {'self':>6s} "
          f"{'time':>7s} {'memory MiB':>11s}")
    for name, (sec, mib, pair, self_) in results.items():
        print(f"{name:24s} {spearman_rows(pair, ref_pair):9.3f} "
              f"{pearson_rows(pair, ref_pair):8.3f} {top_overlap(pair, ref_pair):7.2f} "
              f"{spearmanr(self_.numpy(), ref_self.numpy())[0]:6.3f} {sec / unit:6.0f}x "
              f"{mib:11.1f}")
    if "kronfluence ekfac" in results:
        ours_pair, ours_self = results["ekfac"][2:]
        kf_pair, kf_self = results["kronfluence ekfac"][2:]
        print(f"\nbayescurv ekfac vs kronfluence ekfac: Spearman pairwise "
              f"{spearman_rows(ours_pair, kf_pair):.3f}, Pearson "
              f"{pearson_rows(ours_pair, kf_pair):.3f}, top-50 overlap "
              f"{top_overlap(ours_pair, kf_pair):.2f}, self "
              f"{spearmanr(ours_self.numpy(), kf_self.numpy())[0]:.3f}")
    if args.skip_retraining:
        return
    scores = {name: r[2] for name, r in results.items()}
    print("\nretraining: Spearman of predicted vs actual change of the query loss")
    for label, row in retraining(model, x, y, xq, yq, scores).items():
        print(f"  {label:26s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
