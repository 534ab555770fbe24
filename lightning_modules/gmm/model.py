"""Gaussian mixture model trained by exact EM inside Lightning (Dempster, Laird & Rubin 1977; Bishop 2006,
sec. 9.2). One epoch = one EM step: `e_step` turns each batch into responsibility-weighted sufficient
statistics, EMModel sums them over batches and ranks, `m_step` re-estimates weights, means and
covariances. Parameters live in float64 buffers of fixed shape, so checkpoints load with weights_only.

Conditional (P(X, Y)): one mixture of `class_components` Gaussians per class, in block layout
(`common.class_blocks`): K * M Gaussians, weights p(component | class) normalised within each class's
block, and a labelled example's responsibilities confined to its class's block, so one EM step trains
every class's mixture exactly as a separate fit on that class's data would. `tied` shares one covariance
across all components of all classes (with one component per class: linear discriminant analysis).
Semi-supervised (UNLABELLED training labels, `common.semi_supervised`): an unlabelled example's
responsibilities spread over every class's block, p(class, component | x), and p(y) is re-estimated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_modules.common import class_blocks, semi_supervised
from lightning_modules.common.em import DTYPE, PRECISION_DTYPES, EMModel, Precision, Stats, sum_stats
from lightning_modules.common.gaussian import (CovarianceType, estimate_gaussians, gaussian_log_prob,
                                               n_covariance_parameters, precision_cholesky, sample_gaussians,
                                               sufficient_statistics, unit_covariances)
from lightning_modules.common.kmeans import kmeans_responsibilities
from lightning_modules.contract import Conditional, TrainingSet, require, require_range


E_STEP_ROWS = 1024  # rows per E-step block: its (rows, K, D) temporaries stay in cache (about 2x faster than 16384)


class GMM(EMModel):
    family = "gmm"

    @dataclass
    class Config:
        n_components: int = 10
        covariance_type: CovarianceType = "full"
        reg_covar: float = 1e-3  # added to every variance; digits are dequantised to [0, 1] in 1/17 bins
        # reg_covar when some training labels are UNLABELLED (semi-supervised EM and its initial guesses;
        # null: reg_covar). The unlabelled examples' class posteriors then decide the fit, and a coarser
        # floor keeps them from hinging on near-constant pixels (digits, 10 labels per class, 3 seeds:
        # test accuracy 0.929 with null, 0.956 with 1e-2)
        semi_reg_covar: Optional[float] = 1e-2
        max_epochs: int = 100  # = EM iterations
        tol: float = 1e-4  # stop when the mean train log-likelihood changes by less
        init_subsample: int = 10_000  # k-means++ and Lloyd run on this many seeded training examples
        kmeans_iters: int = 10
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone
        # conditional: Gaussians per class (n_components is the unconditional mixture's). One full-covariance
        # Gaussian per class has as many parameters as the 10-component P(X) mixture on digits and beats it
        # in test NLL; 10 per class (~12 training digits each) overfit (NLL 249 vs 119)
        class_components: int = 1
        # the E-step's arithmetic; float32: 0.59x float64's EM step (N = 1e5, D = 64, K = 10, full; BENCHMARKS.md),
        # the log-likelihood within 1e-6 relative (tests/test_gmm.py); parameters and statistics stay float64
        precision: Precision = "float64"

        def __post_init__(self):
            require_range(self, "n_components", "class_components", "init_subsample", low=1)
            require_range(self, "kmeans_iters", low=0)  # 0: the k-means++ seeds alone
            require_range(self, "reg_covar", "tol", low=0)
            require_range(self, "semi_reg_covar", low=0, optional=True)

        def fits_data(self, data: TrainingSet) -> None:
            """k-means starts the mixture (conditional: each class's block) from distinct training examples,
            at least one per component."""
            if data.class_counts is None:
                require(self.n_components <= data.n_examples, "n_components",
                        f"must be <= {data.n_examples} (the training examples), not {self.n_components}")
                require(self.init_subsample >= self.n_components, "init_subsample",
                        f"must be >= {self.n_components} (n_components: k-means starts each component from one of "
                        f"these examples), not {self.init_subsample}")
            elif not data.n_unlabelled:  # semi-supervised: the unlabelled examples' guessed classes count too
                fewest = min(range(len(data.class_counts)), key=data.class_counts.__getitem__)
                require(self.class_components <= data.class_counts[fewest], "class_components",
                        f"must be <= {data.class_counts[fewest]} (the training examples of class {fewest}, the "
                        f"fewest), not {self.class_components}")

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        # K blocks (classes; 1 when unconditional) of `block_size` Gaussians
        self.n_blocks = self.num_classes or 1
        self.block_size = c.class_components if self.conditional else c.n_components
        k, d = self.n_blocks * self.block_size, self.info.dim
        self.register_buffer("weights", torch.full((k,), 1.0 / self.block_size, dtype=DTYPE))
        self.register_buffer("means", torch.zeros(k, d, dtype=DTYPE))
        self.register_buffer("prec_chol", unit_covariances(k, d, c.covariance_type).to(DTYPE))  # = its Cholesky

    # --- parameters ---------------------------------------------------------------------------------
    def set_parameters(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Set the mixture directly (covariances shaped as in `gaussian.covariance_shape`; conditional:
        the K * M components class by class, each class's weights summing to 1)."""
        self.weights.copy_(weights)
        self.means.copy_(means)
        self.prec_chol.copy_(precision_cholesky(covariances.to(DTYPE), self.config.covariance_type))
        self.initialized.fill_(True)

    def _set_from_statistics(self, stats: Stats, count: Tensor, semi: bool) -> None:
        """From statistics about `_shift()` of the current parameters."""
        means, cov = estimate_gaussians(stats["nk"], stats["sx"], stats["sxx"], self.config.covariance_type,
                                        self.variance_floor(semi))
        means = means + self._shift()
        nk = stats["nk"] + 10 * torch.finfo(DTYPE).eps
        # conditional: p(component | class), normalised within each class's block (as scikit-learn does)
        weights = class_blocks.normalize_blocks(nk, self.n_blocks) if self.conditional else nk / count
        self.set_parameters(weights, means, cov)

    def n_parameters(self) -> int:
        """Weights, means and covariances of every class's mixture, and K - 1 for the class prior."""
        k, d = len(self.weights), self.info.dim
        labels, weights = self.n_blocks - 1, k - self.n_blocks
        return labels + weights + k * d + n_covariance_parameters(k, d, self.config.covariance_type)

    # --- EM -----------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1).to(device=self.means.device, dtype=DTYPE)

    def _shift(self) -> Tensor:
        """The point the E-step's arithmetic and its statistics are taken about: the mean of the component means.
        Statistics about a point near the data keep float32's sums of squares from cancelling (sum r x x^T -
        n mu mu^T); the covariances do not depend on it, and the M-step adds it back to the means."""
        return self.means.mean(0)

    def _joint_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x_n | mu_k, Sigma_k), shape (N, K) (conditional: w_k = p(k | its class)), in float64."""
        return self._shifted_joint_log_prob(self._flat(x) - self._shift())

    def _shifted_joint_log_prob(self, xs: Tensor) -> Tensor:
        """`_joint_log_prob` of xs = x - `_shift()` (flattened), computed in xs's dtype, returned in float64."""
        means, prec_chol = (self.means - self._shift()).to(xs.dtype), self.prec_chol.to(xs.dtype)
        return self.weights.log() + gaussian_log_prob(xs, means, prec_chol, self.config.covariance_type).to(DTYPE)

    def initialize(self, x: Tensor, y: Optional[Tensor] = None, semi: bool = False) -> None:
        """k-means responsibilities (conditional: on each class's examples, in its block), then an M-step."""
        x = self._flat(x)
        k, iters, seed = self.block_size, self.config.kmeans_iters, self.config.seed
        if len(x) < k:
            raise ValueError(f"GMM with {k} components needs at least {k} training examples, got {len(x)}")
        if self.conditional:
            states = class_blocks.block_states(self.n_blocks, k)
            resp = class_blocks.grouped_kmeans_responsibilities(x, y.to(x.device), states, iters, seed)
        else:
            resp = kmeans_responsibilities(x, k, iters, seed)
        self._set_from_statistics(sufficient_statistics(x - self._shift(), resp, self.config.covariance_type),
                                  torch.tensor(float(len(x)), dtype=DTYPE), semi)

    def e_step(self, x: Tensor, y: Optional[Tensor] = None) -> Stats:
        """The statistics of x (about `_shift()`), summed over blocks of `E_STEP_ROWS` examples."""
        dtype = PRECISION_DTYPES[self.config.precision]
        x = (self._flat(x) - self._shift()).to(dtype)
        blocks = range(0, len(x), E_STEP_ROWS)
        return sum_stats([self._e_step_block(x[i:i + E_STEP_ROWS], None if y is None else y[i:i + E_STEP_ROWS])
                          for i in blocks])

    def _e_step_block(self, x: Tensor, y: Optional[Tensor]) -> Stats:
        joint = self._shifted_joint_log_prob(x)
        if self.conditional:
            # a known label: only its class's components can have produced x; UNLABELLED: every class's,
            # weighted by p(class), so resp = p(class, component | x) (`common.semi_supervised`)
            y = y.to(joint.device)
            class_weights = semi_supervised.class_log_weights(y, self.label_log_prior)
            joint = joint + class_blocks.repeat_per_block(class_weights, self.block_size)
        loglik = torch.logsumexp(joint, 1, keepdim=True)
        resp = (joint - loglik).exp()
        stats = {k: v.to(DTYPE) for k, v in
                 sufficient_statistics(x, resp.to(x.dtype), self.config.covariance_type).items()}
        if self.conditional:  # the class prior's statistics, and log p(y) for the joint BIC / AIC
            class_resp = resp.unflatten(1, (self.n_blocks, self.block_size)).sum(2)
            stats.update(semi_supervised.class_statistics(class_resp, y, self.label_log_prior))
        return {**stats, "loglik": loglik.sum(), "count": torch.tensor(float(len(x)), dtype=DTYPE, device=resp.device)}

    def m_step(self, stats: Stats) -> None:
        # conditional: the criteria are the joint model's, log L = sum_n log p(x_n | y_n) + log p(y_n)
        # (an UNLABELLED example's loglik is already log p(x_n))
        self._log_information_criteria(stats["loglik"] + stats.get("label_loglik", 0.0), stats["count"])
        super().m_step(stats)

    def maximize(self, stats: Stats, semi: bool) -> None:
        self._set_from_statistics(stats, stats["count"], semi)

    def _log_information_criteria(self, loglik: Tensor, count: Tensor) -> None:
        """BIC = -2 log L + p log N (Schwarz 1978), AIC = -2 log L + 2 p (Akaike 1974), of the parameters
        this epoch's E-step evaluated (i.e. before its M-step)."""
        p, n = self.n_parameters(), count.item()
        self.log("train/bic", -2 * loglik.item() + p * math.log(n), on_epoch=True, rank_zero_only=True)
        self.log("train/aic", -2 * loglik.item() + 2 * p, on_epoch=True, rank_zero_only=True)

    # --- the contract -------------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Exact log-density of each example (float64): log sum_k w_k N(x | mu_k, Sigma_k); conditional:
        over class y's components, or the marginal over classes when y is None."""
        self.no_labels_unless_conditional(y)
        if not self.conditional:
            return torch.logsumexp(self._joint_log_prob(x), 1)
        if y is None:
            return self.marginal_log_prob(x)
        return self.class_log_likelihoods(x).gather(1, y.to(self.means.device)[:, None]).squeeze(1)

    @torch.no_grad()
    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """log p(x | y = c) for every class in one pass: a log-sum-exp within each class's block, (B, K)."""
        self._require_conditional()
        return class_blocks.block_logsumexp(self._joint_log_prob(x), self.n_blocks)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Responsibilities p(k | x), shape (B, K); conditional: p(class, component | x), (B, K * M)."""
        joint = self._joint_log_prob(x)
        if self.conditional:
            joint = joint + class_blocks.repeat_per_block(self.class_log_prior(), self.block_size).to(joint)
        return torch.softmax(joint, 1).float()

    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        """Ancestral samples (conditional: of classes y, or y ~ p(y)); images are clipped to [0, 1]."""
        self.no_labels_unless_conditional(y)
        if self.conditional:
            components = class_blocks.sample_in_blocks(self.weights, self.sample_labels(n, y), self.n_blocks)
        else:
            components = torch.multinomial(self.weights, n, replacement=True)
        x = sample_gaussians(self.means, self.prec_chol, self.config.covariance_type, components)
        return self.to_data_space(x.float().reshape(n, *self.info.shape))
