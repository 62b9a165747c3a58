"""Per-pixel uncertainty of a small segmentation network (issue 31), on synthetic shapes.

Images ``12 x 12`` with one disc or square on a noisy background; labels per pixel:
background, disc, square (3 classes). A 3-layer fully convolutional net is trained by MAP,
then ``Laplace(net, "dense-classification", structure="kfac")`` sums the softmax likelihood
over pixels, the prior precision is tuned by the marginal likelihood, and the predictive
gives per-pixel class probabilities (probit, from each pixel's ``C x C`` block of
``J Σ Jᵀ`` over chunks of pixels). The figure shows inputs, labels, the MAP prediction, the
per-pixel predictive entropy and the per-pixel latent variance ``tr(J_s Σ J_sᵀ)`` (the
posterior's own, epistemic, part) and is written to ``docs/segmentation_uncertainty.png``.

``--memory`` instead measures the memory of the per-pixel predictive on a wider net
(64 channels, P = 37,763) at ``32 x 32``: the peak-RSS rise of ``predict`` on 2 images in a
fresh process, beside the size of the whole-output Jacobian ``(B·H·W·C) x P`` a
Jacobian-based predictive would form (float32).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python examples/segmentation_shapes.py [--out PATH]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python examples/segmentation_shapes.py --memory [--chunk K]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from bayescurv import Laplace

SIZE, CLASSES = 12, 3


def shapes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, S, S)`` and labels ``(n, S, S)``: 0 background, 1 disc,
    2 square, centre and radius random; additive noise on the image."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    imgs, labels = [], []
    for _ in range(n):
        cy, cx = torch.randint(3, SIZE - 3, (2,), generator=g).tolist()
        r = int(torch.randint(2, 4, (1,), generator=g))
        kind = int(torch.randint(1, 3, (1,), generator=g))
        if kind == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        lab = torch.zeros(SIZE, SIZE, dtype=torch.long)
        lab[mask] = kind
        img = mask.float() + 0.35 * torch.randn(SIZE, SIZE, generator=g)
        imgs.append(img)
        labels.append(lab)
    return torch.stack(imgs).unsqueeze(1), torch.stack(labels)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, CLASSES, 1))


def memory(size: int = 32, width: int = 64, chunk: int | None = None) -> None:
    """Peak-RSS rise of the per-pixel predictive (``diag`` posterior, MC-Fisher fit)."""
    from bayescurv.laplace import positions

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(width, CLASSES, 1)).eval()
    if chunk is not None:
        positions.POSITIONS_PER_CHUNK = chunk
    x = torch.randn(8, 1, size, size, generator=g)
    y = torch.randint(0, CLASSES, (8, size, size), generator=g)
    la = Laplace(model, "dense-classification", structure="diag", kind="mc").fit([(x, y)])
    xt = x[:2]
    k = positions.POSITIONS_PER_CHUNK
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    probs = la.predict(xt)
    t = time.perf_counter() - t0
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    b, c, s = xt.shape[0], CLASSES, size * size
    jac = b * s * c * la.num_params * 4 / 2**20
    outputs = (2 * width + c) * s  # layer outputs per datum
    bound = k * c * b * outputs * 4 / 2**20
    print(f"P = {la.num_params}, {b} images {size}x{size}, {c} classes, {k} positions per "
          f"chunk: predict {t:.1f} s, peak-RSS rise {rise:.0f} MB; chunk bound "
          f"k·C·B·(layer outputs) = {bound:.0f} MB; whole-output Jacobian {jac:.0f} MB; "
          f"probabilities {tuple(probs.shape)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/segmentation_uncertainty.png")
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--chunk", type=int, default=None, help="positions per chunk (--memory)")
    args = ap.parse_args()
    if args.memory:
        memory(chunk=args.chunk)
        return
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = shapes(args.train, g)
    xt, yt = shapes(4, g)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") / len(x)
        loss.backward()
        opt.step()
    model.eval()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
    t0 = time.perf_counter()
    la = Laplace(model, "dense-classification", structure="kfac").fit(loader)
    t_fit = time.perf_counter() - t0
    la.optimize_prior_precision()
    probs = la.predict(xt)  # (B, C, H, W)
    mean, blocks = la.functional(xt)
    latent_var = torch.diagonal(blocks, dim1=-2, dim2=-1).sum(-1).reshape(-1, SIZE, SIZE)
    with torch.no_grad():
        map_pred = model(xt).argmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    acc = float((probs.argmax(1) == yt).float().mean())
    print(f"P = {la.num_params}, fit {t_fit:.1f} s, prior precision "
          f"{float(la.prior_precision):.3g}, test pixel accuracy {acc:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 5, figsize=(10, 8))
    for i in range(4):
        for j, (img, title, cmap) in enumerate((
                (xt[i, 0], "input", "gray"), (yt[i], "label", "viridis"),
                (map_pred[i], "MAP prediction", "viridis"),
                (entropy[i], "predictive entropy", "magma"),
                (latent_var[i], "latent variance tr(JΣJᵀ)", "magma"))):
            ax = axes[i, j]
            lim = {"vmin": 0, "vmax": CLASSES - 1} if j in (1, 2) else {}
            im = ax.imshow(img.detach(), cmap=cmap, **lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j >= 3:
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Per-pixel uncertainty, Laplace(dense-classification, kfac)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
