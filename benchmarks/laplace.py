"""Laplace benchmark: bayescurv beside laplace-torch 0.3, in one run.

Workload (issue 4): MLP 784-512-512-10 with ReLU, softmax likelihood, fitted on N = 2048
random inputs with random labels in chunks of 256, CPU, 2 threads. The MLP has no biases
(668,672 parameters): for K-FAC with biases the two libraries define different matrices
(ours keeps the weight-bias cross terms, see docs/reference_checks.md), without biases the
definitions coincide, so the results can be checked against each other.

Sections:

(a) GLM predictive (``predict``, probit) at 256 test points, all-weights K-FAC. laplace-torch
    forms (batch x classes x params) Jacobians; at 256 points that needs ~20 GB, more than
    this machine can spare, so it runs at 32 and 64 points and its figures at 256 are
    extrapolated linearly from those two (marked ``~``). The functional covariances
    ``J Σ Jᵀ`` of both are compared on the first 32 points.
(b) 100 steps of per-layer prior-precision optimization (Adam, lr 0.1) on all-weights K-FAC;
    laplace-torch's ``optimize_prior_precision(prior_structure="layerwise")`` beside it. The
    one-time import torch.optim does on the first optimizer (torch._dynamo) is paid before
    timing and shown separately.
(c) Full GGN posterior on MLPs 8-h-3 (tanh, with biases) of P ≈ 1k, 2k, 4k parameters,
    N = 256: time per marglik step for ours (scalar prior: one eigendecomposition, then
    O(P) per step; per-layer prior: a Cholesky per step) and laplace-torch (a dense log
    determinant per step), with the growth exponent ``log(t_4k / t_1k) / log(4)``.
(d) ``fit`` of every structure as a ratio to one gradient pass (forward + backward of the
    summed cross-entropy over the same 2048 points) measured in the same process, beside
    laplace-torch's fits. ``full`` is on the last layer (the all-weights GGN has 4.5e11
    entries). The low-rank structures are computed matrix-free (``rank=10,
    lowrank_method="randomized"``; the default ``"sqrt"`` route forms (C·B, P) per-sample
    gradients per batch, 6.8 GB for chunks of 256 here, and is meant for small batches).

Every row runs in a fresh subprocess; ``peak MB`` is that process's peak resident memory
(``getrusage`` maxrss: imports, model and data included), ``rise MB`` the increase of the
peak during the timed calls. Times are the best of ``--repeats`` (wall clock; ``cpu``: process
CPU time, less disturbed by other load on a shared machine); in (d) fits and gradient passes
alternate so that both see the same load.

    OMP_NUM_THREADS=2 python benchmarks/laplace.py [--repeats 2] [--sections a,b,c,d]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# this file is benchmarks/laplace.py: keep its folder off the path so `import laplace` finds
# laplace-torch, not this script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

N, CHUNK, THREADS, CLASSES = 2048, 256, 2, 10
N_TEST, LT_TEST = 256, (32, 64)
SIZES = {1023: 85, 2043: 170, 4095: 341}  # P -> hidden width of the 8-h-3 MLP (P = 12h + 3)
SMALL_N = 256
OURS_STRUCTURES = ("diag", "kfac", "kfac-reduce", "ekfac", "diag-hesscale", "full-ll",
                   "lowrank", "diag+lowrank")
LT_STRUCTURES = {"kron": "curvlinops", "diag": "BackPACK", "full-ll": "curvlinops"}


# ----------------------------------------------------------------------------------------
# workloads (identical in every process: seeded)
# ----------------------------------------------------------------------------------------
def big_workload() -> tuple[nn.Module, DataLoader, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512, bias=False), nn.ReLU(),
                          nn.Linear(512, 512, bias=False), nn.ReLU(),
                          nn.Linear(512, CLASSES, bias=False)).eval()
    x = torch.randn(N, 784)
    y = torch.randint(0, CLASSES, (N,))
    x_test = torch.randn(N_TEST, 784)
    return model, DataLoader(TensorDataset(x, y), batch_size=CHUNK), x_test


def small_workload(p: int) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    h = SIZES[p]
    model = nn.Sequential(nn.Linear(8, h), nn.Tanh(), nn.Linear(h, 3)).eval()
    x = torch.randn(SMALL_N, 8)
    y = torch.randint(0, 3, (SMALL_N,))
    return model, DataLoader(TensorDataset(x, y), batch_size=SMALL_N)


def grad_pass(model: nn.Module, loader: DataLoader) -> Callable[[], None]:
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def run() -> None:
        model.zero_grad()
        for x, y in loader:
            loss_fn(model(x), y).backward()
        model.zero_grad()

    return run


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, float, float, object]:
    """Best wall and CPU time over ``repeats`` calls, the peak-memory rise, the last result."""
    before = _maxrss_mb()
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, _maxrss_mb() - before, out


def _lt():
    warnings.filterwarnings("ignore")
    import laplace

    return laplace


def _warm_optimizer() -> float:
    """torch.optim imports torch._dynamo on the first optimizer: pay it, return seconds."""
    t0 = time.perf_counter()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------
# rows (each runs in a fresh process)
# ----------------------------------------------------------------------------------------
def row_predict(lib: str, n_test: int, out_dir: Path, repeats: int) -> dict:
    from bayescurv import Laplace

    model, loader, x_test = big_workload()
    x = x_test[:n_test]
    if lib == "ours":
        la = Laplace(model, "classification", structure="kfac").fit(loader, progress=False)
        wall, cpu, rise, _ = timed(lambda: la.predict(x, link="probit"), repeats)
        mean, cov = la.functional(x_test[:LT_TEST[0]])
    else:
        lt = _lt()
        la = lt.Laplace(model, "classification", subset_of_weights="all",
                        hessian_structure="kron")
        la.fit(loader)
        wall, cpu, rise, _ = timed(lambda: la(x, pred_type="glm", link_approx="probit"))
        mean = cov = None
        if n_test == LT_TEST[0]:
            mean, cov = la._glm_predictive_distribution(x)
    if cov is not None:
        torch.save({"mean": mean, "cov": cov}, out_dir / f"pred_{lib}.pt")
    return {"wall": wall, "cpu": cpu, "rise_mb": rise, "peak_mb": _maxrss_mb()}


def row_optimize(lib: str, out_dir: Path, repeats: int, steps: int = 100) -> dict:
    from bayescurv import Laplace

    model, loader, _ = big_workload()
    dynamo_s = _warm_optimizer()
    if lib == "ours":
        la = Laplace(model, "classification", structure="kfac").fit(loader, progress=False)

        def run() -> torch.Tensor:
            la.prior_precision = 1.0  # start every repeat from the same prior
            return la.optimize_prior_precision(granularity="layer", n_steps=steps)
    else:
        lt = _lt()
        la = lt.Laplace(model, "classification", subset_of_weights="all",
                        hessian_structure="kron")
        la.fit(loader)

        def run() -> torch.Tensor:
            la.optimize_prior_precision(method="marglik", n_steps=steps,
                                        init_prior_prec=1.0, prior_structure="layerwise")
            return la.prior_precision

    wall, cpu, rise, prior = timed(run, repeats)
    lml = float(la.log_marginal_likelihood())
    prior = prior.detach().reshape(-1)
    return {"wall": wall, "cpu": cpu, "rise_mb": rise, "peak_mb": _maxrss_mb(),
            "dynamo_s": dynamo_s, "prior": prior.tolist(), "lml": lml}


def row_marglik_steps(lib: str, p: int) -> dict:
    """Seconds per marglik step of a full-GGN posterior with ``p`` parameters (the best of
    a few repeats of ``steps`` steps, after a first step that pays one-time setup)."""
    from bayescurv import Laplace

    model, loader = small_workload(p)
    _warm_optimizer()
    if lib.startswith("ours"):
        granularity = "scalar" if lib == "ours-scalar" else "layer"
        steps, repeats = (50, 3) if granularity == "scalar" else (4, 2)
        la = Laplace(model, "classification", structure="full").fit(loader, progress=False)
        first, _, _, _ = timed(lambda: la.optimize_prior_precision(granularity=granularity,
                                                                   n_steps=1))

        def run() -> None:
            la.prior_precision = 1.0
            la.optimize_prior_precision(granularity=granularity, n_steps=steps)
    else:
        lt = _lt()
        steps, repeats = 3, 2
        la = lt.Laplace(model, "classification", subset_of_weights="all",
                        hessian_structure="full")
        la.fit(loader)
        first, _, _, _ = timed(lambda: la.optimize_prior_precision(n_steps=1))

        def run() -> None:
            la.optimize_prior_precision(n_steps=steps)

    wall, cpu, rise, _ = timed(run, repeats)
    return {"first": first, "wall": wall / steps, "cpu": cpu / steps, "rise_mb": rise,
            "peak_mb": _maxrss_mb()}


def row_fit(lib: str, structure: str, repeats: int) -> dict:
    """Fit time of one structure and a gradient pass (timed first), same process."""
    model, loader, _ = big_workload()
    grad = grad_pass(model, loader)
    grad()  # warm up
    g_wall, g_cpu, _, _ = timed(grad, 2)
    if lib == "ours":
        from bayescurv import Laplace

        subset = "last_layer" if structure == "full-ll" else "all"
        st = "full" if structure == "full-ll" else structure
        opts: dict = {}
        if structure in ("lowrank", "diag+lowrank"):
            opts = {"rank": 10, "lowrank_method": "randomized",
                    "generator": torch.Generator().manual_seed(0)}

        def fit() -> object:
            return Laplace(model, "classification", subset=subset, structure=st,
                           **opts).fit(loader, progress=False)
    else:
        lt = _lt()
        from laplace.curvature import BackPackGGN

        kwargs: dict = {"backend": BackPackGGN} if structure == "diag" else {}
        subset = "last_layer" if structure == "full-ll" else "all"
        hs = "full" if structure == "full-ll" else structure

        def fit() -> object:
            la = lt.Laplace(model, "classification", subset_of_weights=subset,
                            hessian_structure=hs, **kwargs)
            la.fit(loader)
            return la

    slow = structure in ("lowrank", "diag+lowrank", "full-ll")
    before = _maxrss_mb()
    wall = cpu = float("inf")
    for _ in range(1 if slow else repeats):  # interleaved with gradient passes
        w, c, _, _ = timed(fit)
        wall, cpu = min(wall, w), min(cpu, c)
        gw, gc, _, _ = timed(grad, 2)
        g_wall, g_cpu = min(g_wall, gw), min(g_cpu, gc)
    return {"wall": wall, "cpu": cpu, "rise_mb": _maxrss_mb() - before,
            "peak_mb": _maxrss_mb(), "grad_wall": g_wall, "grad_cpu": g_cpu}


def child(args: list[str]) -> dict:
    torch.set_num_threads(THREADS)
    kind, rest = args[0], args[1:]
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    out_dir = Path(os.environ["BENCH_DIR"])
    if kind == "predict":
        return row_predict(rest[0], int(rest[1]), out_dir, repeats)
    if kind == "optimize":
        return row_optimize(rest[0], out_dir, repeats)
    if kind == "marglik":
        return row_marglik_steps(rest[0], int(rest[1]))
    if kind == "fit":
        return row_fit(rest[0], rest[1], repeats)
    raise KeyError(kind)


def run_child(*args: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        lines = (out.stderr.strip() or f"exit {out.returncode}").splitlines()
        return {"error": lines[-1][:90]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _line(label: str, lib: str, r: dict, extra: str = "") -> str:
    if "error" in r:
        return f"{label:44s} {lib:13s} failed: {r['error']}"
    return (f"{label:44s} {lib:13s} {r['wall']:9.3f} {r['cpu']:9.3f} {r['peak_mb']:8.0f} "
            f"{r['rise_mb']:8.0f}  {extra}")


HEAD = (f"{'row':44s} {'library':13s} {'wall s':>9s} {'cpu s':>9s} {'peak MB':>8s} "
        f"{'rise MB':>8s}  notes")


def section_a(env: dict, out_dir: Path) -> None:
    print(f"\n(a) GLM predictive (probit), all-weights K-FAC, {N_TEST} test points")
    print(HEAD)
    print("-" * len(HEAD))
    ours = run_child("predict", "ours", str(N_TEST), env=env)
    print(_line(f"predict, {N_TEST} points", "bayescurv", ours), flush=True)
    lts = {n: run_child("predict", "lt", str(n), env=env) for n in LT_TEST}
    for n, r in lts.items():
        print(_line(f"predict, {n} points", "laplace-torch", r), flush=True)
    if any("error" in r for r in lts.values()) or "error" in ours:
        return
    (n1, r1), (n2, r2) = lts.items()
    est = {}
    for key in ("wall", "cpu", "peak_mb"):
        slope = (r2[key] - r1[key]) / (n2 - n1)
        est[key] = r2[key] + slope * (N_TEST - n2)
    print(f"{'predict, 256 points (extrapolated)':44s} {'laplace-torch':13s} "
          f"{'~' + format(est['wall'], '.1f'):>9s} {'~' + format(est['cpu'], '.1f'):>9s} "
          f"{'~' + format(est['peak_mb'], '.0f'):>8s}")
    a = torch.load(out_dir / "pred_ours.pt")
    b = torch.load(out_dir / "pred_lt.pt")
    print(f"speed-up at {N_TEST} points (extrapolated laplace-torch / ours): "
          f"wall {est['wall'] / ours['wall']:.0f}x, cpu {est['cpu'] / ours['cpu']:.0f}x; "
          f"measured at {n1} points laplace-torch needs {r1['wall'] / ours['wall']:.0f}x "
          f"the wall time ours needs for {N_TEST}")
    print(f"agreement on the first {n1} points: relative error of J Σ Jᵀ "
          f"{_rel(a['cov'], b['cov']):.1e}, of the mean {_rel(a['mean'], b['mean']):.1e}")


def section_b(env: dict, out_dir: Path) -> None:
    print("\n(b) 100 steps of per-layer prior-precision optimization, all-weights K-FAC")
    print(HEAD)
    print("-" * len(HEAD))
    res = {}
    for lib, name in (("ours", "bayescurv"), ("lt", "laplace-torch")):
        r = run_child("optimize", lib, env=env)
        res[lib] = r
        extra = "" if "error" in r else (f"log ML {r['lml']:.2f}; first torch.optim import "
                                         f"{r['dynamo_s']:.1f} s (untimed)")
        print(_line("optimize_prior_precision, 100 steps", name, r, extra), flush=True)
    if all("error" not in r for r in res.values()):
        a, b = torch.tensor(res["ours"]["prior"]), torch.tensor(res["lt"]["prior"])
        print(f"tuned per-layer priors: ours {[round(v, 3) for v in a.tolist()]}, "
              f"laplace-torch {[round(v, 3) for v in b.tolist()]} (relative difference "
              f"{_rel(a, b):.1e}; ours keeps the best iterate, laplace-torch the last)")


def section_c(env: dict) -> None:
    print(f"\n(c) Full-GGN posterior, time per marglik step vs P (MLP 8-h-3, N={SMALL_N})")
    head = (f"{'library / prior':32s} " + " ".join(f"{'P=' + str(p):>10s}" for p in SIZES)
            + f" {'exponent':>9s} {'first step P=4095':>18s} {'peak MB':>8s}")
    print(head)
    print("-" * len(head))
    for lib, label in (("ours-scalar", "bayescurv, scalar prior"),
                       ("ours-layer", "bayescurv, per-layer prior"),
                       ("lt", "laplace-torch, scalar prior")):
        rs = {p: run_child("marglik", lib, str(p), env=env) for p in SIZES}
        if any("error" in r for r in rs.values()):
            err = next(r["error"] for r in rs.values() if "error" in r)
            print(f"{label:32s} failed: {err}")
            continue
        t = [rs[p]["cpu"] for p in SIZES]
        ps = list(SIZES)
        expo = math.log(t[-1] / t[0]) / math.log(ps[-1] / ps[0])
        print(f"{label:32s} " + " ".join(f"{v * 1e3:8.2f}ms" for v in t)
              + f" {expo:9.2f} {rs[ps[-1]]['first']:17.3f}s {rs[ps[-1]]['peak_mb']:8.0f}",
              flush=True)
    print("(CPU time per step; exponent = log(t_4095 / t_1023) / log(4095 / 1023): 1 is linear, "
          "3 cubic)")


def section_d(env: dict, repeats: int) -> None:
    print(f"\n(d) fit, as a ratio to one gradient pass over the same {N} points (same process)")
    head = (f"{'structure':34s} {'library':26s} {'fit s':>8s} {'grad s':>7s} {'ratio':>7s} "
            f"{'cpu ratio':>9s} {'peak MB':>8s} {'rise MB':>8s}")
    print(head)
    print("-" * len(head))
    labels = {"full-ll": "full (last layer, P=5120)", "lowrank": "lowrank k=10 (randomized)",
              "diag+lowrank": "diag+lowrank k=10 (randomized)"}
    for lib, structures in (("ours", OURS_STRUCTURES), ("lt", tuple(LT_STRUCTURES))):
        for st in structures:
            r = run_child("fit", lib, st, env=env)
            name = "bayescurv" if lib == "ours" else f"laplace-torch ({LT_STRUCTURES[st]})"
            label = labels.get(st, st)
            if "error" in r:
                print(f"{label:34s} {name:26s} failed: {r['error']}", flush=True)
                continue
            gw, gc = r["grad_wall"], r["grad_cpu"]
            print(f"{label:34s} {name:26s} {r['wall']:8.2f} {gw:7.3f} {r['wall'] / gw:7.1f} "
                  f"{r['cpu'] / gc:9.1f} {r['peak_mb']:8.0f} {r['rise_mb']:8.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sections", default="a,b,c,d")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    sections = args.sections.split(",")
    print(f"bayescurv vs laplace-torch 0.3; MLP 784-512-512-10 (ReLU, no biases, "
          f"668,672 parameters), N={N} in chunks of {CHUNK}, {THREADS} threads, "
          f"torch {torch.__version__}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
               "BENCH_DIR": tmp, "BENCH_REPEATS": str(args.repeats)}
        if "a" in sections:
            section_a(env, Path(tmp))
        if "b" in sections:
            section_b(env, Path(tmp))
        if "c" in sections:
            section_c(env)
        if "d" in sections:
            section_d(env, args.repeats)
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
