"""Conditioner networks for coupling and autoregressive layers, and the bounded log-scale they share."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.common import nets


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero the last layer so that a new coupling starts as the identity (Glow, §3.3)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conv_net(channels: int, hidden: int) -> nn.Module:
    """C -> 2C channels (log-scale and shift per input channel): 3x3, 1x1, 3x3 convolutions as in Glow."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        zero_init(nn.Conv2d(hidden, 2 * channels, 3, padding=1)),
    )


def mlp(features: int, hidden: int, layers: int = 2) -> nn.Module:
    """D -> 2D features (log-scale and shift per input feature)."""
    net = nets.mlp(features, hidden, 2 * features, layers, nn.ReLU)
    zero_init(net[-1])
    return net


class TanhScale(nn.Module):
    """log-scale = w * tanh(raw), w learned per channel (RealNVP's stabilising bound, Dinh et al. 2017 §4.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, raw: Tensor) -> Tensor:
        return self.weight.view(1, -1, *([1] * (raw.dim() - 2))) * torch.tanh(raw)
