"""Class-conditional EM families in block layout: one mixture (GMM) or HMM per class, stored as a single
model whose K * S components (states) are K blocks of S, block c being class c's model p(x | y = c).

For a labelled example the E-step keeps only its class's block (Bayes' rule with a known class), so one
EM step over all examples is exactly K per-class EM steps, and the per-class sufficient statistics sum
across batches and ranks like the unconditional ones. Mixing weights and start probabilities are
normalised within each block; an HMM's transition matrix is block-diagonal.
Semi-supervised EM (UNLABELLED examples, the class latent) is in `common.semi_supervised`.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from lightning_modules.common.kmeans import kmeans_responsibilities


def block_logsumexp(a: Tensor, num_classes: int) -> Tensor:
    """(..., K*S) -> (..., K): log-sum-exp within each block."""
    return torch.logsumexp(a.unflatten(-1, (num_classes, -1)), -1)


def normalize_blocks(p: Tensor, num_classes: int) -> Tensor:
    """(K*S,) non-negative weights -> each block sums to 1."""
    blocks = p.view(num_classes, -1)
    return (blocks / blocks.sum(1, keepdim=True)).reshape(p.shape)


def repeat_per_block(v: Tensor, block_size: int) -> Tensor:
    """(..., K) per-class values -> (..., K*S) the value of its class for every component."""
    return v.repeat_interleave(block_size, -1)


def sample_in_blocks(probs: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """For each class in y (n,), one component drawn from its block of `probs` (K*S,) (each block sums
    to 1), returned as a global index c * S + s."""
    size = len(probs) // num_classes
    return y * size + torch.multinomial(probs.view(num_classes, size)[y], 1).squeeze(1)


def block_states(num_classes: int, block_size: int) -> List[Tensor]:
    """The global indices of each class's block: [c * S, ..., c * S + S - 1] for c = 0..K-1."""
    return list(torch.arange(num_classes * block_size).view(num_classes, block_size))


def grouped_kmeans_responsibilities(x: Tensor, groups: Tensor, states: List[Tensor], iters: int,
                                    seed: int) -> Tensor:
    """One-hot (N, S) responsibilities: the examples of group g (groups == g) clustered by seeded k-means
    (`kmeans_responsibilities`, the same seed for every group) into the states `states[g]` of S in all."""
    n_states = sum(len(s) for s in states)
    resp = x.new_zeros(len(x), n_states)
    for g, cols in enumerate(states):
        rows = (groups == g).nonzero().squeeze(1)
        resp[rows[:, None], cols.to(rows.device)] = kmeans_responsibilities(x[rows], len(cols), iters, seed)
    return resp
