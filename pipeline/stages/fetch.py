"""Stage `fetch`: the configured source -> `data/prepared/<dataset>/` (splits + manifest)."""
from __future__ import annotations

from pipeline.data.sources import load_source
from pipeline.data.store import write_prepared
from pipeline.paths import prepared_dir


def fetch(cfg) -> dict:
    return write_prepared(load_source(cfg.data), prepared_dir(cfg.data), cfg.data.dataset, cfg.data.seed)
