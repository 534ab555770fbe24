"""Stage `train@<family>`: seed -> data -> model -> callbacks -> logger -> trainer -> fit -> checkpoint.

Outputs in `data/models/<family>/` (a sweep point's in `data/sweeps/<family>/<point>/`): `model.ckpt` (what
evaluate loads), `last.ckpt` (for resuming), `mlflow_run.json` (the run evaluate reopens) and `state.json`
(config hash, finished or not). A run interrupted with the same config resumes from `last.ckpt` into the same
MLflow run. The run is named `<family>-<dataset slug>[-<point>]` and holds the params of `data`, `trainer`,
`eval` and its own family's section.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.contract import UNLABELLED, ConfigError, TrainingDiverged
from lightning_modules.registry import FAMILIES, family_class
from pipeline import tracking
from pipeline.callbacks import BestSampleQuality, FailOnNonFiniteLoss, ReseedEachStep
from pipeline.checkpoints import check_same_data, checkpoint_data, trained_on_of
from pipeline.config import family_section, flatten, require_family
from pipeline.errors import GenzooError
from pipeline.evaluation.features import feature_extractor
from pipeline.paths import STATE_FILE, copy_atomic, models_dir, write_text_atomic
from pipeline.run_logger import ResumableMLFlowLogger
from pipeline.runtime import build_trainer, check_fits_data, datamodule_for, peak_memory_mb


def config_hash(cfg, family: str) -> str:
    relevant = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "trainer", family)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def resolve_conditional(section: dict, info, train_labels) -> dict:
    """`conditional: auto` -> true when the data have labels and every class has training examples
    (a held-out class has none; UNLABELLED is no class), else false; an explicit true / false stays."""
    if section.get("conditional", "auto") != "auto":
        return section
    labels = torch.as_tensor(train_labels)
    present = torch.unique(labels[labels != UNLABELLED]).numel() if info.num_classes else 0
    return {**section, "conditional": bool(info.num_classes) and present == info.num_classes}


def build_model(cls, section: dict, info):
    """The family for this data; a setting that does not fit the data is one error line naming the key."""
    if info.vocab_size is not None and not cls.models_tokens:
        discrete = [f for f in FAMILIES if family_class(f).models_tokens]
        raise GenzooError(f"{cls.family} models continuous data, and this dataset holds integer tokens (a vocabulary "
                          f"of {info.vocab_size}): its NLL would not be a discrete one; use {' or '.join(discrete)}")
    try:
        return cls(section, info.to_dict())
    except ConfigError as e:
        raise GenzooError(f"bad value for config key '{cls.family}.{e.key}': {e.message}") from None
    except ValueError as e:  # e.g. an image too small for the configured number of scales
        raise GenzooError(f"{cls.family} cannot be built for this data: {str(e).splitlines()[0]}") from None


def _resume_point(cfg, family: str, model_dir: Path):
    """(checkpoint, run id) to resume from, or (None, None) for a fresh start (which clears the folder)."""
    state_path = model_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    last = model_dir / "last.ckpt"
    same_config = state.get("config_hash") == config_hash(cfg, family)
    interrupted = same_config and not state.get("finished", True) and last.is_file()
    if cfg.resume and not last.is_file():
        raise GenzooError(f"resume=true but {last} does not exist")
    if cfg.resume or interrupted:
        return last, state.get("run_id")
    return None, None


RUN_PARAM_SECTIONS = ("data", "trainer", "eval")  # and the family's own section


def run_params(cfg, family: str) -> dict:
    """The MLflow params of a family's run: `data.*`, `trainer.*`, `eval.*` and `<family>.*` (not the other
    families' sections, which it never reads)."""
    sections = (*RUN_PARAM_SECTIONS, family)
    return {k: v for k, v in flatten(cfg).items() if k.split(".", 1)[0] in sections}


