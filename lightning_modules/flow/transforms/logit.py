"""The [0, 1] -> R pre-processing of RealNVP (Dinh et al. 2017, §4.1): p = alpha + (1 - 2 alpha) x,
y = logit(p). Its log-Jacobian, sum_i [log(1 - 2 alpha) - log p_i - log(1 - p_i)], is part of the density
on [0, 1]^D. The image of [0, 1]^D is a box, so the model's density on [0, 1]^D integrates to at most 1
(the mass the base puts outside the box is lost), which only makes the reported NLL conservative."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.flow.transforms.base import Transform, sum_per_example


class Logit(Transform):
    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"logit alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor):
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.logit(p)
        # log p + log(1 - p) = -softplus(-y) - softplus(y), stable at p near 0 or 1
        logdet = math.log(1 - 2 * self.alpha) + F.softplus(-y) + F.softplus(y)
        return y, sum_per_example(logdet)

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
