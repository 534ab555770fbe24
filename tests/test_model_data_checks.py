"""A trained model meets data: a family is never fitted to data it has no model of (token ids as a continuous
density), a checkpoint is never used on other data than it was trained on, and no model is unpickled from a
store. Each refusal is one `genzoo: error:` line, exit code 2 (in-process CLI: the same error path as the
console script, without a process start)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_modules.registry import FAMILIES, family_class
from pipeline.cli import main

# tests run in one process: each project names its own store by an absolute URI (MLflow caches stores by URI)
STORE = "tracking.uri=sqlite:///{}/mlflow.db"
FAST = ["trainer.accelerator=cpu", "gmm.max_epochs=2", "gmm.n_components=2", "eval.n_samples=50",
        "eval.kid_subset_size=25", "eval.kid_subsets=2", "featnet.max_epochs=1"]


def fast(project) -> list:
    return FAST + [STORE.format(project)]


def cli_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("genzoo: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def cli_ok(capsys, args) -> str:
    assert main(args) in (None, 0)
    return capsys.readouterr().out


def run_statuses(project) -> dict:
    db = project / "mlflow.db"
    if not db.exists():
        return {}
    return dict(sqlite3.connect(db).execute("select run_uuid, status from runs").fetchall())


@pytest.mark.parametrize("family", [f for f in FAMILIES if not family_class(f).models_tokens])
def test_a_continuous_family_refuses_token_data(project_dir, capsys, family):
    cli_ok(capsys, ["fetch", "data.dataset=text"])
    err = cli_error(capsys, ["train", f"family={family}", "data.dataset=text", "trainer.accelerator=cpu"])
    assert family in err and "tokens" in err and "hmm" in err
    assert run_statuses(project_dir) == {}  # refused before a run was opened


@pytest.fixture
def digits_gmm(digits_project, capsys):
    """A GMM trained and evaluated on digits, in a project that has also fetched toy2d:moons."""
    cli_ok(capsys, ["featnet", *fast(digits_project)])
    cli_ok(capsys, ["train", "family=gmm", *fast(digits_project)])
    cli_ok(capsys, ["fetch", "data.dataset=toy2d:moons", "data.toy_samples=600"])
    return digits_project


def test_a_checkpoint_of_another_dataset_is_refused_by_evaluate_sample_and_resume(digits_gmm, capsys):
    project = digits_gmm
    digits_hash = json.loads((project / "data/prepared/digits/manifest.json").read_text())["content_hash"]
    moons_hash = json.loads((project / "data/prepared/toy2d-moons/manifest.json").read_text())["content_hash"]
    model_dir = project / "data/models/gmm"
    if not (model_dir / "last.ckpt").exists():  # EM that converged early leaves no resume point: make one
        (model_dir / "last.ckpt").write_bytes((model_dir / "model.ckpt").read_bytes())
    before = run_statuses(project)
    moons = ["data.dataset=toy2d:moons", "data.toy_samples=600"]
    for args in (["evaluate", "family=gmm", *moons, *fast(project)], ["sample", "family=gmm", *moons, "-o", "s.png"],
                 ["train", "family=gmm", "resume=true", *moons, *fast(project)]):
        err = cli_error(capsys, args)
        # names the data the model was trained on, its hash, and the data asked for
        assert "digits" in err and digits_hash[:12] in err and "moons" in err and moons_hash[:12] in err, err
    assert run_statuses(project) == before  # the digits run is not marked FAILED by a mix-up
    assert not (project / "s.png").exists()
    # on its own data, everything works
    cli_ok(capsys, ["evaluate", "family=gmm", *fast(project)])
    assert "s.png" in cli_ok(capsys, ["sample", "family=gmm", "-n", "4", "-o", "s.png"])


class Payload:
    """What a tampered artifact smuggles in: unpickling it would create the file `pwned`."""

    def __reduce__(self):
        return (open, ("pwned", "w"))


def test_models_are_logged_without_pickle_and_a_pickled_artifact_is_refused(digits_gmm, capsys):
    import mlflow

    project = digits_gmm
    cli_ok(capsys, ["evaluate", "family=gmm", *fast(project), "tracking.log_model=true"])
    run_id = json.loads((project / "reports/families/gmm.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    mlmodel = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")) / "MLmodel"
    flavors = yaml.safe_load(mlmodel.read_text())["flavors"]
    assert set(flavors) == {"python_function"}  # no pytorch (pickle) flavour
    assert flavors["python_function"]["loader_module"] == "pipeline.serving"
    # pyfunc serving works: p(y | x) for the conditional GMM
    p = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(np.full((2, 1, 8, 8), 0.5, np.float32)))
    assert p.shape == (2, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert "s.png" in cli_ok(capsys, ["sample", "--model", f"runs:/{run_id}/model", "-n", "4", "-o", "s.png"])

    # tamper with the stored checkpoint: a pickle payload in its place is refused, never executed
    stored = next(project.glob(f"mlruns/**/artifacts/{flavors['python_function']['data']}"))
    torch.save({"state_dict": Payload()}, stored)
    err = cli_error(capsys, ["sample", "--model", f"runs:/{run_id}/model", "-o", "t.png"])
    assert "model.ckpt" in err and "corrupt or not a genzoo checkpoint" in err
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert not (project / "pwned").exists() and not (project / "t.png").exists()
