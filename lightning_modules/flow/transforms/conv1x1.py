"""Invertible 1x1 convolution (Glow, Kingma & Dhariwal 2018, §3.2), LU-parameterised:
W = P L (U + diag(sign(s) exp(log|s|))) with P a fixed permutation, L unit lower- and U strictly upper-
triangular, so log|det W| = sum(log|s|) costs O(C). Acting on dim 1 it is a learned channel mixing for
images (B, C, H, W) and an invertible linear map for vectors (B, D)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.flow.transforms.base import Transform, spatial_size


def _apply(w: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("ij,bj...->bi...", w, x)


class InvertibleConv1x1(Transform):
    def __init__(self, channels: int):
        super().__init__()
        w0, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))  # random rotation
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight(self) -> Tensor:
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def forward(self, x: Tensor):
        logdet = self.log_s.sum() * spatial_size(x)
        return _apply(self.weight(), x), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return _apply(torch.linalg.inv(self.weight()), y)
