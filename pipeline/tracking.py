"""MLflow plumbing shared by the stages: where the store is, the run of a family, its tags, its failure.

Default store: sqlite `mlflow.db` in the working directory; `tracking.uri` or `MLFLOW_TRACKING_URI`
override it. Telemetry is off unless the user turned it on. A family's training and evaluation share
one run: train writes its id to `mlflow_run.json` beside the checkpoint and evaluate reopens it.
"""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_FILE = "mlflow_run.json"


def quiet_telemetry() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def default_tracking_uri(cwd: Optional[Path] = None) -> str:
    """`sqlite:///mlflow.db` in the project. A queued or `--temp` DVC experiment runs in a copy of the
    project under `<project>/.dvc/tmp/exps/`, which DVC deletes afterwards: its runs go to the project's store."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return f"sqlite:///{Path(*parts[:i]) / 'mlflow.db'}"
    return DEFAULT_TRACKING_URI


def tracking_uri(cfg) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(cfg) -> str:
    return cfg.tracking.experiment or f"genzoo-{cfg.data.dataset.replace(':', '-')}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg, family: str, manifest: dict) -> dict:
    return {
        "genzoo.family": family,
        "genzoo.dataset": cfg.data.dataset,
        "genzoo.git_commit": git_commit(),
        "genzoo.data_hash": manifest["content_hash"],
        # semi-supervised runs (`data.labels_per_class`) are told apart from the fully labelled ones in the UI
        "genzoo.labels_per_class": str(cfg.data.labels_per_class) if cfg.data.labels_per_class is not None else "all",
    }


def client(cfg):
    import mlflow

    quiet_telemetry()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.MlflowClient()


def ensure_store(uri: str, experiment: str) -> None:
    """Create (or upgrade) a sqlite store and the experiment under an exclusive file lock beside it.

    MLflow builds a fresh sqlite store with alembic migrations the first time a process opens it; two
    processes doing that at once (the DDP ranks torchrun or srun start, or jobs sharing one store) fail
    with "duplicate column" / "Online migration expected to match one row" errors, and two that both
    create the experiment collide on its unique name. Under the lock the first one does both, the
    others find them done. Other stores (a tracking server) handle concurrency themselves."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow resets it on import: no table-creation chatter
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            c = mlflow.MlflowClient(uri)  # creates and migrates the tables when they are missing
            if c.get_experiment_by_name(experiment) is None:
                c.create_experiment(experiment)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_run_file(model_dir: Path, run_id: str, experiment_id: str, uri: str) -> None:
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}) + "\n")


def read_run_file(model_dir: Path) -> Optional[dict]:
    path = model_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mark_failed(cfg, run_id: Optional[str], reason: str) -> None:
    if not run_id:
        return
    c = client(cfg)
    c.set_tag(run_id, "genzoo.failure", reason[:4000])
    c.set_terminated(run_id, "FAILED")


@contextmanager
def failing_marks_run(cfg, run_id_getter):
    """Any exception inside marks the run FAILED with the reason as a tag, then propagates."""
    try:
        yield
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        try:
            mark_failed(cfg, run_id_getter(), reason)
        finally:
            raise
