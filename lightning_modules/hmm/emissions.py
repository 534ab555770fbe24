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

import numpy as np
import torch
from torch import Tensor, nn

from lightning_modules.common.class_blocks import grouped_kmeans_responsibilities
from lightning_modules.common.em import DTYPE
from lightning_modules.common.gaussian import (estimate_gaussians, gaussian_log_prob,
                                               n_covariance_parameters, precision_cholesky, sample_gaussians,
                                               sufficient_statistics, unit_covariances)
from lightning_modules.common.kmeans import kmeans_responsibilities


class GaussianEmission(nn.Module):
    def __init__(self, n_states: int, dim: int, covariance_type: str, reg_covar: float, kmeans_iters: int = 10):
        super().__init__()
        self.covariance_type, self.reg_covar, self.kmeans_iters = covariance_type, reg_covar, kmeans_iters
        self.register_buffer("means", torch.zeros(n_states, dim, dtype=DTYPE))
        # identity covariances, whose precision Cholesky factor is the identity too: a normalised density
        # before `initialize` (an all-ones "full" factor would be singular and not a density)
        self.register_buffer("prec_chol", unit_covariances(n_states, dim, covariance_type).to(DTYPE))

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
        """Seeded random rows that break the symmetry between states: Dirichlet(1) rows, as hmmlearn's
        CategoricalHMM starts (in groups: the smoothed unigram of the group's frames, each of its states'
        copies multiplied by its own Dirichlet(1) draw, so a class's or a segment's states start apart but
        from its own tokens). Copies of one unigram jittered by U(0.5, 1.5), with uniform transitions, start
        next to the saddle of the i.i.d. unigram model (see `HMM._random_transitions`)."""
        rng = np.random.default_rng([seed, 0])  # the emissions' stream ([seed, 1]: the HMM's transitions)
        n, vocab = self.probs.shape
        probs = torch.from_numpy(rng.standard_exponential((n, vocab)))  # normalised: Dirichlet(1) rows
        if groups is not None:  # the (group, token) counts, each group's row for each of its states
            pairs = groups.cpu() * vocab + x.cpu()
            counts = torch.bincount(pairs, minlength=len(states) * vocab).view(len(states), vocab).to(DTYPE) + 1.0
            unigram = torch.empty(self.probs.shape, dtype=DTYPE)
            for group, cols in enumerate(states):
                unigram[cols] = counts[group]
            probs = probs * unigram
        self.probs.copy_(probs / probs.sum(1, keepdim=True))

    def sample(self, states: Tensor) -> Tensor:
        return torch.multinomial(self.probs[states], 1).squeeze(1)
