"""Volume-preserving reshapes (log-det 0): the squeeze of RealNVP (Dinh et al. 2017, §3.6), which trades
each 2x2 spatial block for 4 channels, and flattening an example to a vector."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.flow.transforms.base import Transform


class Squeeze(Transform):
    """(B, C, H, W) -> (B, 4C, H/2, W/2)."""

    def forward(self, x: Tensor):
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)


class Flatten(Transform):
    """(B, *shape) -> (B, prod(shape))."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor):
        return x.flatten(1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)
