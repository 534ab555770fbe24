"""Activation normalisation (Glow, Kingma & Dhariwal 2018, §3.1): a per-channel affine map
y = (x + loc) * exp(log_scale), initialised from data so that the first batch comes out with zero mean and
unit variance per channel.

The data-dependent initialisation happens on the first forward pass in training mode (eval-mode calls
before it are the identity, so Lightning's sanity validation does not initialise from validation data).
Under torch.distributed the first-batch statistics are summed over all ranks, so every rank ends up with
the same parameters - those the union of the ranks' first batches would give on one device."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.flow.transforms.base import Transform, all_reduce_sum, per_feature, spatial_size


class ActNorm(Transform):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        xc = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # (C, everything else)
        stats = torch.stack([xc.sum(1), (xc**2).sum(1), torch.full_like(xc[:, 0], xc.shape[1])])
        s, s2, n = all_reduce_sum(stats)
        mean = s / n
        std = (s2 / n - mean**2).clamp_min(0).sqrt()
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor):
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + per_feature(self.loc, x)) * per_feature(self.log_scale, x).exp()
        logdet = self.log_scale.sum() * spatial_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * per_feature(-self.log_scale, y).exp() - per_feature(self.loc, y)
