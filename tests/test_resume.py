"""Fault tolerance: a training process killed with SIGKILL mid-run resumes from its last checkpoint,
into the same MLflow run, and ends with exactly the parameters of an uninterrupted run (CPU,
deterministic mode); a corrupt checkpoint is named in a clear error."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GENZOO

OVERRIDES = ["family=vae", "trainer.accelerator=cpu", "vae.max_epochs=40", "vae.hidden=32", "vae.channels=8",
             "tracking.uri=sqlite:///mlflow.db"]


def _command(args):
    return ([str(GENZOO)] if GENZOO.is_file() else [sys.executable, "-m", "pipeline.cli"]) + ["train"] + args


def _env():
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _train(project: Path, extra=()):
    out = subprocess.run(_command(OVERRIDES + list(extra)), cwd=project, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _state_dict(project: Path) -> dict:
    return torch.load(project / "data/models/vae/model.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def _history(project: Path, run_id: str, key: str):
    db = sqlite3.connect(project / "mlflow.db")
    return db.execute("select step, value from metrics where run_uuid = ? and key = ? order by step", (run_id, key)).fetchall()


def _run_id(project: Path) -> str:
    return json.loads((project / "data/models/vae/mlflow_run.json").read_text())["run_id"]


@pytest.fixture
def twin_projects(tmp_path, digits_folder):
    import shutil

    projects = []
    for name in ("straight", "killed"):
        p = tmp_path / name
        shutil.copytree(digits_folder, p / "data" / "prepared" / "digits")
        shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", p / "params.yaml")
        projects.append(p)
    return projects


def test_sigkill_then_resume_matches_uninterrupted_run(twin_projects):
    straight, killed = twin_projects
    _train(straight)

    proc = subprocess.Popen(_command(OVERRIDES), cwd=killed, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = killed / "data/models/vae/last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True, map_location="cpu")["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((killed / "data/models/vae/state.json").read_text())
    assert not state["finished"] and not (killed / "data/models/vae/model.ckpt").exists()
    run_before = _run_id(killed)

    _train(killed)  # same config, unfinished state: resumes from last.ckpt

    assert _run_id(killed) == run_before, "resume must continue the same MLflow run"
    a, b = _state_dict(straight), _state_dict(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    hist_a, hist_b = _history(straight, _run_id(straight), "val/loss"), _history(killed, run_before, "val/loss")
    steps = [s for s, _ in hist_b]
    assert len(steps) == len(set(steps)), f"duplicated steps in the resumed run: {steps}"
    assert hist_a == hist_b, "the resumed run's val/loss history differs from the uninterrupted one"


def test_truncated_checkpoint_is_named(tmp_path, digits_folder):
    from pipeline.checkpoints import load_model
    from pipeline.errors import GenzooError

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(GenzooError, match="model.ckpt"):
        load_model(bad)
