"""`genzoo compare`: the report's comparison table in the terminal, read back from MLflow (the rows:
`pipeline/run_selection.py`).

- default: one row per family, its latest finished run outside sweeps (the pipeline's runs); when the experiment
  holds only sweep runs, the latest sweep; a newer sweep is named under the table.
- `--sweep [ID]`: one row per point of a `genzoo train -m` sweep (the latest, or the one with that id), labelled
  by the run name (`gmm-toy2d-moons-n_components=3`).
- `--all`: one row per finished run. `--runs a,b`: those runs.
`family=<name>` keeps that family's runs only.
"""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from pipeline import tracking
from pipeline.evaluation.comparison import best_per_column, cell, used_columns
from pipeline.errors import GenzooError
from pipeline.run_selection import natural, run_row, select_runs


def compare(cfg, run_ids: Optional[str] = None, experiment: Optional[str] = None, sweep: Optional[str] = None,
            every: bool = False) -> None:
    what, runs, notes = select_runs(cfg, run_ids, experiment, sweep, every)
    if not runs:
        raise GenzooError("no finished genzoo runs to compare")
    rows = {label: run_row(r) for label, r in runs.items()}
    cols = used_columns(rows)
    best = best_per_column(rows)
    title = f"genzoo runs ({tracking.tracking_uri(cfg)})" + "".join(f"\n{n}" for n in notes if n.startswith("sweep "))
    table = Table(title=title, caption="\n".join(n for n in notes if not n.startswith("sweep ")) or None)
    table.add_column(what)
    for c in cols:
        table.add_column(c.title, justify="right")
    for name, row in sorted(rows.items(), key=lambda kv: natural(kv[0])):
        table.add_row(name, *[f"[bold green]{cell(row, c)}[/]" if best.get(c.key) == name else cell(row, c) for c in cols])
    Console(width=250).print(table)
