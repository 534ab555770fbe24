"""A check every family's conditional form shares: on toy2d:8gaussians with the generating component as the
label, the samples asked for class c must lie nearest centre c."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.toy2d import EIGHT_GAUSSIANS_RADIUS


def eight_centres() -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    return EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)


def nearest_centre(points: np.ndarray) -> np.ndarray:
    return ((points[:, None] - eight_centres()[None]) ** 2).sum(-1).argmin(1)


def share_nearest_requested_centre(model, per_class: int = 200, seed: int = 0) -> np.ndarray:
    """For each class c, the share of `per_class` samples asked for c that lie nearest centre c."""
    torch.manual_seed(seed)
    labels = torch.arange(8).repeat_interleave(per_class)
    with torch.no_grad():
        nearest = nearest_centre(model.sample(len(labels), labels).cpu().numpy())
    return np.array([(nearest[labels.numpy() == c] == c).mean() for c in range(8)])
