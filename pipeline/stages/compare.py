"""`genzoo compare`: the report's comparison table in the terminal, read back from MLflow."""
from __future__ import annotations

from typing import Dict, Optional

from rich.console import Console
from rich.table import Table

from pipeline import tracking
from pipeline.evaluation.comparison import best_per_column, cell, used_columns
from pipeline.errors import GenzooError


def _row(run) -> dict:
    row = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(("test/", "perf/"))}
    kind = run.data.tags.get("test/nll_kind")
    row["nll_kind"] = None if kind in (None, "n/a") else kind
    return row


def runs_to_rows(cfg, run_ids: Optional[str], experiment: Optional[str]) -> Dict[str, dict]:
    c = tracking.client(cfg)
    if run_ids:
        runs = [c.get_run(r.strip()) for r in run_ids.split(",") if r.strip()]
        label = lambda r: f"{r.data.tags.get('genzoo.family', '?')} {r.info.run_id[:8]}"  # noqa: E731
    else:
        name = experiment or tracking.experiment_name(cfg)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise GenzooError(f"no MLflow experiment '{name}' at {tracking.tracking_uri(cfg)}")
        found = c.search_runs([exp.experiment_id], "tags.`genzoo.family` != '' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=500)
        latest = {}
        for r in found:  # newest first: keep the latest finished run of each family
            latest.setdefault(r.data.tags["genzoo.family"], r)
        runs = list(latest.values())
        label = lambda r: r.data.tags["genzoo.family"]  # noqa: E731
    if not runs:
        raise GenzooError("no finished genzoo runs to compare")
    return {label(r): _row(r) for r in runs}


def compare(cfg, run_ids: Optional[str] = None, experiment: Optional[str] = None) -> None:
    rows = runs_to_rows(cfg, run_ids, experiment)
    cols = used_columns(rows)
    best = best_per_column(rows)
    table = Table(title=f"genzoo runs ({tracking.tracking_uri(cfg)})")
    table.add_column("family")
    for c in cols:
        table.add_column(c.title, justify="right")
    for name, row in sorted(rows.items()):
        table.add_row(name, *[f"[bold green]{cell(row, c)}[/]" if best.get(c.key) == name else cell(row, c) for c in cols])
    Console(width=250).print(table)
