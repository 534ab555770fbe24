"""Encoder/decoder bodies sized from the data shape, shared by the families that need them."""
from __future__ import annotations

import math
from typing import Tuple

from torch import Tensor, nn


def downsampling_stages(size: int, smallest: int = 4) -> Tuple[int, int]:
    """How many stride-2 halvings take `size` down towards `smallest` (8->4: 1, 28->7: 2, 32->4: 3)."""
    stages = 0
    while size % 2 == 0 and size // 2 >= smallest:
        size //= 2
        stages += 1
    return stages, size


def mlp(d_in: int, hidden: int, d_out: int, depth: int = 2) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, d_out): a conv, then stride-2 convs doubling channels, then a linear layer."""

    def __init__(self, shape, d_out: int, channels: int = 32):
        super().__init__()
        c, h, w = shape
        stages, hs = downsampling_stages(h)
        _, ws = downsampling_stages(w)
        layers, ch = [nn.Conv2d(c, channels, 3, padding=1), nn.SiLU()], channels
        for _ in range(stages):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.SiLU()]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * hs * ws, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ConvDecoder(nn.Module):
    """(B, d_in) -> (B, C_out, H, W): the mirror of ConvEncoder with transposed convs."""

    def __init__(self, d_in: int, shape, out_channels: int, channels: int = 32):
        super().__init__()
        _, h, w = shape
        stages, hs = downsampling_stages(h)
        _, ws = downsampling_stages(w)
        ch = channels * 2**stages
        self.seed_shape = (ch, hs, ws)
        layers = [nn.Linear(d_in, ch * hs * ws), nn.SiLU(), nn.Unflatten(1, self.seed_shape)]
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.SiLU()]
            ch //= 2
        self.body = nn.Sequential(*layers, nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


def flat_dim(shape) -> int:
    return math.prod(shape)
