"""The noise predictors eps_hat(z, lambda, y): a small U-Net for images and a residual MLP for vectors.

Both embed the noise level (the log-SNR lambda, through sinusoidal features as in the Transformer and DDPM) and,
for a model of P(X, Y), the class: `num_classes + 1` embeddings, the last one the "no label" of
classifier-free guidance (Ho & Salimans 2022), so one network is both the conditional and the unconditional
model. The output layer starts at zero (eps_hat = 0: the prior's guess), which keeps the first steps stable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.nets import num_stages


def sinusoidal_features(u: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) -> (B, dim): cos and sin of u at `dim/2` frequencies from 1 to 1/max_period (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=u.device, dtype=u.dtype) / half)
    angles = u[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], 1)


class Conditioning(nn.Module):
    """(lambda, y) -> one embedding vector: an MLP of the noise level's sinusoidal features plus a class
    embedding (index `num_classes` = no label)."""

    def __init__(self, dim: int, log_snr_range: tuple, num_classes: Optional[int]):
        super().__init__()
        self.lo, self.hi = log_snr_range
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.null_label = num_classes

    def forward(self, log_snr: Tensor, y: Optional[Tensor]) -> Tensor:
        # the noise level as a "time" in [0, 1000], the scale the sinusoidal frequencies were made for
        time = 1000.0 * (self.hi - log_snr) / (self.hi - self.lo)
        emb = self.mlp(sinusoidal_features(time, self.dim))
        if self.labels is not None:
            if y is None:
                y = torch.full((len(log_snr),), self.null_label, dtype=torch.long, device=log_snr.device)
            emb = emb + self.labels(y)
        return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the embedding's per-channel shift, GroupNorm -> SiLU -> dropout -> conv,
    plus a skip connection (the DDPM U-Net's block)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """A U-Net over (C, H, W) images: one ResBlock per resolution on the way down (channels doubling at each
    stride-2 halving while the image stays even and >= 4 pixels: 8x8 -> 4x4), two in the middle, and one per
    resolution on the way up, each fed the matching skip connection."""

    def __init__(self, shape, channels: int, num_classes: Optional[int], log_snr_range: tuple, dropout: float):
        super().__init__()
        c_img, h, w = shape
        stages = num_stages(h, w)
        emb = 4 * channels
        self.conditioning = Conditioning(emb, log_snr_range, num_classes)
        self.stem = nn.Conv2d(c_img, channels, 3, padding=1)
        widths = [channels * 2**i for i in range(stages + 1)]
        self.down = nn.ModuleList([ResBlock(widths[0], widths[0], emb, dropout)])
        self.downsample = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.downsample.append(nn.Conv2d(a, b, 3, stride=2, padding=1))
            self.down.append(ResBlock(b, b, emb, dropout))
        self.middle = nn.ModuleList([ResBlock(widths[-1], widths[-1], emb, dropout) for _ in range(2)])
        self.up = nn.ModuleList([ResBlock(2 * widths[-1], widths[-1], emb, dropout)])
        self.upsample = nn.ModuleList()
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.upsample.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
            self.up.append(ResBlock(2 * b, b, emb, dropout))
        self.head = nn.Sequential(nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                  _zero(nn.Conv2d(channels, c_img, 3, padding=1)))

    def _down_and_middle(self, z: Tensor, log_snr: Tensor, y: Optional[Tensor]):
        emb = self.conditioning(log_snr, y)
        h = self.down[0](self.stem(z), emb)
        skips = [h]
        for downsample, block in zip(self.downsample, self.down[1:]):
            h = block(downsample(h), emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        return h, skips, emb

    def bottleneck(self, z: Tensor, log_snr: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The lowest-resolution activations after the middle blocks, flattened: (B, features)."""
        return self._down_and_middle(z, log_snr, y)[0].flatten(1)

    def forward(self, z: Tensor, log_snr: Tensor, y: Optional[Tensor] = None) -> Tensor:
        h, skips, emb = self._down_and_middle(z, log_snr, y)
        h = self.up[0](torch.cat([h, skips.pop()], 1), emb)
        for upsample, block in zip(self.upsample, self.up[1:]):
            h = block(torch.cat([upsample(h), skips.pop()], 1), emb)
        return self.head(h)


class ResidualMLP(nn.Module):
    """Vectors: x -> width, then `blocks` pre-norm residual blocks [LayerNorm, SiLU, Linear, + embedding,
    SiLU, dropout, Linear], then a zero-initialised linear layer back to D."""

    def __init__(self, dim: int, width: int, blocks: int, num_classes: Optional[int], log_snr_range: tuple,
                 dropout: float):
        super().__init__()
        self.conditioning = Conditioning(width, log_snr_range, num_classes)
        self.stem = nn.Linear(dim, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(blocks)])
        self.first = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.embs = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.second = nn.ModuleList([_zero(nn.Linear(width, width)) for _ in range(blocks)])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), _zero(nn.Linear(width, dim)))

    def bottleneck(self, z: Tensor, log_snr: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The last hidden layer, before the output head: (B, width)."""
        emb = F.silu(self.conditioning(log_snr, y))
        h = self.stem(z.flatten(1))
        for norm, first, to_emb, second in zip(self.norms, self.first, self.embs, self.second):
            u = first(F.silu(norm(h))) + to_emb(emb)
            h = h + second(self.dropout(F.silu(u)))
        return h

    def forward(self, z: Tensor, log_snr: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.head(self.bottleneck(z, log_snr, y)).view(z.shape)
