"""Which finished runs of an MLflow experiment make a comparison's rows, read back from the store (`genzoo compare`,
`genzoo report --sweep`):

- default: one row per family, its latest finished run outside sweeps (the pipeline's runs); when the experiment
  holds only sweep runs, the latest sweep; a newer sweep is named under the table.
- a sweep (`latest` or its id): one row per point of a `genzoo train -m` sweep, labelled by the run name
  (`gmm-toy2d-moons-n_components=3`).
- every: one row per finished run. run ids: those runs.
`family=<name>` keeps that family's runs only.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from pipeline import tracking
from pipeline.errors import GenzooError

LATEST = "latest"


def run_row(run) -> dict:
    row = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(("test/", "perf/"))}
    kind = run.data.tags.get("test/nll_kind")
    row["nll_kind"] = None if kind in (None, "n/a") else kind
    return row


def _family(run) -> str:
    return run.data.tags.get("genzoo.family", "?")


def _sweep(run) -> Optional[str]:
    return run.data.tags.get(tracking.SWEEP_TAG) or None


def finished_runs(c, experiment_id: str, family: Optional[str]) -> list:
    """Every finished genzoo run of the experiment (of `family`, if given), newest first."""
    query = "tags.`genzoo.family` != '' and attributes.status = 'FINISHED'"
    if family:
        query += f" and tags.`genzoo.family` = '{family}'"
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000,
                             page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _unique(runs: list, label) -> Dict[str, object]:
    """label -> run; a label already taken (a newer run of it) gets the run id's start."""
    out = {}
    for r in runs:
        name = label(r)
        out[name if name not in out else f"{name} {r.info.run_id[:8]}"] = r
    return out


def select_runs(cfg, run_ids: Optional[str] = None, experiment: Optional[str] = None, sweep: Optional[str] = None,
                every: bool = False) -> Tuple[str, Dict[str, object], List[str]]:
    """(what a row is, label -> run, notes under the table)."""
    c = tracking.client(cfg)
    if run_ids:
        runs = [c.get_run(r.strip()) for r in run_ids.split(",") if r.strip()]
        return "run", _unique(runs, lambda r: f"{_family(r)} {r.info.run_id[:8]}"), []
    name = experiment or tracking.experiment_name(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise GenzooError(f"no MLflow experiment '{name}' at {tracking.tracking_uri(cfg)}")
    found = finished_runs(c, exp.experiment_id, cfg.family)
    if every:
        return "run", _unique(found, lambda r: f"{r.info.run_name} {r.info.run_id[:8]}"), []
    sweeps = [r for r in found if _sweep(r)]
    latest_sweep = _sweep(sweeps[0]) if sweeps else None
    if sweep is not None:
        wanted = latest_sweep if sweep == LATEST else sweep
        points = [r for r in sweeps if _sweep(r) == wanted]
        if not points:
            which = "no finished sweep runs" if sweep == LATEST else f"no finished runs of sweep {sweep}"
            raise GenzooError(f"{which} in '{name}'{f' for family={cfg.family}' if cfg.family else ''} "
                              "(a sweep: `genzoo train -m family=<name> <key>=<a>,<b>`)")
        return "sweep point", _unique(points, lambda r: r.info.run_name), [f"sweep {wanted}"]
    plain = [r for r in found if not _sweep(r)]
    if not plain and sweeps:
        return "sweep point", _unique([r for r in sweeps if _sweep(r) == latest_sweep], lambda r: r.info.run_name), \
            [f"sweep {latest_sweep} (no runs outside sweeps)"]
    latest = {}
    for r in plain:  # newest first: keep the latest finished run of each family
        latest.setdefault(_family(r), r)
    notes = []
    if sweeps and (not plain or sweeps[0].info.start_time > plain[0].info.start_time):
        n = sum(_sweep(r) == latest_sweep for r in sweeps)
        notes.append(f"a newer sweep, {latest_sweep} ({n} points): genzoo compare --sweep")
    return "family", latest, notes


def natural(label: str) -> list:
    """Sort key: `n_components=10` after `n_components=2`."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label)]
