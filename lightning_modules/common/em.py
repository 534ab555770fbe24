"""The shared shape of EM-style families (GMM, HMM) inside Lightning, and the same loop without one.

`training_step` runs the E-step on a batch and adds its sufficient statistics to accumulators; the
epoch end all-reduces (sums) them across ranks and runs the M-step. With `exact_sharding` each rank sees
a disjoint shard, so one epoch is one exact EM step whatever the number of devices (Dempster, Laird &
Rubin 1977; the distributed form is the "sum the statistics" map-reduce EM of Chu et al. 2006).
`fit_em` runs the same `initialize` / `e_step` / `m_step` on in-memory data (tests).

A conditional model (P(X, Y), `lightning_modules.common.class_blocks`) gets the labels too: `initialize(x, y)`
and `e_step(x, y)`; an unconditional one is called with x alone, as before.

An EM family's Config has `seed`, `init_subsample` and `tol` fields.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from lightning_modules.contract import GenerativeModel

Stats = Dict[str, Tensor]
DTYPE = torch.float64  # EM parameters and statistics


class EMModel(GenerativeModel):
    log_prob_kind = "exact"
    exact_sharding = True
    needs_init_data = True

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        self.automatic_optimization = False
        self.register_buffer("initialized", torch.tensor(False))
        # last epoch's mean log-likelihood, for the tolerance stop; a buffer so a resumed run stops where
        # an uninterrupted one would
        self.register_buffer("previous_loglik", torch.tensor(float("nan"), dtype=DTYPE))
        # DistributedDataParallel refuses a module with no trainable parameter, and EM keeps its parameters
        # in buffers: this empty one lets Lightning's DDP wrap the module. It never receives a gradient.
        self.ddp_anchor = nn.Parameter(torch.zeros(0))
        self._stats: Stats = {}

    # --- what a family implements -----------------------------------------------------------------
    def initialize(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """Set initial parameters from a seeded subsample of the training data (same on every rank);
        `y`: its labels, for a conditional model."""
        raise NotImplementedError

    def e_step(self, x: Tensor, y: Optional[Tensor] = None) -> Stats:
        """Sufficient statistics of a batch, summed over its examples. Must include `loglik` (sum of
        per-example log-likelihoods under the current parameters: log p(x | y) for a conditional model)
        and `count`."""
        raise NotImplementedError

    def m_step(self, stats: Stats) -> None:
        raise NotImplementedError

    # --- Lightning plumbing -------------------------------------------------------------------------
    def configure_optimizers(self):
        return None

    def on_train_epoch_start(self) -> None:
        if not bool(self.initialized):
            x = self.init_data()
            g = torch.Generator().manual_seed(self.config.seed)
            n = min(len(x), self.config.init_subsample)
            idx = torch.randperm(len(x), generator=g)[:n]
            if self.conditional:
                self.initialize(x[idx].to(self.device), self.init_labels()[idx].to(self.device))
            else:
                self.initialize(x[idx].to(self.device))
            self.initialized.fill_(True)
        self._stats = {}

    def training_step(self, batch, batch_idx):
        stats = self.e_step(batch[0], batch[1]) if self.conditional else self.e_step(batch[0])
        for k, v in stats.items():
            self._stats[k] = self._stats[k] + v if k in self._stats else v.detach().clone()

    def on_train_epoch_end(self) -> None:
        stats = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._stats.items())}
        loglik = (stats["loglik"] / stats["count"]).item()
        self.m_step(stats)
        self.log("train/loglik", loglik, on_epoch=True, rank_zero_only=True)
        self.log("train/loss", -loglik, on_epoch=True, rank_zero_only=True)
        if abs(loglik - self.previous_loglik.item()) < self.config.tol:  # False while previous is NaN
            self.trainer.should_stop = True
        self.previous_loglik.fill_(loglik)

    def validation_step(self, batch, batch_idx):
        nll = -self.log_prob(batch[0]).mean()
        self.log("val/loss", nll, on_epoch=True, sync_dist=True, batch_size=len(batch[0]))


def fit_em(model: EMModel, x: Tensor, max_iter: int, tol: float = 0.0, y: Optional[Tensor] = None) -> List[float]:
    """Runs up to `max_iter` EM steps on all of x (with its labels y for a conditional model); returns the
    mean log-likelihood per example seen by each E-step (under the parameters before its M-step). Stops
    when it changes by less than `tol`."""
    model.no_labels_unless_conditional(y)
    if model.conditional and y is None:
        raise ValueError(f"this {model.family} model is conditional: fit it with the labels y")
    args = (x, y) if model.conditional else (x,)
    if not bool(model.initialized):
        model.initialize(*args)
        model.initialized.fill_(True)
    history: List[float] = []
    for _ in range(max_iter):
        stats = model.e_step(*args)
        history.append((stats["loglik"] / stats["count"]).item())
        model.m_step(stats)
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            break
    return history
