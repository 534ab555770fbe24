"""Stage `evaluate@<family>`: reopen the family's MLflow run, score the model through the contract,
log `test/*` metrics and the sample grid, write `reports/families/<family>.json` (only when everything worked).
A sweep point's model and report are its own (`data/sweeps/<family>/<point>/`, `reports/sweeps/<family>/<point>/`).
With `tracking.register` the logged model is registered as `genzoo-<dataset slug>-<family>`, and its version
takes the alias `champion` when it beats the champion's `tracking.champion_metric`."""
from __future__ import annotations

import json
import logging

from lightning_modules.registry import family_class
from pipeline import tracking
from pipeline.checkpoints import check_same_data, load_model
from pipeline.config import require_family
from pipeline.errors import GenzooError
from pipeline.evaluation.features import feature_extractor, label_classifier
from pipeline.evaluation.scoring import score
from pipeline.paths import STATE_FILE, class_samples_png, family_report_path, models_dir, samples_png
from pipeline.plots import save_class_grid, save_samples
from pipeline.runtime import datamodule_for, eval_device

PERF_METRICS = ("samples_per_second", "train_seconds", "parameters", "peak_memory_mb")


def metric_name(key: str) -> str:
    """MLflow name of a metric: `perf/<key>` for costs, `test/<key>` for the rest (docs/ARCHITECTURE.md)."""
    return f"perf/{key}" if key in PERF_METRICS else f"test/{key}"


def preflight(cfg) -> None:
    """What an evaluation needs besides the model, checked before a sweep point trains (so a missing feature
    network stops it in a second, not after training): the prepared data and the feature space."""
    family = require_family(cfg)
    eval_device(cfg)  # eval.device=cuda without a GPU: refused before the point trains
    dm = datamodule_for(cfg, family_class(family))
    feature_extractor(cfg, dm.info)
    label_classifier(cfg, dm.info)


def evaluate(cfg, point=None) -> dict:
    """`point`: a sweep point (`pipeline.sweeps.SweepPoint`): its model folder, run and report."""
    family = require_family(cfg)
    cls = family_class(family)
    slug = point.slug if point is not None else None
    out = family_report_path(family, slug)
    out.unlink(missing_ok=True)
    model_dir = models_dir(cfg, family, slug)
    run = tracking.read_run_file(model_dir)
    if run is None:
        raise GenzooError(f"{model_dir / tracking.RUN_FILE} not found: run `genzoo train family={family}` first")
    state = json.loads((model_dir / STATE_FILE).read_text())
    if not state.get("finished"):
        raise GenzooError(f"{model_dir}: training did not finish; re-run `genzoo train family={family}`")
    dm = datamodule_for(cfg, cls)
    # before the run is reopened: a model of other data is the user's mix-up, not a failure of that run
    check_same_data(state.get("trained_on"), dm.manifest, model_dir, family)
    device = eval_device(cfg)  # eval.device=cuda without a GPU is refused here, before the run is reopened
    logging.getLogger(__name__).info("evaluating %s on %s", family, device)

    import mlflow

    tracking.ensure_store(tracking.tracking_uri(cfg), tracking.experiment_name(cfg))  # a read-only store: one line
    tracking.client(cfg)
    with mlflow.start_run(run_id=run["run_id"]):
        with tracking.failing_marks_run(cfg, lambda: run["run_id"]):
            model = load_model(model_dir / "model.ckpt", cls)
            check_same_data(model.trained_on, dm.manifest, model_dir / "model.ckpt", family, model.info)
            model.to(device)  # the scoring moves each batch to the model's device and the results back
            features, classifier = feature_extractor(cfg, dm.info), label_classifier(cfg, dm.info)
            features, classifier = (None if m is None else m.to(device) for m in (features, classifier))
            metrics, curves, samples, labelled = score(model, dm, features, cfg.eval, classifier, cfg.featnet)
            model.cpu()  # the logged MLflow model's input example and signature are computed on the CPU
            metrics.update(state.get("cost", {}))
            grid = save_samples(samples, dm.info.kind, samples_png(family, slug), cfg.eval.grid_size)
            grids = [grid]
            if labelled is not None:
                grids.append(save_class_grid(*labelled, model.num_classes, dm.info.kind,
                                             class_samples_png(family, slug)))
            # once per evaluation, even when a killed evaluation is rerun (MLflow's metric history only appends)
            step = tracking.log_evaluation(cfg, run["run_id"], {metric_name(k): v for k, v in metrics.items()
                                                                 if k not in state.get("cost", {})},
                                           volatile={metric_name(k) for k in PERF_METRICS})
            mlflow.set_tag("test/nll_kind", model.nll_kind() or "n/a")
            mlflow.set_tags(tracking.context_tags(point))  # the DVC experiment this evaluation ran in
            for g in grids:
                mlflow.log_artifact(str(g), artifact_path="samples")
            registered = None
            if cfg.tracking.log_model:
                from pipeline.checkpoints import log_mlflow_model

                name = tracking.registered_model_name(cfg, family) if cfg.tracking.register else None
                info = log_mlflow_model(model, model_dir / "model.ckpt", samples[:4], registered_model_name=name)
                if name is not None:
                    version = info.registered_model_version
                    registered = {"name": name, "version": int(version),
                                  "champion": tracking.promote_champion(cfg, name, version, run["run_id"])}
            tracking.mark_evaluated(cfg, run["run_id"], step)
    result = {"family": family, "nll_kind": model.nll_kind(), "run_id": run["run_id"], "metrics": metrics,
              "curves": curves, "samples_png": str(grid), "conditional": model.conditional,
              "semi_supervised_method": cls.semi_supervised_method if "semi_acc" in metrics else None}
    if labelled is not None:
        result["class_samples_png"] = str(grids[1])
    if point is not None:
        result["sweep_point"] = list(point.overrides)
    if registered is not None:
        result["registered_model"] = registered
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result
