"""`genzoo report --sweep [ID]`: the report page of a `genzoo train -m` sweep, one row per point.

Read back from MLflow like `genzoo compare --sweep` (the latest sweep of the configured data set, of family=<name>
if given, or the sweep ID): each point's `test/*` metrics, its sample grid (the run's `samples/` artifact) and its
training curves. Written to `reports/sweeps/<sweep id>.html`, beside the points' own folders; `genzoo train -m`
writes it when its last point is evaluated.
"""
from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Dict, Optional

from pipeline import tracking
from pipeline.paths import REPORTS, SWEEPS
from pipeline.report_page import metric_histories, table_rows, write_html
from pipeline.run_selection import LATEST, natural, run_row, select_runs


def sweep_page(sweep_id: str) -> Path:
    return REPORTS / SWEEPS / f"{sweep_id}.html"


def _point_results(c, runs: Dict[str, object], artifacts: Path) -> Dict[str, dict]:
    """label -> what the page needs of a point: the shape of an evaluation's report JSON."""
    results = {}
    for label, run in sorted(runs.items(), key=lambda kv: natural(kv[0])):
        family = run.data.tags.get("genzoo.family", "")
        grid = ""
        if any(a.path == f"samples/{family}.png" for a in c.list_artifacts(run.info.run_id, "samples")):
            grid = c.download_artifacts(run.info.run_id, f"samples/{family}.png", str(artifacts / run.info.run_id))
        row = run_row(run)
        results[label] = {"run_id": run.info.run_id, "nll_kind": row.pop("nll_kind"), "metrics": row,
                          "samples_png": grid, "curves": {}}
    return results


def sweep_report(cfg, sweep: Optional[str] = LATEST) -> Path:
    what, runs, notes = select_runs(cfg, sweep=sweep or LATEST)
    sweep_id = next(r.data.tags[tracking.SWEEP_TAG] for r in runs.values())
    c = tracking.client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        results = _point_results(c, runs, Path(tmp))
        points = ", ".join(sorted({r.data.tags.get(tracking.SWEEP_POINT_TAG, "") for r in runs.values()}))
        subject = (f"sweep <code>{html.escape(sweep_id)}</code> on <code>{html.escape(cfg.data.dataset)}</code> "
                   f"({len(runs)} points: {html.escape(points)})")
        # no real-data row: reports/featnet.json is the pipeline's data set's, not necessarily the sweep's
        return write_html(cfg, results, table_rows(results, {}), metric_histories(cfg, results), {},
                          path=sweep_page(sweep_id), subject=subject, row_heading=what)
