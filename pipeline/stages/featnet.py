"""Stage `featnet`: train the small classifier that defines the FID/KID feature space, report its test
accuracy, and measure the real-data row: FID/KID/precision/recall of the test split against train (the
floor), and on labelled data the discriminative baselines (logistic regression, the real-data CAS; with
`data.labels_per_class`, the same trained on the labelled examples alone); on token data the smoothed unigram
and bigram models' test perplexity."""
from __future__ import annotations

import json
import shutil

import pytorch_lightning as pl
import torch

from pipeline.evaluation.conditional import real_data_baselines, semi_supervised_baselines
from pipeline.evaluation.featnet import FeatNet
from pipeline.evaluation.features import feature_extractor
from pipeline.evaluation.scoring import real_data_floor
from pipeline.evaluation.token_baselines import ngram_baselines
from pipeline.paths import FEATNET_FILE, FEATNET_REPORT, featnet_dir
from pipeline.runtime import build_trainer, datamodule_for


def run_featnet(cfg) -> dict:
    out_dir = featnet_dir(cfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dm = datamodule_for(cfg, batch_size=cfg.featnet.batch_size)
    result = {}
    if dm.info.kind == "image" and cfg.eval.fid.features == "featnet":
        pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        net = FeatNet(dm.info.shape[0], dm.info.num_classes, cfg.featnet.feature_dim, cfg.featnet.lr)
        trainer = build_trainer(cfg, cfg.featnet.max_epochs, out_dir, logger=False, enable_checkpointing=False,
                                devices=1, strategy="auto", num_nodes=1)  # small: never worth several devices
        trainer.fit(net, datamodule=dm)
        result["accuracy"] = trainer.test(net, datamodule=dm, verbose=False)[0]["test/acc"]
        trainer.save_checkpoint(out_dir / FEATNET_FILE, weights_only=True)
    features = feature_extractor(cfg, dm.info)
    if features is not None:
        result.update(real_data_floor(features, dm, cfg.eval))
    if dm.info.num_classes and dm.info.kind in ("image", "vector"):
        result.update(real_data_baselines(dm.split("train"), dm.split("test"), dm.info.kind, dm.info.num_classes,
                                          cfg.featnet, cfg.eval))
        if dm.labelled is not None:  # data.labels_per_class: the baselines on the labelled examples alone
            result.update(semi_supervised_baselines(dm.split("train"), torch.from_numpy(dm.labelled), dm.split("test"),
                                                    dm.info.kind, dm.info.num_classes, cfg.featnet, cfg.eval))
    if dm.info.vocab_size:
        train, val, test = (dm.split(s)[0] for s in ("train", "val", "test"))
        result["ngram"] = ngram_baselines(train, val, test, dm.info.vocab_size)
    FEATNET_REPORT.parent.mkdir(exist_ok=True)
    FEATNET_REPORT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
