"""MLflow as users expect it (issue 13), against real stores: `genzoo ui` marks the experiment as a classic ML
one and prints the address of its runs table; the stages run against a real `mlflow server` on 127.0.0.1 (the
store and the artifacts behind it), and the registered champion loads through that server (`-m slow`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, tracking

MOONS = ["data.dataset=toy2d:moons", "data.toy_samples=1000"]
FAST = ["trainer.accelerator=cpu", "gmm.max_epochs=3", "eval.n_samples=100", "eval.kid_subset_size=50",
        "eval.kid_subsets=5"]


def test_ui_marks_the_experiment_and_prints_its_runs_table(project_dir, monkeypatch, capsys):
    import mlflow

    uri = f"sqlite:///{project_dir / 'mlflow.db'}"
    execs = []

    def fake_exec(file, argv):
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", fake_exec)
    with pytest.raises(SystemExit):
        cli.main(["ui", "--port", "5123", *MOONS, f"tracking.uri={uri}"])
    exp = mlflow.MlflowClient(uri).get_experiment_by_name("genzoo-toy2d-moons")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI overview
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert view["orderByKey"] == "metrics.`test/nll`" and view["orderByAsc"] is True
    assert {"attributes.`Dataset`", "metrics.`test/nll`", "metrics.`test/fid`"} <= set(view["selectedColumns"])
    out = capsys.readouterr().out
    assert (f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey=genzoo") in out, out
    assert execs == [["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5123"]]


def test_an_experiment_kind_set_by_the_user_is_kept(tmp_path):
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp_id = c.create_experiment("mine", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.ensure_experiment(c, "mine") == exp_id
    assert c.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1:<free port>, a sqlite store and a served artifact root, in its own process
    group (stopped as a whole)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    exe = [str(mlflow_exe)] if mlflow_exe.is_file() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(exe + ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                   "--artifacts-destination", str(tmp_path / "artifacts")],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@pytest.mark.slow  # ~75 s on 2 shared cores: the server's start (a fresh store's migrations) and three CLI runs
def test_stages_log_to_a_tracking_server_and_the_champion_loads_through_it(project_dir, mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = [str(Path(sys.executable).with_name("genzoo"))]
    common = ["family=gmm", *MOONS, "gmm.conditional=false", *FAST, "gmm.n_components=4",
              "tracking.log_model=true", "tracking.register=true"]
    for step in (["fetch", *MOONS], ["train", *common], ["evaluate", *common]):
        out = subprocess.run(exe + step, cwd=project_dir, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"genzoo {step[0]}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert not (project_dir / "mlflow.db").exists()  # everything went to the server

    mlflow.set_tracking_uri(mlflow_server)
    c = mlflow.MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("genzoo-toy2d-moons")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    (run,) = c.search_runs([exp.experiment_id], "tags.`genzoo.family` = 'gmm'")
    assert run.info.run_name == "gmm-toy2d-moons" and run.info.status == "FINISHED"
    assert "test/nll" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    manifest = json.loads((project_dir / "data/prepared/toy2d-moons/manifest.json").read_text())
    assert dataset_input.dataset.name == "toy2d-moons"
    assert manifest["content_hash"].startswith(dataset_input.dataset.digest)
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    champion = c.get_model_version_by_alias("genzoo-toy2d-moons-gmm", "champion")
    assert champion.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model("models:/genzoo-toy2d-moons-gmm@champion")
    scores = np.asarray(model.predict(np.array([[0.0, 0.5], [1.0, -0.5], [9.0, 9.0]], dtype=np.float32)))
    assert scores.shape == (3,) and np.isfinite(scores).all() and scores[2] > scores[:2].max()
