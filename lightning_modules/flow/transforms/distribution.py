"""A flow as a distribution: x = T^{-1}(z), z ~ base, so log p(x) = log p_base(T(x)) + log|det dT/dx|."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_modules.flow.transforms.base import Transform


class StandardNormal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_ref", torch.zeros(()), persistent=False)  # carries device and dtype

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Temperature scales the standard deviation (Glow, §5: "reduced-temperature" samples)."""
        return temperature * torch.randn(n, self.dim, device=self._ref.device, dtype=self._ref.dtype)


class NormalizingFlow(nn.Module):
    def __init__(self, transform: Transform, base: StandardNormal):
        super().__init__()
        self.transform, self.base = transform, base

    def log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self.transform(x)
        return self.base.log_prob(z) + logdet

    def encode(self, x: Tensor) -> Tensor:
        return self.transform(x)[0]

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        return self.transform.inverse(self.base.sample(n, temperature))
