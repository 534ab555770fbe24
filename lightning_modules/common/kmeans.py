"""k-means seeding for mixture-style families (GMM components, Gaussian HMM states): k-means++ centres,
then a few Lloyd steps, in torch and seeded by a generator, so every rank computes the same start."""
from __future__ import annotations

import torch
from torch import Tensor


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    d2 = (x - centres[0]).square().sum(1)
    for _ in range(1, k):
        i = torch.multinomial(d2 / d2.sum(), 1, generator=generator) if d2.sum() > 0 else torch.randint(len(x), (1,), generator=generator)
        centres.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, (x - centres[-1]).square().sum(1))
    return torch.stack(centres)


def lloyd(x: Tensor, centres: Tensor, iters: int) -> Tensor:
    """Hard assignments after `iters` Lloyd (k-means) steps from `centres`; an emptied cluster keeps its centre."""
    for _ in range(iters + 1):
        labels = torch.cdist(x, centres).argmin(1)
        onehot = torch.nn.functional.one_hot(labels, len(centres)).to(x.dtype)
        counts = onehot.sum(0)
        centres = torch.where(counts[:, None] > 0, onehot.T @ x / counts.clamp_min(1)[:, None], centres)
    return labels


def kmeans_responsibilities(x: Tensor, k: int, iters: int, seed: int) -> Tensor:
    """One-hot k-means assignments (N, k) of x (N, D), seeded k-means++ then `iters` Lloyd steps."""
    if len(x) < k:
        raise ValueError(f"k-means with {k} clusters needs at least {k} examples, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    labels = lloyd(x, kmeans_plusplus(x.cpu(), k, g).to(x.device), iters)
    return torch.nn.functional.one_hot(labels, k).to(x.dtype)
