"""Lightning callbacks the train stage attaches to every family."""
from __future__ import annotations

import math
import random

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.errors import GenzooError
from pipeline.evaluation.sample_metrics import fid_kid


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
    """Every `every_n_epochs`, FID of `n` fresh samples against `real` (the validation split), logged as
    `val/fid`; the checkpoint with the best FID so far is saved to `best_path`. For the families that
    declare `sample_quality_every_n_epochs`.

    Runs on every rank (each rank's FID of its own samples, averaged across ranks), so every rank takes
    the same save decision and no rank waits on another."""

    def __init__(self, features: torch.nn.Module, real: torch.Tensor, best_path, every_n_epochs: int, n: int = 500):
        self.features, self.real, self.best_path, self.every, self.n = features, real, best_path, every_n_epochs, n
        self.best = math.inf

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if (trainer.current_epoch + 1) % self.every and not last:
            return
        with torch.no_grad():
            fake = pl_module.sample(self.n).cpu()
        self.features.to("cpu")
        fid = fid_kid(self.features, self.real, fake)["fid"]
        fid = float(trainer.strategy.reduce(torch.tensor(fid), reduce_op="mean"))
        pl_module.log("val/fid", fid)
        if fid < self.best:
            self.best = fid
            trainer.save_checkpoint(self.best_path)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]
