"""Stage `fetch`: the configured source -> `data/prepared/<dataset>/` (splits + manifest)."""
from __future__ import annotations

from pipeline.datasets import load_source, prepared_dir
from pipeline.store import write_prepared


def fetch(cfg) -> dict:
    return write_prepared(load_source(cfg.data), prepared_dir(cfg.data), cfg.data.dataset, cfg.data.seed)
