"""Stage `featnet`: train the small classifier that defines the FID/KID feature space, report its test
accuracy, and measure the real-data floor: FID/KID/precision/recall of the test split against train."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.featnet import FeatNet
from lightning_modules.sample_metrics import extract, fid_kid, precision_recall
from pipeline.datamodule import PreparedDataModule
from pipeline.datasets import prepared_dir
from pipeline.features import FEATNET_FILE, feature_extractor, featnet_dir
from pipeline.train import build_trainer

REPORT = Path("reports") / "featnet.json"


def real_data_floor(cfg, dm: PreparedDataModule) -> dict:
    """How far the test split is from the train split: no model can be expected to do better."""
    features = feature_extractor(cfg, dm.info)
    if features is None:
        return {}
    train, _ = dm.split("train")
    test, _ = dm.split("test")
    torch.manual_seed(cfg.eval.seed)
    out = fid_kid(features, test, train, cfg.eval.kid_subset_size, cfg.eval.kid_subsets, cfg.eval.batch_size)
    out.update(precision_recall(extract(features, test), extract(features, train)))
    return out


def run_featnet(cfg) -> dict:
    out_dir = featnet_dir(cfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dm = PreparedDataModule(prepared_dir(cfg.data), batch_size=cfg.featnet.batch_size, seed=cfg.trainer.seed)
    result = {}
    if dm.info.kind == "image" and cfg.eval.fid.features == "featnet":
        pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        net = FeatNet(dm.info.shape[0], dm.info.num_classes, cfg.featnet.feature_dim, cfg.featnet.lr)
        trainer = build_trainer(cfg, cfg.featnet.max_epochs, out_dir, logger=False, enable_checkpointing=False,
                                devices=1, strategy="auto", num_nodes=1)  # small: never worth several devices
        trainer.fit(net, datamodule=dm)
        result["accuracy"] = trainer.test(net, datamodule=dm, verbose=False)[0]["test/acc"]
        trainer.save_checkpoint(out_dir / FEATNET_FILE)
    result.update(real_data_floor(cfg, dm))
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
