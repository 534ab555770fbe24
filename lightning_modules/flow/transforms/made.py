"""MADE: a masked autoencoder whose output i depends only on inputs < i (Germain et al. 2015). Degrees:
inputs 1..D, hidden units cycle through 1..D-1, a unit sees units of lower-or-equal degree, an output of
degree i sees hidden units of degree < i."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.flow.transforms.nets import zero_init


class MaskedLinear(nn.Linear):
    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """x (B, D) -> (B, outputs_per_feature * D); output block k holds the k-th parameter of every feature."""

    def __init__(self, features: int, hidden: int, layers: int = 2, outputs_per_feature: int = 2):
        super().__init__()
        d_in = torch.arange(1, features + 1)
        d_hidden = torch.arange(hidden) % max(1, features - 1) + 1
        d_out = d_in.repeat(outputs_per_feature)
        degrees = [d_in] + [d_hidden] * layers
        body = []
        for a, b in zip(degrees, degrees[1:]):
            body += [MaskedLinear(b[:, None] >= a[None, :]), nn.ReLU()]
        self.net = nn.Sequential(*body, zero_init(MaskedLinear(d_out[:, None] > degrees[-1][None, :])))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
