"""The real console script on bad input: a non-zero exit and one `genzoo: error:` line naming the bad value,
never a Python traceback. Each command runs in a throw-away project directory holding params.yaml."""
from __future__ import annotations

import pytest


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("genzoo: error:")]


def assert_clean_failure(result, *named):
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    lines = error_lines(result)
    assert len(lines) == 1, out
    for word in named:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, named", [
    (["train", "family=nosuchfamily"], ["nosuchfamily", "vae"]),  # names the choices too
    (["train", "family=vae", "vae.nosuchkey=1"], ["vae.nosuchkey"]),
    (["fetch", "data.dataset=nosuchdata"], ["nosuchdata", "digits"]),
])  # each costs a process start (~10-30 s on a busy 2-core box); the rest of the grammar: test_config.py
def test_config_errors_are_one_line(project_dir, genzoo, args, named):
    r = genzoo(args, cwd=project_dir)
    line = assert_clean_failure(r, *named)
    assert r.stderr.strip() == line  # nothing else on stderr: the error is the whole message
    assert not (project_dir / "data").exists()  # refused before any work


def test_corrupt_data_file_fails_train_naming_it(digits_project, genzoo):
    project_dir = digits_project  # a real fetch's output, copied into the project
    path = project_dir / "data" / "prepared" / "digits" / "train_x.npy"
    raw = bytearray(path.read_bytes())
    for i in (-1, -2, -3):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))

    r = genzoo(["train", "family=vae", "vae.max_epochs=1", "trainer.accelerator=cpu"], cwd=project_dir)
    line = assert_clean_failure(r, "train_x.npy", "corrupt")
    assert "genzoo fetch" in line  # says how to recover
    assert not (project_dir / "data" / "models" / "vae" / "model.ckpt").exists()

    # the MLflow run that training opened is marked FAILED with the reason
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert "train_x.npy" in runs[0].data.tags["genzoo.failure"]


def test_evaluate_before_train_fails_clearly(project_dir, genzoo):
    r = genzoo(["evaluate", "family=vae"], cwd=project_dir)
    assert_clean_failure(r, "genzoo train family=vae")


def test_missing_params_yaml(tmp_path, genzoo):
    r = genzoo(["fetch"], cwd=tmp_path)
    assert_clean_failure(r, "params.yaml")


@pytest.mark.parametrize("family, named", [("vae", "requires a GPU"), ("gmm", "gmm does not shard")])
def test_trainer_settings_lightning_cannot_run_are_one_clear_error(digits_project, family, named):
    """FSDP asked for on a CPU (Lightning refuses it) or for an EM family (nothing to shard): a GenzooError
    naming the trainer keys, raised before any MLflow run or model folder exists."""
    import sqlite3

    from pipeline.config import load_config
    from pipeline.errors import GenzooError
    from pipeline.stages.train import train

    db = digits_project / "mlflow.db"
    cfg = load_config([f"family={family}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=fsdp",
                       f"tracking.uri=sqlite:///{db}"])
    with pytest.raises(GenzooError, match=f"trainer.strategy=fsdp.*{named}"):
        train(cfg)
    runs = sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] if db.exists() else 0
    assert runs == 0 and not (digits_project / "data" / "models" / family).exists()


def test_nan_loss_ends_the_run_failed_with_no_model(digits_project):
    """A diverging run (absurd learning rate) stops at the first non-finite loss: GenzooError, the MLflow
    run FAILED with the reason as a tag, state.json unfinished and no model.ckpt that looks finished."""
    import json
    import sqlite3

    from pipeline.config import load_config
    from pipeline.errors import GenzooError
    from pipeline.stages.train import train

    db = digits_project / "mlflow.db"
    cfg = load_config(["family=vae", "trainer.accelerator=cpu", "vae.max_epochs=3", "vae.lr=1e30",
                       "vae.hidden=32", "vae.channels=8", f"tracking.uri=sqlite:///{db}"])
    with pytest.raises(GenzooError, match="non-finite"):
        train(cfg)
    con = sqlite3.connect(db)
    (run_id, status), = con.execute("select run_uuid, status from runs").fetchall()
    reason = con.execute("select value from tags where run_uuid = ? and key = 'genzoo.failure'", (run_id,)).fetchone()
    assert status == "FAILED" and reason and "non-finite" in reason[0]
    model_dir = digits_project / "data" / "models" / "vae"
    assert not (model_dir / "model.ckpt").exists()
    assert json.loads((model_dir / "state.json").read_text())["finished"] is False


def test_a_setting_that_does_not_fit_the_data_is_one_line(digits_project, capsys):
    """Categorical emissions need token data: digits are floats. Refused naming the key, no traceback
    (in-process: the CLI's error path is the same, without a process start)."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "family=hmm", "hmm.emission=categorical", "trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("genzoo: error:") and err.count("\n") == 1, err
    assert "hmm.emission" in err and "floats" in err
    assert not (digits_project / "data" / "models" / "hmm" / "model.ckpt").exists()
