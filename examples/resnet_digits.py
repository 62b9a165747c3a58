"""Post-hoc Laplace on a small ResNet-18 (BatchNorm, residuals) trained on scikit-learn's
digits upscaled to 16x16 (no download): MAP beside last-layer and all-weights K-FAC Laplace,
with calibration (NLL, ECE), out-of-distribution detection (pixel-permuted digits, AUROC of
the max-probability) and the time of each step.

    OMP_NUM_THREADS=2 .venv/bin/python examples/resnet_digits.py [--epochs 8] [--width 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from bayescurv import Laplace, metrics, zoo
from bayescurv.data import load_digits_split, permuted_digits


def images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Flat 8x8 digits as ``(N, 1, size, size)`` images."""
    return F.interpolate(x.reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear",
                         align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    split = load_digits_split(seed=0)
    x_train, x_test = images(split.x_train, args.size), images(split.x_test, args.size)
    x_ood = images(permuted_digits(split.x_test), args.size)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, split.y_train), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(0))
    model = zoo.resnet18(width=args.width, in_channels=1)
    print(f"ResNet-18, width {args.width}: {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; {len(x_train)} training images {args.size}x{args.size}")

    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=5e-4)
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    print(f"MAP training: {time.perf_counter() - t0:.1f} s")

    def row(name: str, predict, seconds: float) -> None:
        with torch.no_grad():
            p_in, p_out = predict(x_test), predict(x_ood)
        auroc = metrics.auroc(-p_in.max(-1).values, -p_out.max(-1).values)
        print(f"{name:24s} {metrics.accuracy(p_in, split.y_test):6.3f} "
              f"{metrics.nll(p_in, split.y_test):6.3f} {metrics.ece(p_in, split.y_test):6.3f} "
              f"{auroc:6.3f} {seconds:8.1f}")

    fit_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, split.y_train), batch_size=128)
    print(f"\n{'':24s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s} {'AUROC':>6s} {'seconds':>8s}")
    row("MAP", lambda x: model(x).softmax(-1), 0.0)
    for subset, granularity in (("last_layer", "scalar"), ("all", "layer")):
        t0 = time.perf_counter()
        la = Laplace(model, "classification", subset=subset, structure="kfac")
        la.fit(fit_loader, progress=False)
        t_fit = time.perf_counter() - t0
        la.optimize_prior_precision(granularity=granularity)
        t_ml = time.perf_counter() - t0 - t_fit
        t1 = time.perf_counter()
        row(f"K-FAC {subset}", la.predict, 0.0)
        t_pred = time.perf_counter() - t1
        print(f"{'':24s} fit {t_fit:.1f} s, prior tuning {t_ml:.1f} s, predict "
              f"({2 * len(x_test)} points) {t_pred:.1f} s")


if __name__ == "__main__":
    main()
