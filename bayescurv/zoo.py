"""Reference networks of the kinds users bring, built from standard ``torch.nn`` modules only
(no torchvision): a CIFAR-style ResNet-18 (BatchNorm, any width) and a small Vision
Transformer (attention written with ``nn.Linear``, LayerNorm, or ``nn.MultiheadAttention``).
Used by the scale benchmark, the ResNet example and the architecture tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["resnet18", "vit", "BasicBlock", "ResNet", "ViT"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual (1x1 conv-BN projection when the shape
    changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), four stages of ``blocks`` basic blocks with
    widths ``width * (1, 2, 4, 8)``, global average pooling, a linear head."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64,
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet18(width: int = 64, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs: 11.2M parameters at ``width=64``, 0.7M at ``width=16``."""
    return ResNet((2, 2, 2, 2), width, num_classes, in_channels)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, -1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, torch_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.torch_attention = torch_attention
        self.attn = (nn.MultiheadAttention(dim, heads, batch_first=True) if torch_attention
                     else _Attention(dim, heads))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        h = self.attn(h, h, h, need_weights=False)[0] if self.torch_attention else self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: patch embedding (a strided conv), fixed sinusoidal position codes
    (a buffer: every parameter then acts on each data point separately), pre-norm blocks,
    mean pooling, a linear head."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp: int = 768, num_classes: int = 10, in_channels: int = 3,
                 torch_attention: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        pos = torch.arange(tokens, dtype=torch.float32)[:, None]
        freq = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) / dim * 9.2)
        code = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)[:, :dim]
        self.register_buffer("position", code)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp, torch_attention)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.position.to(x.dtype)
        return self.head(self.norm(self.blocks(h)).mean(1))


def vit(dim: int = 192, depth: int = 6, heads: int = 3, mlp: int = 768, image: int = 32,
        patch: int = 4, num_classes: int = 10, in_channels: int = 3,
        torch_attention: bool = False) -> ViT:
    """Small ViT for 32x32 inputs: 2.7M parameters at the defaults."""
    return ViT(image, patch, dim, depth, heads, mlp, num_classes, in_channels, torch_attention)
