"""`genzoo train -m a=1,2 b=x,y`: a sweep's points. Each point trains into its own folder, is evaluated there,
and is one MLflow run; its `SweepPoint` names them all.

- `sweep_id`: shared by the sweep's points (the MLflow tag `genzoo.sweep`; `genzoo compare --sweep`).
- `overrides`: the point's swept overrides (`gmm.n_components=3`; the tag `genzoo.sweep_point`).
- `slug`: those overrides made a file name, the family's own prefix dropped (`n_components=3`): the point's
  folders `data/sweeps/<family>/<slug>/` and `reports/sweeps/<family>/<slug>/`, and the end of its run name
  (`gmm-toy2d-moons-n_components=3`).

The swept overrides are the keys given several values; in a sweep without any (`-m gmm.n_components=3`), every
override but `family`.
"""
from __future__ import annotations

import hashlib
import itertools
import secrets
import time
from dataclasses import dataclass
from typing import List, Tuple

from pipeline.config import parse_overrides
from pipeline.data.names import dataset_slug, safe_name

MAX_SLUG = 100  # characters: a longer slug is cut and ends with a hash of the whole


@dataclass(frozen=True)
class SweepPoint:
    sweep_id: str
    overrides: Tuple[str, ...]
    slug: str


def expand(overrides: List[str]) -> Tuple[List[List[str]], List[str]]:
    """Hydra's sweep grammar expanded to the cartesian product of plain overrides, and the keys that take
    several values."""
    axes, swept = [], []
    for ov in parse_overrides(overrides):
        key = ov.get_key_element()
        values = [str(v) for v in ov.sweep_string_iterator()] if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        if len(values) > 1:
            swept.append(key)
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)], swept


def new_sweep_id() -> str:
    """`20250101-120000-1a2b`: sortable by time, unique between sweeps started the same second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _plain(overrides: List[str]) -> List[Tuple[str, str]]:
    """(key, value) of plain overrides, the value unescaped (`toy2d\\:moons` -> `toy2d:moons`)."""
    return [(ov.get_key_element(), str(ov.value())) for ov in parse_overrides(overrides)]


def sweep_point(sweep_id: str, overrides: List[str], swept: List[str], family: str) -> SweepPoint:
    named = [o for o in overrides if _key(o) in swept and _key(o) != "family"]
    if not named:
        named = [o for o in overrides if _key(o) != "family"]
    return SweepPoint(sweep_id, tuple(f"{k}={v}" for k, v in _plain(named)), point_slug(named, family))


def point_slug(overrides: List[str], family: str) -> str:
    items = []
    for key, value in _plain(overrides):
        value = dataset_slug(value) if key == "data.dataset" else safe_name(value)
        items.append(f"{safe_name(key.removeprefix(f'{family}.'))}={value}")
    slug = ",".join(items) or "default"
    if len(slug) > MAX_SLUG:
        slug = f"{slug[:MAX_SLUG - 9]}-{hashlib.sha1(slug.encode()).hexdigest()[:8]}"
    return slug
