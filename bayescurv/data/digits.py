"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes; shipped with the package, no
download), split into train and test, plus out-of-distribution variants of the images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from bayescurv.errors import InvalidArgumentError, ShapeError

IMAGE_SIDE = 8
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10


@dataclass
class DigitsSplit:
    """Train/test tensors: inputs ``(N, 64)`` in ``[0, 1]``, labels ``(N,)`` (long)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


def load_digits_split(
    test_size: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DigitsSplit:
    """The digits data, pixel intensities divided by 16 (so in ``[0, 1]``), split with a
    stratified, seeded (hence deterministic) ``train_test_split``. Needs scikit-learn."""
    if not 0.0 < test_size < 1.0:
        raise InvalidArgumentError(f"test_size must lie in (0, 1), got {test_size}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return DigitsSplit(
        x_train=x[idx_train].to(device=device, dtype=dtype),
        y_train=y[idx_train].to(device=device),
        x_test=x[idx_test].to(device=device, dtype=dtype),
        y_test=y[idx_test].to(device=device),
    )


def _check_images(x: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != NUM_PIXELS:
        raise ShapeError(f"digits inputs must have shape (N, {NUM_PIXELS}); got {tuple(x.shape)}")


def permuted_digits(x: Tensor, seed: int = 0) -> Tensor:
    """The images with one fixed random pixel permutation (drawn from ``seed``) applied to
    all of them: same pixel statistics per image, no digit structure (an OOD set)."""
    _check_images(x)
    perm = torch.randperm(NUM_PIXELS, generator=torch.Generator().manual_seed(seed))
    return x[:, perm.to(x.device)]


def rotated_digits(x: Tensor, angle: float | tuple[float, float] = 45.0, seed: int = 0) -> Tensor:
    """The images rotated counter-clockwise about their centre (bilinear, zero fill).

    ``angle`` in degrees: a number rotates all images by it; a range ``(lo, hi)`` draws one
    angle per image uniformly from it with a generator seeded by ``seed``. Rotations by
    multiples of 90° are exact permutations of the pixels."""
    _check_images(x)
    n = x.shape[0]
    if isinstance(angle, tuple):
        lo, hi = angle
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        deg = lo + (hi - lo) * u
    else:
        deg = torch.full((n,), float(angle), dtype=torch.float64)
    rad = deg * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Snap rounding noise (cos 90° = 6e-17) so quarter turns stay exact permutations.
    cos = torch.where(cos.abs() < 1e-12, 0.0, cos)
    sin = torch.where(sin.abs() < 1e-12, 0.0, sin)
    # affine_grid maps output coordinates to input coordinates ((x right, y down) in
    # [-1, 1]); rotating the image counter-clockwise samples the input at R(-θ) p.
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2
    ).to(device=x.device, dtype=x.dtype)
    img = x.reshape(n, 1, IMAGE_SIDE, IMAGE_SIDE)
    grid = torch.nn.functional.affine_grid(theta, list(img.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        img, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.reshape(n, NUM_PIXELS)


def loaders(
    split: DigitsSplit,
    batch_size: int = 64,
    shuffle_train: bool = True,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over the split; the training order is shuffled with
    a generator seeded by ``seed`` (reproducible), the test loader is never shuffled."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}")
    train = DataLoader(
        TensorDataset(split.x_train, split.y_train),
        batch_size=batch_size,
        shuffle=shuffle_train,
        generator=torch.Generator().manual_seed(seed) if shuffle_train else None,
    )
    test = DataLoader(TensorDataset(split.x_test, split.y_test), batch_size=batch_size)
    return train, test


__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "permuted_digits",
    "rotated_digits",
    "loaders",
]
