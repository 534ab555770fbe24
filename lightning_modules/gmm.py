"""Gaussian mixture model trained by exact EM inside Lightning (Dempster, Laird & Rubin 1977; Bishop 2006,
sec. 9.2). One epoch = one EM step: `e_step` turns each batch into responsibility-weighted sufficient
statistics, EMModel sums them over batches and ranks, `m_step` re-estimates weights, means and
covariances. Parameters live in float64 buffers of fixed shape, so checkpoints load with weights_only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_modules.em import EMModel, Stats
from lightning_modules.gaussian import (check_covariance_type, estimate_gaussians, gaussian_log_prob,
                                        n_covariance_parameters, precision_cholesky, sample_gaussians,
                                        sufficient_statistics, unit_covariances)

DTYPE = torch.float64


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


class GMM(EMModel):
    family = "gmm"

    @dataclass
    class Config:
        n_components: int = 10
        covariance_type: str = "full"  # full | tied | diag | spherical
        reg_covar: float = 1e-3  # added to every variance; digits are dequantised to [0, 1] in 1/17 bins
        max_epochs: int = 100  # = EM iterations
        tol: float = 1e-4  # stop when the mean train log-likelihood changes by less
        init_subsample: int = 10_000  # k-means++ and Lloyd run on this many seeded training examples
        kmeans_iters: int = 10
        seed: int = 0

    def __init__(self, cfg: dict, info: dict):
        config = self.Config(**cfg)  # fills defaults, rejects unknown keys
        check_covariance_type(config.covariance_type)
        super().__init__(asdict(config), info)
        self.config = config
        k, d = config.n_components, self.info.dim
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=DTYPE))
        self.register_buffer("means", torch.zeros(k, d, dtype=DTYPE))
        self.register_buffer("prec_chol", unit_covariances(k, d, config.covariance_type).to(DTYPE))  # = its Cholesky

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
        g = torch.Generator().manual_seed(self.config.seed)
        labels = lloyd(x, kmeans_plusplus(x.cpu(), k, g).to(x.device), self.config.kmeans_iters)
        resp = torch.nn.functional.one_hot(labels, k).to(DTYPE)
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
        x = x.float().reshape(n, *self.info.shape)
        return x.clamp(0, 1) if self.info.kind == "image" else x
