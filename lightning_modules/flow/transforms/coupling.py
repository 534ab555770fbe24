"""Affine coupling (RealNVP, Dinh et al. 2017, §3.3-3.4). With a binary mask b,
y = b*x + (1-b) * (x * exp(s(b*x)) + t(b*x)); the Jacobian is triangular, log|det| = sum (1-b) * s.
Checkerboard masks alternate over pixels, channel masks over the first/second half of the channels
(the same class serves vectors, masking alternate features)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.flow.transforms.base import Transform, sum_per_example
from lightning_modules.flow.transforms.nets import TanhScale


def checkerboard_mask(shape, parity: int = 0) -> Tensor:
    """(C, H, W) mask with 1 where (h + w) % 2 == parity; for a vector shape (D,), alternate features."""
    if len(shape) == 1:
        return (torch.arange(shape[0]) % 2 == parity).float()
    _, h, w = shape
    board = (torch.arange(h)[:, None] + torch.arange(w)[None]) % 2 == parity
    return board.float().expand(*shape).clone()


def channel_mask(shape, parity: int = 0) -> Tensor:
    """(C, H, W) mask with 1 on the first half of the channels (parity 0) or the second half (parity 1)."""
    c = shape[0]
    first = (torch.arange(c) < c // 2).float()
    m = first if parity == 0 else 1 - first
    return m.view(c, *([1] * (len(shape) - 1))).expand(*shape).clone()


class AffineCoupling(Transform):
    def __init__(self, mask: Tensor, conditioner: nn.Module):
        """`conditioner` maps (B, C, ...) to (B, 2C, ...): raw log-scale and shift for every entry."""
        super().__init__()
        self.register_buffer("mask", mask)
        self.conditioner = conditioner
        self.scale = TanhScale(mask.shape[0])

    def _scale_shift(self, x_fixed: Tensor):
        raw_s, t = self.conditioner(x_fixed).chunk(2, dim=1)
        free = 1 - self.mask
        return self.scale(raw_s) * free, t * free

    def forward(self, x: Tensor):
        s, t = self._scale_shift(x * self.mask)
        y = x * torch.exp(s) + t  # fixed entries: s = t = 0
        return y, sum_per_example(s)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._scale_shift(y * self.mask)
        return (y - t) * torch.exp(-s)
