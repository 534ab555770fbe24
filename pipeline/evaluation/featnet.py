"""The small classifier whose penultimate layer replaces InceptionV3 as the FID/KID feature space.

Trained on the train split by its own DVC stage (Inception weights cannot be downloaded here; a user
can still point `eval.fid.inception_weights` at a local file). For vector data the features are the
data itself (`IdentityFeatures`): FID then is the Fréchet distance of the raw 2-D points.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvFeatures(nn.Module):
    """conv stack -> global average pool -> linear: (B, C, H, W) in [0, 1] -> (B, feature_dim)."""

    def __init__(self, channels: int, feature_dim: int):
        super().__init__()
        self.num_features = feature_dim  # torchmetrics reads this instead of probing the net
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, feature_dim),
            # unit-scale features: KID's cubic kernel (x.y/d + 1)^3 assumes Inception-like magnitudes
            nn.LayerNorm(feature_dim, elementwise_affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float())


class IdentityFeatures(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).float()


class FeatNet(pl.LightningModule):
    def __init__(self, channels: int, num_classes: int, feature_dim: int = 64, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.features = ConvFeatures(channels, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        self.log(f"{stage}/acc", acc, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
