"""HMM emission distributions p(x_t | z_t = n): Gaussian (any covariance type) and categorical.

Both speak the same small protocol over *frames* (single time steps, padding already removed):
`log_prob(x) -> (M, N)`, `statistics(x, gamma) -> dict` of posterior-weighted sums (summable over
batches and devices), `m_step(stats)`, `initialize(x, seed, groups, states)` and `sample(states)`.
The Gaussian math lives in `lightning_modules.common.gaussian` (shared with the GMM).

`initialize` may get the frames in groups, each with its own states (a conditional HMM: a class's
frames start its block of states; a left-to-right HMM: the frames of a segment of the sequence start
that segment's states); without groups, all frames start all states.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from lightning_modules.common.class_blocks import grouped_kmeans_responsibilities
from lightning_modules.common.em import DTYPE
from lightning_modules.common.gaussian import (covariance_shape, estimate_gaussians, gaussian_log_prob,
                                               n_covariance_parameters, precision_cholesky, sample_gaussians,
                                               sufficient_statistics)
from lightning_modules.common.kmeans import kmeans_responsibilities


class GaussianEmission(nn.Module):
    def __init__(self, n_states: int, dim: int, covariance_type: str, reg_covar: float, kmeans_iters: int = 10):
        super().__init__()
        self.covariance_type, self.reg_covar, self.kmeans_iters = covariance_type, reg_covar, kmeans_iters
        self.register_buffer("means", torch.zeros(n_states, dim, dtype=DTYPE))
        self.register_buffer("prec_chol", torch.ones(covariance_shape(n_states, dim, covariance_type), dtype=DTYPE))

    def n_parameters(self) -> int:
        n, d = self.means.shape
        return n * d + n_covariance_parameters(n, d, self.covariance_type)

    def log_prob(self, x: Tensor) -> Tensor:
        return gaussian_log_prob(x, self.means, self.prec_chol, self.covariance_type)

    def statistics(self, x: Tensor, gamma: Tensor) -> Dict[str, Tensor]:
        return sufficient_statistics(x, gamma, self.covariance_type)

    def m_step(self, stats: Dict[str, Tensor]) -> None:
        means, cov = estimate_gaussians(stats["nk"], stats["sx"], stats["sxx"], self.covariance_type, self.reg_covar)
        self.set_parameters(means, cov)

    def set_parameters(self, means: Tensor, covariances: Tensor) -> None:
        self.means.copy_(means)
        self.prec_chol.copy_(precision_cholesky(covariances.to(DTYPE), self.covariance_type))

    def initialize(self, x: Tensor, seed: int, groups: Optional[Tensor] = None,
                   states: Optional[List[Tensor]] = None) -> None:
        """k-means clusters (seeded k-means++ then Lloyd, as the GMM starts) and each cluster's mean and
        covariance, the initialisation of hmmlearn and scikit-learn's GaussianMixture (in groups: each
        group's frames clustered into its states)."""
        if groups is None:
            resp = kmeans_responsibilities(x, len(self.means), self.kmeans_iters, seed)
        else:
            resp = grouped_kmeans_responsibilities(x, groups, states, self.kmeans_iters, seed)
        self.m_step(self.statistics(x, resp))

    def sample(self, states: Tensor) -> Tensor:
        return sample_gaussians(self.means, self.prec_chol, self.covariance_type, states)


class CategoricalEmission(nn.Module):
    """p(x_t = v | z_t = n) = B[n, v]; `pseudocount` is a symmetric Dirichlet(1 + pseudocount) prior (MAP),
    which keeps unseen tokens at a non-zero probability (hmmlearn's `emissionprob_prior` = 1 + pseudocount)."""

    def __init__(self, n_states: int, vocab_size: int, pseudocount: float):
        super().__init__()
        self.pseudocount = pseudocount
        self.register_buffer("probs", torch.full((n_states, vocab_size), 1.0 / vocab_size, dtype=DTYPE))

    def n_parameters(self) -> int:
        n, v = self.probs.shape
        return n * (v - 1)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.probs.log().T[x]

    def statistics(self, x: Tensor, gamma: Tensor) -> Dict[str, Tensor]:
        counts = gamma.new_zeros(self.probs.shape[1], self.probs.shape[0]).index_add_(0, x, gamma)
        return {"counts": counts.T}

    def m_step(self, stats: Dict[str, Tensor]) -> None:
        counts = stats["counts"] + self.pseudocount
        self.probs.copy_(counts / counts.sum(1, keepdim=True))

    def initialize(self, x: Tensor, seed: int, groups: Optional[Tensor] = None,
                   states: Optional[List[Tensor]] = None) -> None:
        """The smoothed unigram distribution (in groups: of the group's frames, for its states), each
        state's copy jittered by U(0.5, 1.5) to break symmetry."""
        g = torch.Generator().manual_seed(seed)
        vocab = self.probs.shape[1]
        if groups is None:
            unigram = torch.bincount(x.cpu(), minlength=vocab).to(DTYPE) + 1.0
        else:  # the (group, token) counts, each group's row for each of its states
            pairs = groups.cpu() * vocab + x.cpu()
            counts = torch.bincount(pairs, minlength=len(states) * vocab).view(len(states), vocab).to(DTYPE) + 1.0
            unigram = torch.empty(self.probs.shape, dtype=DTYPE)
            for group, cols in enumerate(states):
                unigram[cols] = counts[group]
        jitter = torch.rand(self.probs.shape, generator=g, dtype=DTYPE) + 0.5
        probs = unigram * jitter
        self.probs.copy_(probs / probs.sum(1, keepdim=True))

    def sample(self, states: Tensor) -> Tensor:
        return torch.multinomial(self.probs[states], 1).squeeze(1)
