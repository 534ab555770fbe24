"""End to end: a real `dvc repro` in a temporary git clone, with a tiny config, fills a real sqlite
MLflow store and writes the report; a second `dvc repro` does nothing."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "featnet": {"max_epochs": 2},
    "eval": {"n_samples": 200, "kid_subset_size": 50, "kid_subsets": 5},
    "gmm": {"max_epochs": 3},
    "hmm": {"max_epochs": 2},
    "rbm": {"max_epochs": 1, "ais_chains": 16, "ais_steps": 200, "sample_steps": 50},
    "vae": {"max_epochs": 2, "iwae_k": 8},
    "gan": {"max_epochs": 2},
    "flow": {"max_epochs": 1},
    "diffusion": {"max_epochs": 1, "channels": 8, "sample_steps": 4, "bound_samples": 2,
                  "guidance_sweep": [0.0, 2.0]},
}


def run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git repository")
    project = tmp_path_factory.mktemp("e2e") / "genzoo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "clone", "-q", str(ROOT), str(project)], project.parent, env)
    # the working tree's pipeline (not only HEAD's) is what this test checks
    for name in ("pipeline", "lightning_modules", "dvc.yaml", "params.yaml", "data/user/README.md"):
        src, dst = ROOT / name, project / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = run(["dvc", "repro"], project, env)
    return project, env, params, first


def test_repro_writes_metrics_for_every_family(repro):
    project, _, params, _ = repro
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for family in params["families"]:
        assert family in metrics, f"no {family} row in metrics.json"
        assert "fid" in metrics[family] and metrics[family]["fid"] > 0
    for family in ("gmm", "hmm", "rbm", "vae", "flow", "diffusion"):
        assert metrics[family]["nll"] > 0 and metrics[family]["bpd"] > 0
    assert "nll" not in metrics["gan"], "a GAN has no likelihood: it must not report a number"
    # the diffusion model's guidance sweep: every scale scored, and drawn in the report
    assert metrics["diffusion"]["nll_kind"] == "lower_bound"
    for w in ("w0", "w2"):
        for key in ("fid", "precision", "recall", "kid_mean"):
            assert f"{key}_{w}" in metrics["diffusion"], f"no {key}_{w} in the diffusion row"
    html = (project / "reports" / "index.html").read_text()
    assert "Sample quality against diversity" in html
    assert html.count("<tr") >= len(params["families"]) + 2  # header + families + real-data floor
    assert "data:image/png;base64," in html


def test_every_family_models_the_joint_on_labelled_data(repro):
    """Digits have labels, so by default every family is conditional: the label metrics are in every row
    (gen_class_acc only where there is a likelihood), the real-data row has its baselines, and the report
    shows one grid row per class for every family."""
    project, _, params, _ = repro
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for family in params["families"]:
        row = metrics[family]
        assert 0 <= row["cond_acc"] <= 1 and 0 <= row["cas"] <= 1, family
        assert ("gen_class_acc" in row) == ("nll" in row), family
        grid = json.loads((project / "reports" / "families" / f"{family}.json").read_text())["class_samples_png"]
        img = _image(project / grid)
        assert img.shape[0] > img.shape[1], f"{family}: 10 rows of 8 samples should be taller than wide"
    assert {"cas", "logreg_acc", "accuracy"} <= set(metrics["real_data"])
    html = (project / "reports" / "index.html").read_text()
    assert "Samples by class" in html and "CAS" in html and "Bayes classifier acc" in html


def test_mlflow_store_holds_one_finished_run_per_family(repro):
    project, _, params, _ = repro
    db = sqlite3.connect(project / "mlflow.db")
    rows = db.execute("""select t.value, r.status, r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid
                         where t.key = 'genzoo.family'""").fetchall()
    families = sorted(v for v, _, _ in rows)
    assert families == sorted(params["families"])
    for family, status, run_id in rows:
        assert status == "FINISHED", family
        keys = {k for (k,) in db.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}
        assert {"test/fid", "perf/train_seconds", "perf/samples_per_second", "val/loss"} <= keys, (family, keys)
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
        assert {"genzoo.dataset", "genzoo.git_commit", "genzoo.data_hash", "test/nll_kind", "genzoo.pipeline_run"} <= set(tags)
        assert "mlflow.parentRunId" not in tags, family  # a row of its own in the runs table, not folded
        inputs = db.execute("""select d.name, d.digest from inputs i join datasets d on d.dataset_uuid = i.source_id
                               where i.destination_id = ?""", (run_id,)).fetchall()
        assert inputs and inputs[0][0] == "digits" and tags["genzoo.data_hash"].startswith(inputs[0][1]), inputs


def test_second_repro_is_up_to_date(repro):
    project, env, _, _ = repro
    out = run(["dvc", "repro"], project, env)
    assert "up to date" in out.lower()


def test_compare_prints_every_family(repro):
    project, env, params, _ = repro
    out = run(["genzoo", "compare"], project, env)
    for family in params["families"]:
        assert family in out


def _image(path: Path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= 16, img.shape
    return img


@pytest.mark.parametrize("family", ["vae", "gmm", "gan"])
def test_sample_from_the_logged_mlflow_model_and_from_the_checkpoint(repro, family):
    project, env, _, _ = repro
    run_id = json.loads((project / "reports" / "families" / f"{family}.json").read_text())["run_id"]
    for ref, out in ((f"runs:/{run_id}/model", "from_mlflow.png"), (f"data/models/{family}/model.ckpt", "from_ckpt.png")):
        run(["genzoo", "sample", "--model", ref, "-n", "16", "-o", out], project, env)
        img = _image(project / out)
        assert img[..., :3].std() > 0.01, f"{family} samples from {ref} are a blank image"


@pytest.mark.parametrize("family", ["gmm", "gan", "diffusion"])
def test_sample_a_requested_class(repro, family):
    import torch

    project, env, _, _ = repro
    run(["genzoo", "sample", "--model", f"data/models/{family}/model.ckpt", "--label", "3", "-n", "8", "-o", "three.pt"],
        project, env)
    samples = torch.load(project / "three.pt", weights_only=True)
    assert samples.shape == (8, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    bad = subprocess.run(["genzoo", "sample", "--model", f"data/models/{family}/model.ckpt", "--label", "10"],
                         cwd=project, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--label" in bad.stderr, bad.stderr


def test_the_logged_pyfunc_predicts_the_class_posterior(repro):
    """The MLflow model of a family that classifies serves p(y | x): one row of 10 probabilities per image."""
    project, env, _, _ = repro
    run_id = json.loads((project / "reports" / "families" / "gmm.json").read_text())["run_id"]
    script = (f"import mlflow.pyfunc, numpy as np; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
              f"m = mlflow.pyfunc.load_model('runs:/{run_id}/model'); "
              "p = np.asarray(m.predict(np.random.default_rng(0).uniform(size=(4, 1, 8, 8)).astype(np.float32))); "
              "print(p.shape, np.abs(p.sum(1) - 1).max() < 1e-5, (p >= 0).all())")
    out = run([sys.executable, "-c", script], project, env)
    assert "(4, 10) True True" in out, out


TIMING = ("seconds", "per_second", "memory")


def test_forced_rerun_gives_bit_identical_metrics(repro):
    """`dvc repro -f` of train + evaluate, same params and seed: every metric but the timings is identical."""
    project, env, _, _ = repro
    families = ("vae", "gmm", "gan")
    before = {f: json.loads((project / "reports" / "families" / f"{f}.json").read_text())["metrics"] for f in families}
    run(["dvc", "repro", "-f", "-s"] + [f"{stage}@{f}" for f in families for stage in ("train", "evaluate")], project, env)
    for f in families:
        after = json.loads((project / "reports" / "families" / f"{f}.json").read_text())["metrics"]
        assert after.keys() == before[f].keys()
        differ = {k: (before[f][k], after[k]) for k in after if not any(t in k for t in TIMING) and after[k] != before[f][k]}
        assert not differ, f"{f}: {differ}"


def test_dvc_plots_show_renders_the_curves_and_sample_grids(repro):
    """`dvc plots show --json` (DVC's own renderer): a validation-loss curve and a sample-grid image per
    family, with the curve's rows read back from the report's files."""
    project, env, params, _ = repro
    out = subprocess.run(["dvc", "plots", "show", "--json"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    for family in params["families"]:
        assert [p["type"] for p in plots[f"reports/samples/{family}.png"]] == ["image"], family
        curve = plots[f"reports/plots/{family}.json"]
        assert [p["type"] for p in curve] == ["vega"], family
        rows = json.loads((project / "reports/plots" / f"{family}.json").read_text())
        values = curve[0]["content"]["data"]["values"]
        assert [(v["step"], v["val_loss"]) for v in values] == [(r["step"], r["val_loss"]) for r in rows], family
    html_out = subprocess.run(["dvc", "plots", "show", "-o", str(project.parent / "dvc_plots")], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
    assert html_out.returncode == 0, html_out.stderr
    page = (project.parent / "dvc_plots" / "index.html").read_text()
    assert all(f"reports_samples_{family}.png" in page for family in params["families"])


def _file_hashes(root: Path, folders) -> dict:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_push_to_and_pull_from_a_local_remote_is_bit_identical(repro, tmp_path):
    """`dvc push` to a local remote, the cached outputs and the cache deleted, `dvc pull`: every file is back
    with the same bytes, and `dvc status` finds the pipeline up to date."""
    project, env, _, _ = repro
    run(["dvc", "repro"], project, env)  # up to date first (the forced rerun above leaves the report stale)
    cached = ["data/prepared", "data/featnet", "data/models"]
    before = _file_hashes(project, cached)
    assert len(before) > 10
    run(["dvc", "remote", "add", "--local", "-f", "-d", "scratch", str(tmp_path / "remote")], project, env)
    run(["dvc", "push"], project, env)
    for folder in cached + [".dvc/cache"]:
        shutil.rmtree(project / folder)
    run(["dvc", "pull"], project, env)
    assert _file_hashes(project, cached) == before
    assert "up to date" in run(["dvc", "status"], project, env).lower()


def test_queued_dvc_experiment_logs_into_the_projects_store(repro):
    """`dvc exp run --queue -S vae.latent_dim=4` + `--run-all`: DVC runs the experiment in a copy of the
    project under .dvc/tmp/exps/ and deletes it; its MLflow run must land in the project's mlflow.db, and
    `dvc exp show` lists the experiment with its metrics."""
    project, env, _, _ = repro
    env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "baseline after repro"], project, env)
    run(["dvc", "exp", "run", "--queue", "-S", "vae.latent_dim=4"], project, env)
    run(["dvc", "exp", "run", "--run-all"], project, env)

    db = sqlite3.connect(project / "mlflow.db")
    latent = db.execute("""select r.status from runs r join params p on p.run_uuid = r.run_uuid
                           where p.key = 'vae.latent_dim' and p.value = '4'""").fetchall()
    assert latent == [("FINISHED",)], latent
    named = db.execute("""select t.value from tags t join params p on p.run_uuid = t.run_uuid
                          where p.key = 'vae.latent_dim' and p.value = '4' and t.key = 'genzoo.dvc_experiment'""").fetchall()
    assert len(named) == 1 and named[0][0], named  # the queued experiment's name (DVC_EXP_NAME)
    out = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = json.dumps(json.loads(out.stdout))
    assert '"latent_dim": 4' in shown and '"latent_dim": 16' in shown  # the experiment beside its baseline
