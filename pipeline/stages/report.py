"""Stage `report`: `reports/metrics.json` (DVC metrics), DVC plot data, and `reports/index.html`
(one self-contained page, `pipeline/report_page.py`: comparison table, samples, training and ROC curves, config and
commit); one MLflow run per pipeline run, `report-<dataset slug>`, holds the report; each family run names it in its tag
`genzoo.pipeline_run` (and stays a row of its own in the runs table)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

from pipeline import tracking
from pipeline.data.names import dataset_slug
from pipeline.errors import GenzooError
from pipeline.paths import FEATNET_REPORT, METRICS_JSON, PLOTS, ROC_PLOTS, family_report_path
from pipeline.report_page import metric_histories, table_rows, write_html


def load_results(cfg) -> Dict[str, dict]:
    results = {}
    for family in cfg.families:
        path = family_report_path(family)
        if not path.is_file():
            raise GenzooError(f"{path} not found: run `genzoo evaluate family={family}` first")
        results[family] = json.loads(path.read_text())
    return results


def write_dvc_plots(histories, results) -> None:
    """The data of dvc.yaml's plots (`dvc plots show`): each family's validation loss by step, and its anomaly
    ROC where there is one (both folders are written, so both outputs exist; the sample grids are the
    evaluate stage's image plots)."""
    for folder in (PLOTS, ROC_PLOTS):
        shutil.rmtree(folder, ignore_errors=True)  # no stale family from an earlier `families` list
        folder.mkdir(parents=True)
    for family, curves in histories.items():
        rows = [{"step": s, "val_loss": v} for s, v in curves.get("val/loss", [])]
        (PLOTS / f"{family}.json").write_text(json.dumps(rows, indent=0) + "\n")
    for family, r in results.items():
        roc = r.get("curves", {}).get("roc")
        if roc:
            rows = [{"fpr": f, "tpr": t} for f, t in zip(roc["fpr"], roc["tpr"])]
            (ROC_PLOTS / f"{family}.json").write_text(json.dumps(rows, indent=0) + "\n")


def metrics_json(results, floor) -> dict:
    out = {f: {"nll_kind": r["nll_kind"] or "n/a", **r["metrics"]} for f, r in results.items()}
    if floor:
        out["real_data"] = floor
    return out


PIPELINE_RUN_TAG = "genzoo.pipeline_run"


def report_run(cfg, results, files) -> str:
    """One run per pipeline run, `report-<dataset slug>`: holds the report. The family runs stay top-level rows
    of the runs table (no `mlflow.parentRunId`, which would fold them under it) and name it in their tag
    `genzoo.pipeline_run`."""
    c = tracking.client(cfg)
    exp = c.get_experiment_by_name(tracking.experiment_name(cfg))
    run = c.create_run(exp.experiment_id, run_name=f"report-{dataset_slug(cfg.data.dataset)}",
                       tags={"genzoo.role": "report", "genzoo.dataset": cfg.data.dataset,
                             "genzoo.git_commit": tracking.git_commit()})
    for r in results.values():
        c.set_tag(r["run_id"], PIPELINE_RUN_TAG, run.info.run_id)
    for f in files:
        c.log_artifact(run.info.run_id, str(f), artifact_path="report")
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def report(cfg) -> Path:
    results = load_results(cfg)
    floor = json.loads(FEATNET_REPORT.read_text()) if FEATNET_REPORT.is_file() else {}
    rows = table_rows(results, floor)
    histories = metric_histories(cfg, results)
    write_dvc_plots(histories, results)
    METRICS_JSON.write_text(json.dumps(metrics_json(results, floor), indent=2, sort_keys=True) + "\n")
    page = write_html(cfg, results, rows, histories, floor)
    report_run(cfg, results, [METRICS_JSON, page])
    return page
