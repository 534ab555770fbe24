"""The shared shape of EM-style families (GMM, HMM) inside Lightning.

`training_step` runs the E-step on a batch and adds its sufficient statistics to accumulators; the
epoch end all-reduces (sums) them across ranks and runs the M-step. With `exact_sharding` each rank sees
a disjoint shard, so one epoch is one exact EM step whatever the number of devices (Dempster, Laird &
Rubin 1977; the distributed form is the "sum the statistics" map-reduce EM of Chu et al. 2006).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from lightning_modules.contract import GenerativeModel

Stats = Dict[str, Tensor]


class EMModel(GenerativeModel):
    log_prob_kind = "exact"
    exact_sharding = True

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        self.automatic_optimization = False
        self.register_buffer("initialized", torch.tensor(False))
        # last epoch's mean log-likelihood, for the tolerance stop; a buffer so a resumed run stops where
        # an uninterrupted one would
        self.register_buffer("previous_loglik", torch.tensor(float("nan"), dtype=torch.float64))
        # DistributedDataParallel refuses a module with no trainable parameter, and EM keeps its parameters
        # in buffers: this empty one lets Lightning's DDP wrap the module. It never receives a gradient.
        self.ddp_anchor = nn.Parameter(torch.zeros(0))
        self._stats: Stats = {}

    # --- what a family implements -----------------------------------------------------------------
    def initialize(self, x: Tensor) -> None:
        """Set initial parameters from a seeded subsample of the training data (same on every rank)."""
        raise NotImplementedError

    def e_step(self, x: Tensor) -> Stats:
        """Sufficient statistics of a batch, summed over its examples. Must include `loglik` (sum of
        per-example log-likelihoods under the current parameters) and `count`."""
        raise NotImplementedError

    def m_step(self, stats: Stats) -> None:
        raise NotImplementedError

    # --- Lightning plumbing -------------------------------------------------------------------------
    def configure_optimizers(self):
        return None

    def on_train_epoch_start(self) -> None:
        if not bool(self.initialized):
            x, _ = self.trainer.datamodule.split("train")
            g = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
            n = min(len(x), int(self.cfg.get("init_subsample", 10_000)))
            idx = torch.randperm(len(x), generator=g)[:n]
            self.initialize(x[idx].to(self.device))
            self.initialized.fill_(True)
        self._stats = {}

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for k, v in self.e_step(x).items():
            self._stats[k] = self._stats[k] + v if k in self._stats else v.detach().clone()

    def on_train_epoch_end(self) -> None:
        stats = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._stats.items())}
        loglik = (stats["loglik"] / stats["count"]).item()
        self.m_step(stats)
        self.log("train/loglik", loglik, on_epoch=True, rank_zero_only=True)
        self.log("train/loss", -loglik, on_epoch=True, rank_zero_only=True)
        tol = float(self.cfg.get("tol", 0.0))
        if abs(loglik - self.previous_loglik.item()) < tol:  # False while previous is NaN
            self.trainer.should_stop = True
        self.previous_loglik.fill_(loglik)

    def validation_step(self, batch, batch_idx):
        nll = -self.log_prob(batch[0]).mean()
        self.log("val/loss", nll, on_epoch=True, sync_dist=True, batch_size=len(batch[0]))
