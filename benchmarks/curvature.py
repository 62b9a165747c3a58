"""Curvature engine benchmark: cost of each curvature as a ratio to one gradient pass.

Reference workload (issue 3): MLP 784-512-512-10 (670k parameters), softmax likelihood,
N = 2048 random inputs in chunks of 256, CPU, 2 threads. Every row runs in a fresh
subprocess that builds the same model and data, times the row and a forward+backward
gradient pass over the same data interleaved (best of at least ``--repeats`` rounds, more
for short rows), and reports its peak
resident memory (``getrusage`` maxrss: the whole process, imports included) and the rise of
the peak over the state after setup. Ratios are row time / gradient-pass time of the same
process (wall clock, and process CPU time, which other load on a shared machine disturbs
less). The K-FAC rows time the data pass that yields the Kronecker factors (what
curvlinops' ``compute_kronecker_factors`` does); ``compute()`` adds one eigendecomposition
per factor, independent of N, shown in its own row. curvlinops 3.0.1 and BackPACK 1.7.1
run side by side when importable.

A second table shows how K-FAC reduce scales against expand with the weight-sharing length
``T`` (a Linear layer over a sequence, mean pooling before the output layer).

    OMP_NUM_THREADS=2 python benchmarks/curvature.py [--repeats 3] [--rows a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

N, CHUNK, THREADS = 2048, 256, 2
SEQ_WIDTH, SEQ_N, SEQ_CHUNK = 256, 512, 128

# name -> (label, library, target ratio or None)
ROWS: dict[str, tuple[str, str, float | None]] = {
    "kfac": ("K-FAC exact GGN (type-2) factors", "bayescurv", 8.0),
    "kfac_mc": ("K-FAC MC (1 sample) factors", "bayescurv", 2.0),
    "diag": ("diag exact GGN", "bayescurv", 8.0),
    "ggnvp": ("GGN-vector product", "bayescurv", 3.0),
    "kfac_compute": ("K-FAC exact + eigh (compute())", "bayescurv", None),
    "hesscale": ("diag HesScale (approximate)", "bayescurv", None),
    "ekfac": ("EKFAC exact GGN (2 passes+eigh)", "bayescurv", None),
    "diag_mc": ("diag MC (1 sample)", "bayescurv", None),
    "cl_kfac": ("K-FAC exact GGN (type-2) factors", "curvlinops", None),
    "cl_kfac_mc": ("K-FAC MC (1 sample) factors", "curvlinops", None),
    "cl_ggnvp": ("GGN-vector product", "curvlinops", None),
    "bp_diag": ("diag exact GGN (DiagGGNExact)", "backpack", None),
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def _seq_model(width: int) -> nn.Module:
    """Linear over a sequence (weight sharing over ``T``), mean pooling, output layer."""

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(1)

    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), Pool(),
                         nn.Linear(width, 10))


def _workload(seq_len: int | None):
    torch.manual_seed(0)
    if seq_len is None:
        model, x = _mlp(), torch.randn(N, 784)
        n, chunk = N, CHUNK
    else:
        model, n, chunk = _seq_model(SEQ_WIDTH), SEQ_N, SEQ_CHUNK
        x = torch.randn(n, seq_len, SEQ_WIDTH)
    y = torch.randint(0, 10, (n,))
    data = [(x[i : i + chunk], y[i : i + chunk]) for i in range(0, n, chunk)]
    return model.eval(), data


def _grad_pass(model: nn.Module, data) -> Callable[[], None]:
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def run() -> None:
        model.zero_grad()
        for x, y in data:
            loss_fn(model(x), y).backward()

    return run


def _row_fn(row: str, model: nn.Module, data) -> Callable[[], object]:
    from bayescurv.curvature import compute

    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    if row in ("kfac", "kfac_mc", "expand", "reduce"):
        # the one data pass that yields the Kronecker factors (what curvlinops'
        # compute_kronecker_factors does); compute() adds one eigh per factor on top
        from bayescurv.curvature.accumulate import KFACAccumulator
        from bayescurv.curvature.engine import HookCapture, stream
        from bayescurv.likelihoods import get_likelihood
        from bayescurv.params import select

        pset, lik = select(model), get_likelihood("classification")
        kind = "mc" if row == "kfac_mc" else "ggn"

        def run_factors() -> KFACAccumulator:
            cap = HookCapture(pset, "kfac")
            acc = KFACAccumulator(cap, "reduce" if row == "reduce" else "expand")
            for res in stream(cap, lik, data, kind=kind, generator=gen):
                acc.update(res.records)
            return acc

        return run_factors
    if row in ("kfac_compute", "diag", "ekfac", "diag_mc", "hesscale"):
        structure = {"kfac_compute": "kfac", "diag": "diag", "ekfac": "ekfac",
                     "diag_mc": "diag", "hesscale": "diag-hesscale"}[row]
        kind = "mc" if row.endswith("_mc") else "ggn"
        return lambda: compute(model, "classification", data, structure=structure, kind=kind,
                               generator=gen)
    v = torch.randn(sum(p.numel() for p in params))
    if row == "ggnvp":
        from bayescurv.curvature.matfree import CurvatureLinearOperator

        op = CurvatureLinearOperator(model, "classification", data)
        return lambda: op.matvec(v)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    if row in ("cl_kfac", "cl_kfac_mc"):
        from curvlinops import KFACLinearOperator

        fisher = "type-2" if row == "cl_kfac" else "mc"

        def run_cl() -> None:
            op = KFACLinearOperator(model, loss_fn, params, data, fisher_type=fisher,
                                    check_deterministic=False, num_data=N)
            op.compute_kronecker_factors()

        return run_cl
    if row == "cl_ggnvp":
        from curvlinops import GGNLinearOperator

        op = GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False,
                               num_data=N)
        return lambda: op @ v
    if row == "bp_diag":
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        bmodel, bloss = extend(model), extend(nn.CrossEntropyLoss(reduction="sum"))

        def run_bp() -> None:
            for x, y in data:
                with backpack(DiagGGNExact()):
                    bloss(bmodel(x), y).backward()

        return run_bp
    raise KeyError(row)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(row: str, repeats: int, seq_len: int | None) -> dict:
    """Time one row and the gradient pass in this (fresh) process."""
    torch.set_num_threads(THREADS)
    model, data = _workload(seq_len)
    grad = _grad_pass(model, data)
    try:
        fn = _row_fn(row, model, data)
    except ImportError as err:
        return {"row": row, "skipped": f"{type(err).__name__}: {err}"}
    grad()  # warm up allocator and kernels
    setup_mb = _maxrss_mb()
    t_row = t_grad = c_row = c_grad = float("inf")
    start, done = time.perf_counter(), 0
    # at least `repeats` rounds; short rows repeat for ~3 s so that their minimum is stable
    while done < repeats or (time.perf_counter() - start < 3.0 and done < 30):
        done += 1
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t_row, c_row = min(t_row, time.perf_counter() - t0), min(c_row, time.process_time() - c0)
        row_mb = _maxrss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        grad()
        t_grad = min(t_grad, time.perf_counter() - t0)
        c_grad = min(c_grad, time.process_time() - c0)
    return {"row": row, "t_row": t_row, "t_grad": t_grad, "c_row": c_row, "c_grad": c_grad,
            "peak_mb": row_mb, "rise_mb": row_mb - setup_mb}


def _run_child(row: str, repeats: int, seq_len: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", row, "--repeats", str(repeats)]
    if seq_len is not None:
        cmd += ["--seq-len", str(seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"row": row, "skipped": out.stderr.strip().splitlines()[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seq-lens", default="1,4,16,64")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.seq_len)))
        return

    print(f"MLP 784-512-512-10, N={N} in chunks of {CHUNK}, {THREADS} threads, "
          f"torch {torch.__version__}; best of {args.repeats}; ratio = wall time / gradient "
          "pass of the same process; cpu ratio = the same in process CPU time (less disturbed "
          "by other load on a shared machine)")
    head = (f"{'curvature':32s} {'library':11s} {'time s':>7s} {'grad s':>7s} {'ratio':>6s} "
            f"{'cpu ratio':>9s} {'target':>10s} {'peak MB':>8s} {'rise MB':>8s}")
    print(head)
    print("-" * len(head))
    t_start = time.perf_counter()
    for row in args.rows.split(","):
        label, lib, target = ROWS[row]
        r = _run_child(row, args.repeats, None)
        if "skipped" in r:
            print(f"{label:32s} {lib:11s} skipped ({r['skipped']})")
            continue
        ratio = r["t_row"] / r["t_grad"]
        cpu = r["c_row"] / r["c_grad"]
        tgt = "" if target is None else f"<={target:g}x" + (" ok" if ratio <= target else " X")
        print(f"{label:32s} {lib:11s} {r['t_row']:7.3f} {r['t_grad']:7.3f} {ratio:6.2f} "
              f"{cpu:9.2f} {tgt:>10s} {r['peak_mb']:8.0f} {r['rise_mb']:8.0f}", flush=True)

    if args.seq_lens:
        print()
        w = SEQ_WIDTH
        print(f"K-FAC (exact GGN) reduce vs expand with weight-sharing length T: "
              f"Linear({w},{w}) x2 over (B, T, {w}), mean pool, Linear({w},10); N={SEQ_N} in "
              f"chunks of {SEQ_CHUNK}; factor pass only; ratios in CPU time")
        head = (f"{'T':>4s} {'grad s':>7s} {'expand s':>9s} {'ratio':>6s} {'peak MB':>8s} "
                f"{'reduce s':>9s} {'ratio':>6s} {'peak MB':>8s} {'reduce/expand':>14s}")
        print(head)
        print("-" * len(head))
        for t in (int(s) for s in args.seq_lens.split(",")):
            e = _run_child("expand", args.repeats, t)
            r = _run_child("reduce", args.repeats, t)
            g = min(e["t_grad"], r["t_grad"])
            re_, rr = e["c_row"] / e["c_grad"], r["c_row"] / r["c_grad"]  # CPU-time ratios
            print(f"{t:4d} {g:7.3f} {e['t_row']:9.3f} {re_:6.2f} {e['peak_mb']:8.0f} "
                  f"{r['t_row']:9.3f} {rr:6.2f} {r['peak_mb']:8.0f} "
                  f"{r['c_row'] / e['c_row']:14.2f}", flush=True)
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