def train(cfg, point=None) -> Path:
    """`point`: a sweep point (`pipeline.sweeps.SweepPoint`), trained into its own folder and run."""
    family = require_family(cfg)
    cls = family_class(family)
    if "fsdp" in str(cfg.trainer.strategy) and not cls.supports_fsdp:
        sharding = [f for f in FAMILIES if family_class(f).supports_fsdp]
        raise GenzooError(f"trainer.strategy={cfg.trainer.strategy}: {family} does not shard its parameters; "
                          f"use ddp (FSDP is for {', '.join(sharding)})")
    model_dir = models_dir(cfg, family, point.slug if point is not None else None)
    resume_ckpt, resume_run = _resume_point(cfg, family, model_dir)

    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dm = datamodule_for(cfg, cls, hide_unlabelled=True)  # a semi-supervised split's hidden labels are UNLABELLED
    if resume_ckpt is not None:
        check_same_data(checkpoint_data(resume_ckpt), dm.manifest, resume_ckpt, family)
    train_y = dm.labels("train")  # the data itself is read inside the MLflow run (a bad file fails the run)
    model = build_model(cls, resolve_conditional(family_section(cfg, family), dm.info, train_y), dm.info)
    check_fits_data(model, train_y)  # settings that must fit the training set, before the MLflow run opens
    model.trained_on = trained_on_of(dm.manifest)
    if model.conditional:
        model.set_class_prior(train_y)

    tracking.ensure_store(tracking.tracking_uri(cfg), tracking.experiment_name(cfg))
    logger = ResumableMLFlowLogger(experiment_name=tracking.experiment_name(cfg), tracking_uri=tracking.tracking_uri(cfg),
                          run_id=resume_run, tags=None if resume_run else tracking.run_tags(cfg, family, dm.manifest, point),
                          run_name=tracking.run_name(cfg, family, point), log_model=False)
    callbacks = [ReseedEachStep(cfg.trainer.seed), FailOnNonFiniteLoss(),
                 # no monitor + top-1: `last.ckpt` rewritten (atomically) after every epoch, the resume point
                 ModelCheckpoint(dirpath=model_dir, filename="last", save_top_k=1, enable_version_counter=False)]
    every = model.sample_quality_every_n_epochs()
    features = feature_extractor(cfg, dm.info) if every else None
    if features is not None:
        best_path = model_dir / "best.ckpt" if model.selects_on_sample_quality() else None
        callbacks.append(BestSampleQuality(features, dm.split("val")[0], best_path, every))
    # the data module shards per rank itself (pipeline.data.datamodule), so Lightning must not re-wrap it
    trainer = build_trainer(cfg, model.config.max_epochs, model_dir, logger=logger, callbacks=callbacks,
                            use_distributed_sampler=False)

    if trainer.is_global_zero:
        if resume_ckpt is None:
            shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True, exist_ok=True)
        if resume_ckpt is None:  # a resumed run already holds its params (MLflow params are write-once)
            logger.log_hyperparams(run_params(cfg, family))
        else:  # the sweep (and DVC experiment) it is resumed in now
            for key, value in tracking.context_tags(point).items():
                logger.experiment.set_tag(logger.run_id, key, value)
        write_text_atomic(model_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        tracking.write_run_file(model_dir, logger.run_id, logger.experiment_id, tracking.tracking_uri(cfg))
        _write_state(model_dir, cfg, family, logger.run_id, model.trained_on, finished=False)

    fit_model = torch.compile(model) if cfg.trainer.compile else model
    start = time.perf_counter()
    with tracking.failing_marks_run(cfg, lambda: logger.run_id if trainer.is_global_zero else None):
        if trainer.is_global_zero and resume_ckpt is None:  # the data set as the run's input (read once: fit reuses it)
            tracking.log_dataset_input(logger.experiment, logger.run_id, cfg, dm.manifest, *dm.raw("train"), "training")
        if cls.needs_init_data:
            model.provide_init_data(dm.split("train")[0], train_y)
        try:
            trainer.fit(fit_model, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None, weights_only=True)
        except TrainingDiverged as e:  # e.g. a GAN whose discriminator won: no model, the run FAILED
            raise GenzooError(f"training diverged: {e}") from None
        if trainer.interrupted:
            raise GenzooError("training was interrupted")
        seconds = time.perf_counter() - start
        final = model_dir / "model.ckpt"
        trainer.save_checkpoint(final, weights_only=True)  # the model alone: evaluate and sample load it
        if trainer.is_global_zero:
            best = model_dir / "best.ckpt"
            if best.is_file():
                copy_atomic(best, final)
            cost = {"train_seconds": seconds, "parameters": float(model.n_parameters()),
                    "peak_memory_mb": peak_memory_mb()}
            _log_outputs(logger, model_dir, cost)
            _write_state(model_dir, cfg, family, logger.run_id, model.trained_on, finished=True, cost=cost)
    return model_dir


def _log_outputs(logger: ResumableMLFlowLogger, model_dir: Path, cost: dict) -> None:
    run_id, exp = logger.run_id, logger.experiment
    for k, v in cost.items():
        exp.log_metric(run_id, f"perf/{k}", v)
    exp.log_artifact(run_id, str(model_dir / "config.yaml"))
    exp.log_artifact(run_id, str(model_dir / "model.ckpt"), artifact_path="checkpoint")


def _write_state(model_dir: Path, cfg, family: str, run_id: str, trained_on: dict, finished: bool, cost=None) -> None:
    state = {"config_hash": config_hash(cfg, family), "run_id": run_id, "trained_on": trained_on,
             "finished": finished, "cost": cost or {}}
    write_text_atomic(model_dir / STATE_FILE, json.dumps(state) + "\n")  # never half a state.json
