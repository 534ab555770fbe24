"""Sweeps that compare, and MLflow as users expect it (issue 13): a dataset's short name names its folder, the
experiment, the runs and the registered model; `genzoo train -m` trains every point into its own folder and
evaluates it, one run per point named after it and holding only its family's params; `genzoo compare --sweep`
shows the sweep; `tracking.register` registers the model and the alias `champion` follows the best version.
Real sqlite stores and real console scripts; no mocks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline.data.names import USER_SOURCE_KINDS, dataset_slug
from pipeline.sweeps import expand, point_slug, sweep_point

MOONS = ["data.dataset=toy2d:moons", "data.toy_samples=1000"]
FAST = ["trainer.accelerator=cpu", "gmm.max_epochs=3", "eval.n_samples=100", "eval.kid_subset_size=50",
        "eval.kid_subsets=5"]


@pytest.mark.parametrize("dataset, slug", [
    ("digits", "digits"), ("toy2d:moons", "toy2d-moons"), ("hmm_synthetic", "hmm_synthetic"), ("text", "text"),
    ("npy:/x/y/wine.npz", "wine"), ("csv:data/user/wine.csv", "wine"), ("imagefolder:path/to/folder", "folder"),
    ("imagefolder:path/to/folder/", "folder"), ("text:story.txt", "story"), ("npy:my data (1).npy", "my-data--1-"),
    ("npz:.hidden.npz", "hidden"), ("csv:été.csv", "-t-"),
])
def test_a_dataset_slug_is_one_safe_name(dataset, slug):
    assert dataset_slug(dataset) == slug


def test_a_user_path_never_nests_folders_under_prepared():
    from omegaconf import OmegaConf

    from pipeline.paths import prepared_dir

    for dataset in ("csv:data/user/wine.csv", "npy:/abs/path/to/x.npy", "imagefolder:a/b/c/"):
        folder = prepared_dir(OmegaConf.create({"root": "data", "dataset": dataset}))
        assert folder.parent == Path("data/prepared") and folder.name == dataset_slug(dataset)


def test_the_slug_knows_every_user_source():
    from pipeline.data.sources import USER_SOURCES

    assert set(USER_SOURCE_KINDS) == set(USER_SOURCES)


def test_a_sweep_point_is_named_by_its_swept_overrides():
    points, swept = expand(["family=gmm", "data.dataset=toy2d:moons", "gmm.n_components=2,3", "trainer.seed=0,1"])
    assert swept == ["gmm.n_components", "trainer.seed"] and len(points) == 4
    p = sweep_point("s1", points[-1], swept, "gmm")
    assert p.overrides == ("gmm.n_components=3", "trainer.seed=1") and p.slug == "n_components=3,trainer.seed=1"
    # nothing swept: every override but the family; a dataset value by its slug; a long slug is cut and hashed
    points, swept = expand(["family=gmm", "gmm.n_components=3", "data.dataset=csv:data/user/wine.csv"])
    assert sweep_point("s1", points[0], swept, "gmm").slug == "n_components=3,data.dataset=wine"
    long = point_slug([f"gmm.k{i}={'x' * 30}" for i in range(5)], "gmm")
    assert len(long) == 100 and long != point_slug([f"gmm.k{i}={'x' * 30}" for i in range(4)] + ["gmm.k4=y"], "gmm")


def _store(project: Path):
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # MLflow before 3.1.3 lists a run's artifacts through the global store
    return mlflow.MlflowClient(uri)


def _gmm_runs(c, experiment="genzoo-toy2d-moons"):
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "tags.`genzoo.family` = 'gmm'")


def test_a_sweep_trains_and_evaluates_every_point_in_its_own_folder(project_dir, genzoo, capsys):
    """Two points: two finished runs named after their point, each with `test/*` metrics and its sample grid,
    gmm's params only, the sweep's tags (and the DVC experiment's, from the variable `dvc exp run` sets); each
    model in its own folder; the default model folder and the pipeline's reports untouched."""
    cli.main(["fetch", *MOONS])
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_EXP_NAME": "tidy-moth"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([str(cli_script()), "train", "-m", "family=gmm", *MOONS, "gmm.conditional=false",
                        "gmm.n_components=2,3", *FAST, "tracking.log_model=false"],
                       cwd=project_dir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    runs = _gmm_runs(_store(project_dir))
    assert sorted(x.info.run_name for x in runs) == ["gmm-toy2d-moons-n_components=2", "gmm-toy2d-moons-n_components=3"]
    folders = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED" and "test/nll" in run.data.metrics
        assert {k.split(".")[0] for k in params} == {"data", "trainer", "eval", "gmm"}, sorted(params)
        n = params["gmm.n_components"]
        assert run.info.run_name.endswith(f"n_components={n}") and tags["genzoo.sweep_point"] == f"gmm.n_components={n}"
        assert tags["genzoo.dvc_experiment"] == "tidy-moth"
        (data,) = _store(project_dir).get_run(run.info.run_id).inputs.dataset_inputs  # the UI's Dataset column
        profile = json.loads(data.dataset.profile)
        assert data.dataset.name == "toy2d-moons" and tags["genzoo.data_hash"].startswith(data.dataset.digest)
        assert profile["content_hash"] == tags["genzoo.data_hash"] and profile["features_shape"][1] == 2
        assert json.loads(data.dataset.schema) and [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
        assert [a.path for a in _store(project_dir).list_artifacts(run.info.run_id, "samples")] == ["samples/gmm.png"]
        folder = project_dir / "data" / "sweeps" / "gmm" / f"n_components={n}"
        assert json.loads((folder / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
        assert (folder / "model.ckpt").is_file()
        report = json.loads((project_dir / "reports" / "sweeps" / "gmm" / folder.name / "gmm.json").read_text())
        assert report["run_id"] == run.info.run_id and report["metrics"]["nll"] == pytest.approx(run.data.metrics["test/nll"])
        folders[run.info.run_id] = folder
    assert len(set(folders.values())) == 2 and len({r.data.tags["genzoo.sweep"] for r in runs}) == 1
    assert not (project_dir / "data" / "models").exists() and not (project_dir / "reports" / "families").exists()

    # the sweep's report page: one row per point, its metrics and sample grid, written when the sweep ends
    sweep_id = runs[0].data.tags["genzoo.sweep"]
    page = project_dir / "reports" / "sweeps" / f"{sweep_id}.html"
    assert f"report: {Path('reports/sweeps') / f'{sweep_id}.html'}" in r.stdout
    text = page.read_text()
    for run in runs:
        assert f"<th>{run.info.run_name}</th>" in text and f"{run.data.metrics['test/nll']:.2f}</td>" in text
    assert text.count('alt="gmm-toy2d-moons-n_components=') == 2 and "<th>sweep point</th>" in text
    page.unlink()
    cli.main(["report", "--sweep", sweep_id, *MOONS, "family=gmm", f"tracking.uri=sqlite:///{project_dir / 'mlflow.db'}"])
    assert f"reports/sweeps/{sweep_id}.html" in capsys.readouterr().out and page.read_text().count("<tr><th>gmm-") == 2

    # `genzoo compare`: with only sweep runs, the latest sweep, one row per point (as with --sweep)
    for extra in ([], ["--sweep"]):
        cli.main(["compare", *extra, *MOONS, f"tracking.uri=sqlite:///{project_dir / 'mlflow.db'}"])
        out = capsys.readouterr().out
        assert "sweep point" in out and "n_components=2" in out and "n_components=3" in out, out


def cli_script() -> Path:
    from conftest import GENZOO

    return GENZOO


def test_registered_champion_is_the_best_version_and_loads(project_dir, genzoo, capsys):
    """`tracking.register=true`: every evaluation registers a version of genzoo-toy2d-moons-gmm; `champion` is the
    one whose run has the lowest test/nll (read here from the runs), and `models:/...@champion` loads and predicts."""
    import mlflow

    uri = f"sqlite:///{project_dir / 'mlflow.db'}"
    common = ["family=gmm", *MOONS, "gmm.conditional=false", *FAST, "tracking.register=true",
              "tracking.log_model=true", f"tracking.uri={uri}"]
    cli.main(["fetch", *MOONS])
    cli.main(["train", *common, "gmm.n_components=4"])  # the plain stages (dvc.yaml's train and evaluate)
    cli.main(["evaluate", *common, "gmm.n_components=4"])
    first = json.loads((project_dir / "reports" / "families" / "gmm.json").read_text())["registered_model"]
    assert first == {"name": "genzoo-toy2d-moons-gmm", "version": 1, "champion": True}
    r = genzoo(["train", "-m", *common, "gmm.n_components=1,8"], cwd=project_dir)  # two more versions, in a sweep
    assert r.returncode == 0, r.stdout + r.stderr
    capsys.readouterr()

    c = mlflow.MlflowClient(uri)
    versions = c.search_model_versions("name = 'genzoo-toy2d-moons-gmm'")
    assert len(versions) == 3
    nll = {str(v.version): c.get_run(v.run_id).data.metrics["test/nll"] for v in versions}
    champion = c.get_model_version_by_alias("genzoo-toy2d-moons-gmm", "champion")
    assert nll[str(champion.version)] == min(nll.values()), (champion.version, nll)
    n = {str(v.version): c.get_run(v.run_id).data.params["gmm.n_components"] for v in versions}
    assert n == {"1": "4", "2": "1", "3": "8"}
    for version, k in (("2", 1), ("3", 8)):  # each evaluation's own verdict, against the champion before it
        report = json.loads((project_dir / f"reports/sweeps/gmm/n_components={k}/gmm.json").read_text())
        assert report["registered_model"]["champion"] == (nll[version] < min(nll[v] for v in nll if v < version))

    # `genzoo compare`: the family's latest run outside sweeps, naming the newer sweep; --sweep: its 2 points;
    # --all: the 3 runs
    for extra, rows, note in (([], ["gmm "], "a newer sweep"),
                              (["--sweep"], ["n_components=1", "n_components=8"], "sweep "),
                              (["--all", "family=gmm"], ["n_components=1", "n_components=8", "gmm-toy2d-moons "], "")):
        cli.main(["compare", *extra, *MOONS, f"tracking.uri={uri}"])
        out = capsys.readouterr().out
        assert all(row in out for row in rows) and note in out, out
        assert out.count("│ gmm") == len(rows), out

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/genzoo-toy2d-moons-gmm@champion")
    scores = np.asarray(model.predict(np.array([[0.0, 0.5], [1.0, -0.5], [9.0, 9.0]], dtype=np.float32)))
    assert scores.shape == (3,) and np.isfinite(scores).all() and scores[2] > scores[:2].max()  # far away: anomalous
    folder = Path(mlflow.artifacts.download_artifacts("models:/genzoo-toy2d-moons-gmm@champion"))
    assert (folder / "input_example.json").is_file()
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("genzoo") for line in requirements) and any(line.startswith("torch==") for line in requirements)
