"""Lightning callbacks the train stage attaches to every family."""
from __future__ import annotations

import math
import random

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.errors import GenzooError
from pipeline.evaluation.sample_metrics import fid_metric


def _seed_all(*key: int) -> None:
    s = hash(key) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


class ReseedEachStep(pl.Callback):
    """Seed every RNG from (seed, epoch, rank) at each epoch start, and from (seed, epoch, batch, rank)
    before each training step.

    A step's randomness then does not depend on what ran before it (Lightning creates iterators and
    prefetches at different moments in a fresh and in a resumed run), so a run resumed from a checkpoint
    replays the remaining epochs bit for bit (CPU, deterministic mode)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        _seed_all(self.seed, trainer.current_epoch, trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _seed_all(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)


class FailOnNonFiniteLoss(pl.Callback):
    """Stop with a clear error as soon as a logged training loss is NaN or infinite."""

    def _check(self, trainer, where: str):
        for key, value in trainer.callback_metrics.items():
            if "loss" in key and not math.isfinite(float(value)):
                raise GenzooError(f"non-finite {key} ({float(value)}) at epoch {trainer.current_epoch}, {where}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise GenzooError(f"non-finite training loss at epoch {trainer.current_epoch}, batch {batch_idx}")

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer, "epoch end")


class BestSampleQuality(pl.Callback):
    """Every `every_n_epochs` (and at the last epoch), FID of `n` fresh samples against `real` (the validation
    split), logged as `val/fid`; the checkpoint with the best FID so far is saved to `best_path` (None: the curve
    alone). For the families that declare `sample_quality_every_n_epochs`.

    The FID is a torchmetrics metric kept on the training device: each rank adds its share of the real split
    (once) and of the `n` samples, and computing it sums the feature moments across ranks, so under DDP it is
    the FID of all the samples pooled (not a mean of per-rank FIDs), the same number on every rank: every rank
    takes the same save decision and no rank waits on another."""

    def __init__(self, features: torch.nn.Module, real: torch.Tensor, best_path, every_n_epochs: int, n: int = 500,
                 batch_size: int = 256):
        self.fid = fid_metric(features, reset_real_features=False)  # the real moments survive reset()
        self.real, self.best_path, self.every, self.n, self.batch_size = real, best_path, every_n_epochs, n, batch_size
        self.best = math.inf
        self._real_added = False

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if (trainer.current_epoch + 1) % self.every and not last:
            return
        fid = self.pooled_fid(pl_module, trainer.global_rank, trainer.world_size)
        pl_module.log("val/fid", fid)
        if fid < self.best:
            self.best = fid
            if self.best_path is not None:
                trainer.save_checkpoint(self.best_path, weights_only=True)  # the model alone, as model.ckpt

    @torch.no_grad()
    def pooled_fid(self, pl_module, rank: int, world_size: int) -> float:
        """FID of this rank's share of `n` fresh samples and every other rank's, against the real split (each
        rank holding every world_size-th real example): on every rank at once under DDP."""
        device = pl_module.device
        self.fid.to(device)
        if not self._real_added:
            for chunk in self.real[rank::world_size].split(self.batch_size):
                self.fid.update(chunk.to(device), real=True)
            self._real_added = True
        share = self.n // world_size + (rank < self.n % world_size)
        if share:
            for chunk in pl_module.sample(share).split(self.batch_size):
                self.fid.update(chunk.to(device), real=False)
        fid = float(self.fid.compute())
        self.fid.reset()  # the fakes go; the real moments stay
        return fid

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]
