"""A dataset's short name (its slug): the folder under `data/prepared/`, and the dataset part of the MLflow
experiment (`genzoo-<slug>`), run (`<family>-<slug>[-<sweep point>]`) and registered-model
(`genzoo-<slug>-<family>`) names.

A built-in source keeps its name with `:` made `-` (`digits`, `toy2d:moons` -> `toy2d-moons`); a user source
`<kind>:<path>` (`npy:/x/y/wine.npz`, `csv:data/user/wine.csv`, `imagefolder:path/to/folder`, `text:story.txt`)
is named by the file's stem or the folder's name (`wine`, `folder`, `story`), so a path never nests folders
under `data/prepared/`. Characters outside [A-Za-z0-9._-] become `-`. A user file named like a built-in data set
gets its kind appended (`npz:digits.npz` -> `digits-npz`), so it never shares the built-in's folder, experiment
or registered models. Two user files with the same stem share the slug (and so the prepared folder): the
manifest records the full name, and every stage refuses a model trained on other data.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple

# `<kind>:<path>`: data the user points at (a file, or a folder for imagefolder)
USER_SOURCE_KINDS = ("npy", "npz", "csv", "imagefolder", "text")  # = pipeline.data.sources.USER_SOURCES (a test says so)
BUILT_IN_SLUGS = frozenset({  # the slugs of pipeline.data.sources.SOURCES (a test says so)
    "digits", "digits_rows", "mnist", "fashion_mnist", "cifar10", "text", "hmm_synthetic", "toy2d-moons",
    "toy2d-circles", "toy2d-8gaussians", "toy2d-checkerboard", "toy2d-pinwheel", "toy2d-spirals"})
FOLDER_KINDS = ("imagefolder",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def user_source(dataset: str) -> Optional[Tuple[str, str]]:
    """(kind, path) of a user source `<kind>:<path>`, else None (a built-in source)."""
    kind, sep, path = str(dataset).partition(":")
    return (kind, path) if sep and kind in USER_SOURCE_KINDS and path else None


def safe_name(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by `-`."""
    return _UNSAFE.sub("-", text)


def dataset_slug(dataset: str) -> str:
    user = user_source(dataset)
    if user is None:
        name = str(dataset).replace(":", "-")
    else:
        kind, path = user
        p = Path(os.path.expanduser(path))
        if p.name in ("", ".", ".."):  # `imagefolder:.`: the folder's own name
            p = Path(os.path.abspath(p))
        name = p.name if kind in FOLDER_KINDS else p.stem
    slug = safe_name(name).lstrip(".")  # never a hidden folder, `.` or `..`
    if user is None:
        return slug or "dataset"
    return f"{slug}-{user[0]}" if slug in BUILT_IN_SLUGS else slug or user[0]
