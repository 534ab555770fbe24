"""Gaussian mixture model trained by exact EM inside Lightning (Dempster, Laird & Rubin 1977; Bishop 2006,
sec. 9.2). One epoch = one EM step: `e_step` turns each batch into responsibility-weighted sufficient
statistics, EMModel sums them over batches and ranks, `m_step` re-estimates weights, means and
covariances. Parameters live in float64 buffers of fixed shape, so checkpoints load with weights_only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_modules.common.em import DTYPE, EMModel, Stats
from lightning_modules.common.gaussian import (CovarianceType, estimate_gaussians, gaussian_log_prob,
                                               n_covariance_parameters, precision_cholesky, sample_gaussians,
                                               sufficient_statistics, unit_covariances)
from lightning_modules.common.kmeans import kmeans_responsibilities
from lightning_modules.contract import Conditional


class GMM(EMModel):
    family = "gmm"

    @dataclass
    class Config:
        n_components: int = 10
        covariance_type: CovarianceType = "full"
        reg_covar: float = 1e-3  # added to every variance; digits are dequantised to [0, 1] in 1/17 bins
        max_epochs: int = 100  # = EM iterations
        tol: float = 1e-4  # stop when the mean train log-likelihood changes by less
        init_subsample: int = 10_000  # k-means++ and Lloyd run on this many seeded training examples
        kmeans_iters: int = 10
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        k, d = c.n_components, self.info.dim
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=DTYPE))
        self.register_buffer("means", torch.zeros(k, d, dtype=DTYPE))
        self.register_buffer("prec_chol", unit_covariances(k, d, c.covariance_type).to(DTYPE))  # = its Cholesky

    # --- parameters ---------------------------------------------------------------------------------
    def set_parameters(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Set the mixture directly (covariances shaped as in `gaussian.covariance_shape`)."""
        self.weights.copy_(weights)
        self.means.copy_(means)
        self.prec_chol.copy_(precision_cholesky(covariances.to(DTYPE), self.config.covariance_type))
        self.initialized.fill_(True)

    def _set_from_statistics(self, stats: Stats, count: Tensor) -> None:
        means, cov = estimate_gaussians(stats["nk"], stats["sx"], stats["sxx"], self.config.covariance_type,
                                        self.config.reg_covar)
        weights = (stats["nk"] + 10 * torch.finfo(DTYPE).eps) / count
        self.set_parameters(weights, means, cov)

    def n_parameters(self) -> int:
        k, d = self.config.n_components, self.info.dim
        return (k - 1) + k * d + n_covariance_parameters(k, d, self.config.covariance_type)

    # --- EM -----------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1).to(device=self.means.device, dtype=DTYPE)

    def _joint_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x_n | mu_k, Sigma_k), shape (N, K)."""
        return self.weights.log() + gaussian_log_prob(self._flat(x), self.means, self.prec_chol, self.config.covariance_type)

    def initialize(self, x: Tensor) -> None:
        x = self._flat(x)
        k = self.config.n_components
        if len(x) < k:
            raise ValueError(f"GMM with {k} components needs at least {k} training examples, got {len(x)}")
        resp = kmeans_responsibilities(x, k, self.config.kmeans_iters, self.config.seed)
        self._set_from_statistics(sufficient_statistics(x, resp, self.config.covariance_type),
                                  torch.tensor(float(len(x)), dtype=DTYPE))

    def e_step(self, x: Tensor) -> Stats:
        joint = self._joint_log_prob(x)
        loglik = torch.logsumexp(joint, 1, keepdim=True)
        resp = (joint - loglik).exp()
        stats = sufficient_statistics(self._flat(x), resp, self.config.covariance_type)
        return {**stats, "loglik": loglik.sum(), "count": torch.tensor(float(len(x)), dtype=DTYPE, device=resp.device)}

    def m_step(self, stats: Stats) -> None:
        self._log_information_criteria(stats["loglik"], stats["count"])
        self._set_from_statistics(stats, stats["count"])

    def _log_information_criteria(self, loglik: Tensor, count: Tensor) -> None:
        """BIC = -2 log L + p log N (Schwarz 1978), AIC = -2 log L + 2 p (Akaike 1974), of the parameters
        this epoch's E-step evaluated (i.e. before its M-step)."""
        p, n = self.n_parameters(), count.item()
        self.log("train/bic", -2 * loglik.item() + p * math.log(n), on_epoch=True, rank_zero_only=True)
        self.log("train/aic", -2 * loglik.item() + 2 * p, on_epoch=True, rank_zero_only=True)

    # --- the contract -------------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of each example (float64): log sum_k w_k N(x | mu_k, Sigma_k)."""
        return torch.logsumexp(self._joint_log_prob(x), 1)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Responsibilities p(k | x), shape (B, K)."""
        return torch.softmax(self._joint_log_prob(x), 1).float()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Ancestral samples; images are clipped to the data space [0, 1]."""
        components = torch.multinomial(self.weights, n, replacement=True)
        x = sample_gaussians(self.means, self.prec_chol, self.config.covariance_type, components)
        return self.to_data_space(x.float().reshape(n, *self.info.shape))
