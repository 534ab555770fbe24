"""What a user sees: `mlflow ui` over a store that a small real pipeline filled, and `reports/index.html`,
both rendered by headless Chromium (Debian's `chromium`, installed on first use).

The pipeline runs through the `genzoo` CLI (fetch, featnet, train + evaluate per family, report) in a
temporary project with a sqlite store; the families are the cheap ones (gmm, vae).
`GENZOO_UPDATE_DOCS=1` also refreshes docs/report.png (the README's screenshot) from this run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from browser import (MlflowUI, assert_not_blank, chromium, dump_dom, screenshot, shrink_png,  # noqa: F401
                     visible_text)

pytestmark = pytest.mark.browser

FAMILIES = ["gmm", "vae"]
EXTRA = ["gmm.max_epochs=2"]
REQUIRED_METRICS = {"test/fid", "test/kid_mean", "perf/train_seconds", "perf/samples_per_second"}
LIKELIHOOD_METRICS = {"test/nll", "test/bpd"}  # gmm and vae both have one
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, repo_root, tiny_overrides, genzoo):
    """A temporary project after fetch -> featnet -> train/evaluate (each family) -> report."""
    project = tmp_path_factory.mktemp("browser") / "project"
    project.mkdir()
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    db = project / "mlflow.db"
    overrides = [*tiny_overrides, *EXTRA, f"tracking.uri=sqlite:///{db}", f"families=[{','.join(FAMILIES)}]"]
    steps = [["fetch"], ["featnet"]]
    for family in FAMILIES:
        steps += [["train", f"family={family}"], ["evaluate", f"family={family}"]]
    steps.append(["report"])
    for step in steps:
        out = genzoo([*step, *overrides], cwd=project, timeout=600)
        assert out.returncode == 0, f"genzoo {' '.join(step)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return project, db


@pytest.fixture(scope="module")
def ui(filled_store):
    project, db = filled_store
    server = MlflowUI(f"sqlite:///{db}", cwd=project, log=project / "mlflow-ui.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def family_runs(ui):
    """experiment id and {family: run} read back through the REST API."""
    exps = ui.api("experiments/search", {"max_results": 100})["experiments"]
    exp = next((e for e in exps if e["name"] == "genzoo-digits"), None)
    assert exp is not None, f"no experiment genzoo-digits: {[e['name'] for e in exps]}"
    runs = ui.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_family = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if "genzoo.family" in tags:
            assert tags["genzoo.family"] not in by_family, f"two runs for {tags['genzoo.family']}"
            by_family[tags["genzoo.family"]] = {**run, "tags": tags,
                                                "metrics": {m["key"]: m["value"] for m in run["data"].get("metrics", [])}}
    return exp["experiment_id"], by_family


def test_rest_api_has_every_family_run_with_metrics(family_runs):
    _, runs = family_runs
    assert sorted(runs) == sorted(FAMILIES)
    for family, run in runs.items():
        assert run["info"]["status"] == "FINISHED", family
        missing = (REQUIRED_METRICS | LIKELIHOOD_METRICS) - set(run["metrics"])
        assert not missing, f"{family} lacks {sorted(missing)}"
        assert run["metrics"]["test/fid"] >= 0
        assert run["tags"]["genzoo.dataset"] == "digits"
        assert {"genzoo.data_hash", "genzoo.git_commit", "test/nll_kind", "genzoo.pipeline_run"} <= set(run["tags"]), family
        assert "mlflow.parentRunId" not in run["tags"], family  # its own row, not folded under the report run
        (dataset,) = [i["dataset"] for i in run["inputs"]["dataset_inputs"]]
        assert dataset["name"] == "digits" and run["tags"]["genzoo.data_hash"].startswith(dataset["digest"]), dataset


def test_genzoo_ui_opens_the_runs_table_with_a_row_per_family(filled_store, ui, family_runs, chromium, tmp_path):
    """The view `genzoo ui` prints: the ML runs table (not MLflow 3's GenAI overview), one row per family run and
    the report run, sorted by test/nll, with the Dataset and test/* metric columns."""
    from pipeline import tracking
    from pipeline.config import load_config

    project, db = filled_store
    exp_id, runs = family_runs
    cfg = load_config([f"tracking.uri=sqlite:///{db}"], params_file=str(project / "params.yaml"))
    assert tracking.prepare_runs_view(cfg) == exp_id  # what `genzoo ui` does before it starts mlflow ui
    url = tracking.runs_view_url(ui.base, exp_id)
    assert_not_blank(screenshot(chromium, url, tmp_path / "runs.png"))
    dom = dump_dom(chromium, url, window=(3000, 900))  # the metric columns right of Dataset, in view
    text = visible_text(dom)
    assert "genzoo-digits" in text, text[:2000]
    assert "Group:" not in text, text[:3000]
    names = [run["info"]["run_name"] for run in runs.values()]
    for name in [*names, "report-digits"]:
        assert name in text, f"run {name} is not a row of the runs table:\n{text[:3000]}"
    assert re.search(rf"\b{len(runs) + 1} matching runs\b", text), text[-1500:]  # the families + the report run
    assert "test/nll" in text and "test/fid" in text, text[:3000]  # the metric columns genzoo's view selects
    assert "Dataset" in text and re.search(r"(?<![-\w])digits(?![-\w])", text), text[:3000]
    assert not re.search(r"Token usage|Latency|No traces", text), text[:3000]  # not the GenAI overview
    by_nll = sorted(names, key=lambda n: next(r["metrics"]["test/nll"] for r in runs.values()
                                              if r["info"]["run_name"] == n))
    assert [text.index(n) for n in by_nll] == sorted(text.index(n) for n in by_nll), by_nll  # lowest test/nll first


def test_compare_view_shows_the_runs_side_by_side(ui, family_runs, chromium, tmp_path):
    exp_id, runs = family_runs
    url = ui.compare_url(exp_id, [r["info"]["run_id"] for r in runs.values()])
    assert_not_blank(screenshot(chromium, url, tmp_path / "compare.png"))
    text = visible_text(dump_dom(chromium, url))
    assert f"Comparing {len(runs)} Runs" in text, text[:2000]
    for family, run in runs.items():
        assert run["info"]["run_id"] in text, f"{family}'s run id missing from the compare view"
        assert run["info"]["run_name"] in text
    assert "test/fid" in text and "family" in text


def test_report_page_renders_one_row_per_family_and_the_floor(filled_store, chromium, tmp_path):
    project, _ = filled_store
    page = project / "reports" / "index.html"
    url = page.as_uri()
    png = screenshot(chromium, url, tmp_path / "report.png", window=(1400, 900))
    assert_not_blank(png)
    dom = dump_dom(chromium, url)
    body = re.search(r"<tbody>(.*?)</tbody>", dom, flags=re.S)
    assert body, "no comparison table in the report"
    row_heads = [visible_text(h) for h in re.findall(r"<tr[^>]*>\s*<th[^>]*>(.*?)</th>", body.group(1), flags=re.S)]
    assert row_heads == [*FAMILIES, "real data"], row_heads
    images = re.findall(r'<img[^>]*src="([^"]*)"', dom)
    assert images and all(src.startswith("data:image/png;base64,") for src in images), [s[:40] for s in images]
    assert len(images) >= len(FAMILIES) + 2  # a sample grid per family, training curves, ROC
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(FAMILIES) <= set(metrics)
    if os.environ.get("GENZOO_UPDATE_DOCS"):
        shrink_png(png, DOCS_SCREENSHOT)
