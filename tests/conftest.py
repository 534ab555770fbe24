"""Shared fixtures: the repo's params.yaml, a prepared digits folder (fetched once per session) and a
throw-away project directory to run stages and the CLI in, so no test writes into the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests (Hypothesis): the fast suite draws a bounded number of examples; `HYPOTHESIS_PROFILE=slow`
# (with `-m slow` or alone) draws many more. Derandomised, so a CI run is reproducible.
settings.register_profile("fast", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
GENZOO = Path(sys.executable).with_name("genzoo")

# Overrides that keep every stage to seconds on 2 CPU cores.
TINY = [
    "trainer.accelerator=cpu",
    "vae.max_epochs=1",
    "vae.iwae_k=8",
    "vae.hidden=32",
    "vae.channels=8",
    "featnet.max_epochs=1",
    "eval.n_samples=100",
    "eval.kid_subset_size=50",
    "eval.kid_subsets=5",
    "tracking.log_model=false",
]


@pytest.fixture
def one_thread():
    """Tiny tensors run much faster on one thread than on OpenMP's on a shared 2-core machine; a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_overrides() -> list:
    return list(TINY)


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    """No telemetry, and no tracking store inherited from the environment (each test picks its own)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def digits_data_root(tmp_path_factory) -> Path:
    """A data root (`<root>/prepared/digits/`) holding the digits splits, written once per session."""
    from pipeline.config import load_config
    from pipeline.data.sources import load_source
    from pipeline.paths import prepared_dir
    from pipeline.data.store import write_prepared

    root = tmp_path_factory.mktemp("digits_data")
    cfg = load_config([f"data.root={root}"], params_file=str(PARAMS))
    write_prepared(load_source(cfg.data), prepared_dir(cfg.data), cfg.data.dataset, cfg.data.seed)
    return root


@pytest.fixture(scope="session")
def digits_folder(digits_data_root) -> Path:
    return digits_data_root / "prepared" / "digits"


@pytest.fixture
def project_dir(tmp_path, monkeypatch) -> Path:
    """An empty project (params.yaml only) as the working directory."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(PARAMS, proj / "params.yaml")
    monkeypatch.chdir(proj)
    return proj


@pytest.fixture
def digits_project(project_dir, digits_folder) -> Path:
    """A project whose `data/prepared/digits` is a fresh copy of the session's prepared digits."""
    shutil.copytree(digits_folder, project_dir / "data" / "prepared" / "digits")
    return project_dir


def run_genzoo(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = [str(GENZOO)] if GENZOO.is_file() else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run(exe + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def genzoo():
    return run_genzoo
