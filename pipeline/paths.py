"""Every path the stages read or write, in one place (dvc.yaml names the same ones)."""
from __future__ import annotations

from pathlib import Path

REPORTS = Path("reports")
FEATNET_REPORT = REPORTS / "featnet.json"  # featnet accuracy and the real-data floor
METRICS_JSON = REPORTS / "metrics.json"  # DVC metrics: one row per family
INDEX_HTML = REPORTS / "index.html"
PLOTS = REPORTS / "plots"  # DVC plot data, one file per family
FEATNET_FILE = "featnet.ckpt"
STATE_FILE = "state.json"  # beside a family's checkpoints: config hash, run id, finished or not


def prepared_dir(data_cfg) -> Path:
    """`<data.root>/prepared/<dataset>/`: the fetch stage's splits and manifest."""
    return Path(data_cfg.root) / "prepared" / data_cfg.dataset.replace(":", "-")


def featnet_dir(cfg) -> Path:
    return Path(cfg.data.root) / "featnet"


def models_dir(cfg, family: str) -> Path:
    """`<data.root>/models/<family>/`: model.ckpt, last.ckpt, state.json, mlflow_run.json, config.yaml."""
    return Path(cfg.data.root) / "models" / family


def family_report_path(family: str) -> Path:
    return REPORTS / "families" / f"{family}.json"


def samples_png(family: str) -> Path:
    return REPORTS / "samples" / f"{family}.png"


def class_samples_png(family: str) -> Path:
    """One row of samples per requested class."""
    return REPORTS / "samples" / f"{family}_by_class.png"
