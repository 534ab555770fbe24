"""The transform interface and its composition."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch.distributed as dist
from torch import Tensor, nn


class Transform(nn.Module):
    """An invertible map. `forward(x) -> (y, logdet)` with logdet = log|det dy/dx| per example, shape (B,);
    `inverse(y) -> x`."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError


class Sequential(Transform):
    """Transforms applied in order; log-determinants add (chain rule)."""

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            y = t.inverse(y)
        return y


def sum_per_example(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch one."""
    return x.reshape(x.shape[0], -1).sum(1)


def per_feature(p: Tensor, x: Tensor) -> Tensor:
    """View a per-channel/per-feature vector p of shape (C,) so it broadcasts against x of shape (B, C, ...)."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def spatial_size(x: Tensor) -> int:
    """Number of positions sharing one channel's parameters: H*W for images, 1 for vectors."""
    n = 1
    for s in x.shape[2:]:
        n *= s
    return n


def all_reduce_sum(t: Tensor) -> Tensor:
    """`t` summed over the ranks of a distributed run, in place (unchanged on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
