"""A flow as a distribution: x = T^{-1}(z), z ~ base, so log p(x) = log p_base(T(x)) + log|det dT/dx|.

A class-conditional flow shares T and gives each class y its own base p(z | y) (Glow's class-conditional
prior, Kingma & Dhariwal 2018 §5): log p(x | y) = log p(T(x) | y) + log|det dT/dx|, so one pass through T
gives every class's density."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.flow.transforms.base import Transform, all_reduce_sum


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


class ClassConditionalNormal(nn.Module):
    """p(z | y) = N(z; mean_y, diag(exp(log_scale_y))^2), one learned mean and log-scale per class over the
    whole latent. Like ActNorm they are initialised from data: the first training batch's per-class mean
    and standard deviation of z (summed over the ranks of a distributed run); a class absent from it, and
    every class before it, is the standard normal. Adam moves a parameter by about its learning rate per
    step, so starting every class at 0 would leave the classes overlapping for hundreds of steps."""

    def __init__(self, dim: int, num_classes: int, min_std: float = 1e-2):
        super().__init__()
        self.dim, self.min_std = dim, min_std
        self.mean = nn.Parameter(torch.zeros(num_classes, dim))
        self.log_scale = nn.Parameter(torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, z: Tensor, y: Tensor) -> None:
        onehot = F.one_hot(y, len(self.mean)).double()  # (B, K)
        zd = z.detach().double()
        s, s2, n = all_reduce_sum(torch.cat([onehot.T @ zd, onehot.T @ zd**2, onehot.sum(0)[:, None]], 1)).split(
            [self.dim, self.dim, 1], 1)
        seen = n >= 2  # (K, 1)
        mean = s / n.clamp_min(1)
        std = (s2 / n.clamp_min(1) - mean**2).clamp_min(0).sqrt().clamp_min(self.min_std)
        # whole-tensor copies (as ActNorm's): FSDP's parameters are views that refuse indexed writes
        self.mean.copy_(torch.where(seen, mean, self.mean.double()))
        self.log_scale.copy_(torch.where(seen, std.log(), self.log_scale.double()))
        self.initialized.fill_(True)

    @torch.no_grad()
    def place(self, mean: Tensor, std: Tensor) -> None:
        """Sets every class's mean (K, D) and a scale (D,) or (K, D), and marks the base initialised so the
        data-dependent initialisation never runs (semi-supervised FlowGMM places it from labelled examples)."""
        self.mean.copy_(mean.to(self.mean))
        self.log_scale.copy_(std.log().to(self.log_scale).expand_as(self.log_scale))
        self.initialized.fill_(True)

    def freeze(self) -> None:
        """Keeps the means and scales where they are (FlowGMM's fixed base: only T trains)."""
        self.mean.requires_grad_(False)
        self.log_scale.requires_grad_(False)

    def class_log_probs(self, z: Tensor) -> Tensor:
        """log p(z | y = c) for every class, (B, K)."""
        u = (z[:, None, :] - self.mean) * torch.exp(-self.log_scale)
        return -0.5 * (u**2).sum(-1) - self.log_scale.sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(z, y)
        u = (z - self.mean[y]) * torch.exp(-self.log_scale[y])
        return -0.5 * (u**2).sum(1) - self.log_scale[y].sum(1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, y: Tensor, temperature: float = 1.0) -> Tensor:
        """z ~ p(z | y), the standard deviation scaled by `temperature` (as StandardNormal's)."""
        eps = torch.randn(len(y), self.dim, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean[y] + temperature * self.log_scale[y].exp() * eps


class NormalizingFlow(nn.Module):
    """A transform over a base: StandardNormal (p(x)) or ClassConditionalNormal (p(x | y), y given)."""

    def __init__(self, transform: Transform, base: nn.Module):
        super().__init__()
        self.transform, self.base = transform, base

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        z, logdet = self.transform(x)
        return (self.base.log_prob(z) if y is None else self.base.log_prob(z, y)) + logdet

    def class_log_probs(self, x: Tensor) -> Tensor:
        """log p(x | y = c) for every class of a class-conditional base, (B, K), from one pass through T."""
        z, logdet = self.transform(x)
        return self.base.class_log_probs(z) + logdet[:, None]

    def encode(self, x: Tensor) -> Tensor:
        return self.transform(x)[0]

    def sample(self, n: int, temperature: float = 1.0, y: Optional[Tensor] = None) -> Tensor:
        z = self.base.sample(n, temperature) if y is None else self.base.sample(y, temperature)
        return self.transform.inverse(z)
