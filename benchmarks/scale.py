"""Posthoc Laplace at scale: ResNet-18 (11.2M), narrow ResNet-18 (0.7M), a small ViT (2.7M)
and a 1000-class last layer, as ratios to one gradient pass over the same data (issue 15).

Every row runs in a fresh process (``--row``), which first times one gradient pass (forward +
backward of the summed cross-entropy over the row's data, batches of ``--batch``) and then
the operation, so each ratio is taken in one process under the same load; ``peak MB`` is the
process's peak resident memory (``getrusage``; imports, model and data included), ``rise
MB`` the increase during the timed call. Inputs are random 32x32 RGB images with random
labels (no download); the 1000-class workload is a linear head on random 512-d features.

Rows: ``fit-<structure>`` (``kfac``, ``kfac-reduce``, ``diag``, ``ekfac``, ``full-ll`` =
last-layer full GGN), ``marglik`` (100 per-layer evidence steps on the K-FAC posterior),
``predict-<n>`` (GLM predictive, probit, at ``n`` test points; its ratio is to a gradient
pass over those ``n`` points), ``fit-kfac@<N>`` (scaling in the number of data points), and
the peers ``laplace-torch`` (kron), ``curvlinops`` (KFAC), ``backpack`` (KFAC), whose
refusals are reported as rows.

    OMP_NUM_THREADS=2 python benchmarks/scale.py [--workloads resnet18-narrow,vit]
        [--rows fit-kfac,predict-256] [--n 256] [--device cpu|cuda] [--quick]
        [--dtype float32|bfloat16|float16] [--internal float64|float32]

``--dtype`` casts the model and data; ``--internal float32`` replaces the float64 internal
algebra of float32/bf16/fp16 models by float32 (:data:`bayescurv.linalg.base.WIDE`), to
measure what float64 costs on a device. With either option the fit rows also report
``err``: the relative error of the log evidence (prior precision 1) against the same fit of
the float64 model, computed after the timing. ``benchmarks/gpu_check.sh`` runs the GPU set.
Every row first pays once for imports that the first ``torch.autograd.grad`` call with
explicit output gradients triggers (``torch.fx.experimental.symbolic_shapes``, about 2 s on
the benchmark machine), as the marglik row pays ``torch.optim``'s.

``--quick`` shrinks every network and the data so that the whole table runs in seconds (used
by the test suite); its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

# keep this folder off the path so that `import laplace` finds laplace-torch
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

WORKLOADS = ("resnet18", "resnet18-narrow", "vit", "head1000")
ROWS = ("fit-kfac", "fit-kfac-reduce", "fit-diag", "fit-ekfac", "fit-full-ll", "marglik",
        "predict-64", "predict-256", "predict-1024", "laplace-torch", "curvlinops", "backpack")
SCALING = ("fit-kfac@512", "fit-kfac@1024", "fit-kfac@2048", "fit-kfac@4096")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def workload(name: str, n: int, quick: bool, device: str, dtype: str = "float32"):
    """``(model, loader, x_test)`` seeded identically in every process."""

    from bayescurv import zoo

    torch.manual_seed(0)
    size = 8 if quick else 32
    if name == "head1000":
        model = nn.Sequential(nn.Linear(16 if quick else 512, 50 if quick else 1000))
        x = torch.randn(n + 1024, model[0].in_features)
    else:
        if name == "resnet18":
            model = zoo.resnet18(4 if quick else 64)
        elif name == "resnet18-narrow":
            model = zoo.resnet18(2 if quick else 16)
        elif name == "vit":
            model = (zoo.vit(dim=8, depth=1, heads=2, mlp=16, image=size, patch=4) if quick
                     else zoo.vit())
        else:
            raise SystemExit(f"unknown workload {name!r}; use one of {WORKLOADS}")
        x = torch.randn(n + 1024, 3, size, size)
    c = model(x[:2]).shape[-1]
    y = torch.randint(0, c, (n,))
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    x = x.to(device=device, dtype=DTYPES[dtype])
    return model, (x[:n], y.to(device)), x[n:]


def loader_of(data, batch: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*data), batch_size=batch)


def gradient_pass(model: nn.Module, loader) -> None:
    loss = nn.CrossEntropyLoss(reduction="sum")
    model.zero_grad()
    for x, y in loader:
        loss(model(x), y).backward()
    model.zero_grad()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, device: str) -> tuple[float, float]:
    before = _peak_mb(device)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, _peak_mb(device) - before


def run_row(name: str, row: str, args) -> dict:
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (autograd.grad's lazy import)

    from bayescurv import Laplace
    from bayescurv.linalg import base

    base.WIDE = DTYPES[args.internal]
    n = int(row.split("@")[1]) if "@" in row else args.n
    model, data, x_test = workload(name, n, args.quick, args.device, args.dtype)
    loader = loader_of(data, args.batch)
    if row.startswith("predict-"):
        k = int(row.split("-")[1])
        k = min(k, 64) if args.quick else k
        ref_loader = loader_of((x_test[:k], torch.zeros(k, dtype=torch.long,
                                                       device=args.device)), args.batch)
    else:
        ref_loader = loader
    gradient_pass(model, ref_loader)  # warm-up
    grad_s, _ = timed(lambda: gradient_pass(model, ref_loader), args.device)
    out: dict = {"grad_s": grad_s}
    structure = {"fit-kfac": "kfac", "fit-kfac-reduce": "kfac-reduce", "fit-diag": "diag",
                 "fit-ekfac": "ekfac", "fit-full-ll": "full"}.get(row.split("@")[0])
    try:
        if structure is not None:
            subset = "last_layer" if row == "fit-full-ll" else "all"
            la = Laplace(model, "classification", subset=subset, structure=structure)
            s, rise = timed(lambda: la.fit(loader, progress=False), args.device)
        elif row == "marglik":
            la = Laplace(model, "classification", structure="kfac").fit(loader, progress=False)
            la.log_marginal_likelihood()  # decompose once, outside the timing
            torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch.optim's import
            s, rise = timed(lambda: la.optimize_prior_precision(granularity="layer",
                                                                 n_steps=100), args.device)
        elif row.startswith("predict-"):
            la = Laplace(model, "classification", structure="kfac").fit(loader, progress=False)
            la.log_marginal_likelihood()
            xs = x_test[:k]
            s, rise = timed(lambda: [la.predict(xs[i:i + args.batch])
                                     for i in range(0, k, args.batch)], args.device)
        else:
            s, rise = run_peer(row, model, loader)
    except Exception as err:  # a refusal or a crash is a result of the benchmark
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        if not args.quick and os.environ.get("SCALE_TRACE"):
            traceback.print_exc()
        return {**out, "error": msg}
    out.update(seconds=s, ratio=s / grad_s, rise_mb=rise, peak_mb=_peak_mb(args.device))
    if structure is not None and (args.dtype != "float32" or args.internal != "float64"):
        out["err"] = evidence_error(la, name, n, args, subset)
    return out


def evidence_error(la, name: str, n: int, args, subset: str) -> float:
    """Relative error of ``la``'s log evidence at prior precision 1 against the same fit of
    the float64 model on the same data (float64 internals)."""
    from bayescurv import Laplace
    from bayescurv.linalg import base

    base.WIDE = torch.float64
    model, data, _ = workload(name, n, args.quick, args.device, "float64")
    ref = Laplace(model, "classification", subset=subset, structure=la.structure)
    ref.fit(loader_of(data, args.batch), progress=False)
    one = torch.tensor(1.0, dtype=torch.float64, device=args.device)
    e64 = float(ref.log_marginal_likelihood(one))
    e = float(la.log_marginal_likelihood(one.to(la.internal_dtype)))
    return abs(e - e64) / abs(e64)


def run_peer(row: str, model: nn.Module, loader) -> tuple[float, float]:
    warnings.filterwarnings("ignore")
    if row == "laplace-torch":
        import laplace

        la = laplace.Laplace(model, "classification", subset_of_weights="all",
                             hessian_structure="kron")
        return timed(lambda: la.fit(loader), "cpu")
    if row == "curvlinops":
        from curvlinops import KFACLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        return timed(lambda: KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"),
                                                params, loader, check_deterministic=False),
                     "cpu")
    if row == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import KFAC

        emodel = extend(model, use_converter=True)
        loss = extend(nn.CrossEntropyLoss(reduction="sum"))

        def fit() -> None:
            for x, y in loader:
                with backpack(KFAC()):
                    loss(emodel(x), y).backward()

        return timed(fit, "cpu")
    raise SystemExit(f"unknown row {row!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rows", default=",".join(ROWS + SCALING))
    parser.add_argument("--n", type=int, default=256, help="training points per fit")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16",
                                                                 "float16"))
    parser.add_argument("--internal", default="float64", choices=("float64", "float32"),
                        help="internal dtype of float32/bf16/fp16 models (measurement only)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    args = parser.parse_args()
    if args.row:  # child process
        name, row = args.row.split(":", 1)
        print(json.dumps(run_row(name, row, args)))
        return
    rows = args.rows.split(",")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# scale benchmark: n={args.n} batch={args.batch} device={args.device} ({card}) "
          f"dtype={args.dtype} internal={args.internal} threads={torch.get_num_threads()} "
          f"quick={args.quick}")
    print(f"{'workload':17s} {'row':17s} {'seconds':>9s} {'x grad':>8s} {'rise MB':>8s} "
          f"{'peak MB':>8s}  note")
    for name in args.workloads.split(","):
        for row in rows:
            if row.startswith("fit-kfac@") and name != "resnet18-narrow":
                continue  # scaling in N on one workload
            cmd = [sys.executable, __file__, "--row", f"{name}:{row}", "--n", str(args.n),
                   "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
                   "--internal", args.internal]
            if args.quick:
                cmd.append("--quick")
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = (res.stdout.strip().splitlines() or [""])[-1]
                r = json.loads(line) if line.startswith("{") else {
                    "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:160]}
            except subprocess.TimeoutExpired:
                r = {"error": f"did not finish in {args.timeout:.0f} s"}
            if "error" in r:
                print(f"{name:17s} {row:17s} {'—':>9s} {'—':>8s} {'—':>8s} {'—':>8s}  "
                      f"{r['error']}", flush=True)
            else:
                print(f"{name:17s} {row:17s} {r['seconds']:9.3f} {r['ratio']:8.2f} "
                      f"{r['rise_mb']:8.0f} {r['peak_mb']:8.0f}  grad pass "
                      f"{r['grad_s']:.3f} s"
                      + (f", err {r['err']:.1e}" if "err" in r else ""), flush=True)


if __name__ == "__main__":
    main()
