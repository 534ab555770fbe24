"""An exponential moving average of a network's weights, for the families that sample from the average
(Polyak averaging; Karras et al. 2018 for GANs, Ho et al. 2020 for diffusion models)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(average: nn.Module, current: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * current, parameter by parameter; buffers (BatchNorm
    running statistics) are copied, so the averaged network normalises like the current one."""
    for a, c in zip(average.parameters(), current.parameters()):
        a.lerp_(c, 1.0 - decay)
    for a, c in zip(average.buffers(), current.buffers()):
        a.copy_(c)


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at optimiser step `step` (1-based): min(decay, (1 + t) / (10 + t)), the warm-up of
    TensorFlow's ExponentialMovingAverage(num_updates). Without it a decay of 0.999 over a few hundred steps
    would keep the average mostly at the random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step))
