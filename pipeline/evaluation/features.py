"""The feature space for FID/KID/precision-recall: the featnet stage's classifier, InceptionV3 from a
local weights file, or the raw data for vectors. None where no image-like feature space exists."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lightning_modules.contract import DataInfo
from pipeline.errors import GenzooError
from pipeline.evaluation.featnet import FeatNet, IdentityFeatures
from pipeline.paths import FEATNET_FILE, featnet_dir


class InceptionFeatures(nn.Module):
    """torchmetrics' FID InceptionV3 (2048-d pool features) from a local weights file, on [0, 1] images."""

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if not Path(weights_path).is_file():
            raise GenzooError(f"eval.fid.inception_weights: {weights_path} not found")
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)
        self.num_features = 2048

    def forward(self, x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.net((x.clamp(0, 1) * 255).to(torch.uint8))


def feature_extractor(cfg, info: DataInfo) -> Optional[nn.Module]:
    if info.kind == "vector":
        return IdentityFeatures(info.dim)
    if info.kind != "image":
        return None
    if cfg.eval.fid.features == "inception":
        return InceptionFeatures(cfg.eval.fid.inception_weights).eval()
    return load_featnet(cfg).features


def load_featnet(cfg) -> FeatNet:
    """The featnet stage's classifier (its `features` are the FID feature space)."""
    path = featnet_dir(cfg) / FEATNET_FILE
    if not path.is_file():
        raise GenzooError(f"{path} not found: run `genzoo featnet` (or `dvc repro featnet`) first")
    try:
        net = FeatNet.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenzooError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return net.eval()


def label_classifier(cfg, info: DataInfo) -> Optional[nn.Module]:
    """The featnet classifier that judges whether class-conditional samples obey their label; None where the
    pipeline trains none (non-image data, or Inception features)."""
    if info.kind != "image" or not info.num_classes or cfg.eval.fid.features != "featnet":
        return None
    return load_featnet(cfg)
