"""The HMM's view of any data as sequences of frames, and back.

An image (C, H, W) is H rows of C*W features, a vector (D,) is D one-dimensional steps, float sequences
(T, D) are as they are (rows that contain NaN are padding), token sequences (T,) int64 as they are (-1 is
padding).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from lightning_modules.common.em import DTYPE
from lightning_modules.contract import DataInfo


def to_sequences(x: Tensor, info: DataInfo) -> Tuple[Tensor, Tensor]:
    """x in data space -> (frames (B, T, D) float64 or (B, T) int64 with padding zeroed, mask (B, T))."""
    if info.kind == "image":
        b, c, h, w = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b, h, c * w).to(DTYPE)
        return seq, torch.ones(b, h, dtype=torch.bool, device=x.device)
    if info.kind == "vector":
        return x.to(DTYPE).unsqueeze(-1), torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if info.vocab_size is not None:
        return x.clamp_min(0), x >= 0
    mask = ~torch.isnan(x).any(-1)
    return torch.nan_to_num(x.to(DTYPE), nan=0.0), mask


def from_sequences(seq: Tensor, info: DataInfo) -> Tensor:
    """Sampled full-length sequences -> data space (images clamped to their range [0, 1])."""
    if info.kind == "image":
        c, h, w = info.shape
        return seq.reshape(len(seq), h, c, w).permute(0, 2, 1, 3).clamp(0, 1).float()
    if info.kind == "vector":
        return seq.squeeze(-1).float()
    return seq if info.vocab_size is not None else seq.float()


def sequence_layout(info: DataInfo) -> Tuple[int, int]:
    """(steps T, frame dimension D) of the sequence view (D = vocabulary size for tokens)."""
    if info.kind == "image":
        c, h, w = info.shape
        return h, c * w
    if info.kind == "vector":
        return info.shape[0], 1
    if info.vocab_size is not None:
        return info.shape[0], info.vocab_size
    return info.shape[0], info.shape[1]
