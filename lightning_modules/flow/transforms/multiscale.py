"""Multi-scale factoring-out (RealNVP, Dinh et al. 2017, §3.6): after a scale's steps, half the channels
leave the flow as final latents; the other half go on through the deeper scales (`inner`). The output is
the flat latent [factored-out half, inner latent]."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.flow.transforms.base import Transform


class Split(Transform):
    def __init__(self, in_shape, inner: Transform):
        """in_shape (C, H, W) of the incoming tensor; `inner` maps the kept (C - C//2, H, W) half to (B, D')."""
        super().__init__()
        c, h, w = in_shape
        self.keep, self.out_shape = c - c // 2, (c // 2, h, w)
        self.inner = inner

    def forward(self, x: Tensor):
        z, logdet = self.inner(x[:, : self.keep])
        return torch.cat([x[:, self.keep :].flatten(1), z], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        n_out = self.out_shape[0] * self.out_shape[1] * self.out_shape[2]
        x_out = y[:, :n_out].reshape(-1, *self.out_shape)
        return torch.cat([self.inner.inverse(y[:, n_out:]), x_out], dim=1)
