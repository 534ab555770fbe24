"""Faults in the middle of the work, with real parts: real files and file systems, a real sqlite MLflow store,
the real console script in a subprocess, real DVC. Each fault ends in one `genzoo: error:` line (or DVC's
own refusal), a non-zero exit, the MLflow run FAILED where one was open, and no data lost:

- a full disk while `last.ckpt` or `model.ckpt` is written: the previous file is kept byte for byte
  (checkpoints are written to a temporary file beside them, fsynced and renamed over them);
- SIGKILL in the middle of `genzoo evaluate`: the rerun completes and logs no metric twice;
- two `dvc repro` at once in one project: the second is refused by DVC's lock, the first finishes;
- a read-only `mlflow.db` (or folder): one line naming the store, exit 2;
- a data file changed behind DVC's back after fetch: its sha256 against the manifest names it, exit 2;
- a GAN whose discriminator wins outright, or whose generator collapses to one point: the run FAILED, no model.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GENZOO = Path(sys.executable).with_name("genzoo")  # the installed console script, as in conftest
VAE = ["family=vae", "trainer.accelerator=cpu", "vae.max_epochs=1", "vae.iwae_k=8", "vae.hidden=32", "vae.channels=8"]
# checkpoints of a few MB, well above what the sqlite store grows to (RLIMIT_FSIZE limits every file a child writes)
BIG_VAE = VAE[:-2] + ["vae.hidden=2048", "vae.channels=16"]
EVAL = ["eval.n_samples=100", "eval.kid_subset_size=50", "eval.kid_subsets=5", "tracking.log_model=false"]
TOY = ["data.dataset=toy2d:8gaussians", "data.toy_samples=2000", "trainer.accelerator=cpu"]


def error_line(result) -> str:
    """The one `genzoo: error:` line of a clean failure: non-zero exit, nothing else on stderr, no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genzoo: error:"), out
    return lines[0]


def runs(db: Path) -> list:
    """(run id, status, failure tag) of every run in a sqlite store, read with sqlite3 itself."""
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT r.run_uuid, r.status, t.value FROM runs r LEFT JOIN tags t "
                           "ON t.run_uuid = r.run_uuid AND t.key = 'genzoo.failure' ORDER BY r.start_time").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables and nothing else, made once: MLflow's migrations take seconds
    (tens on a busy machine), so each project gets a copy (`store`)."""
    import mlflow

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
    return db


def store(project: Path, template: Path) -> str:
    """A fresh store in the project (a copy of `empty_store`), as an override naming it by its absolute path:
    MLflow caches a store per URI, so in one process a relative `sqlite:///mlflow.db` would stay the first
    project's."""
    shutil.copy(template, project / "mlflow.db")
    return f"tracking.uri=sqlite:///{project / 'mlflow.db'}"


def genzoo_cmd() -> list:
    return [str(GENZOO)] if GENZOO.is_file() else [sys.executable, "-m", "pipeline.cli"]


def child_env() -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_limited(args, cwd, preexec=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(genzoo_cmd() + list(args), cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


# --- a full disk while a checkpoint is written --------------------------------------------------------
def _mount_tmpfs(where: Path, size: str) -> bool:
    """Whether a tmpfs could be mounted there (root in a container that allows it), mounting it."""
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    except OSError:  # no mount(8)
        return False
    return r.returncode == 0


def _used_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class FullDisk:
    """The model folder on a file system that cannot take one more checkpoint.

    Where this process may mount (root, in a container that allows it): a tmpfs of its own at the folder,
    shrunk to what its files use plus half a checkpoint, so the next checkpoint write gets ENOSPC. Elsewhere
    the child process gets RLIMIT_FSIZE at half a checkpoint, with SIGXFSZ ignored, so writing past it raises
    EFBIG: the same failed write, for every file the child writes (BIG_VAE's checkpoints are larger than the
    store ever grows). GENZOO_TEST_FULL_DISK=rlimit picks the second where both work."""

    def __init__(self, model_dir: Path):
        self.model_dir, self.mounted = model_dir, False

    def __enter__(self):
        files = {p.name: p.read_bytes() for p in self.model_dir.iterdir()}
        self.checkpoint = min(len(files["last.ckpt"]), len(files["model.ckpt"]))  # model.ckpt: the weights alone
        if os.environ.get("GENZOO_TEST_FULL_DISK") != "rlimit" and _mount_tmpfs(self.model_dir, "64m"):
            self.mounted = True  # the tmpfs hides the folder's files: copy them onto it, then shrink it
            for name, data in files.items():
                (self.model_dir / name).write_bytes(data)
            size = _used_bytes(self.model_dir) + self.checkpoint // 2
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.model_dir)], check=True)
        return self

    @property
    def expected_errno(self) -> int:
        return errno.ENOSPC if self.mounted else errno.EFBIG

    def preexec(self):
        if self.mounted:
            return None
        limit = self.checkpoint // 2

        def limit_file_size():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return limit_file_size

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.model_dir)], check=False)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, digits_folder, empty_store):
    """A finished one-epoch VAE (trained in-process), its store beside it: copied by each test that breaks it.
    The train stage hashes each data file once (`pipeline.data.store` caches what it checked)."""
    import pipeline.data.store as datastore
    from pipeline.config import load_config
    from pipeline.stages.train import train

    proj = tmp_path_factory.mktemp("trained_vae")
    shutil.copy(REPO / "params.yaml", proj)
    shutil.copytree(digits_folder, proj / "data" / "prepared" / "digits")
    hashed, sha256 = [], datastore.sha256
    datastore.sha256 = lambda path: hashed.append(Path(path).name) or sha256(path)
    cwd = Path.cwd()
    try:
        os.chdir(proj)
        train(load_config(BIG_VAE + [store(proj, empty_store)]))
    finally:
        os.chdir(cwd)
        datastore.sha256 = sha256
    assert sorted(hashed) == sorted(set(hashed)), hashed  # once per file and stage
    return proj


@pytest.mark.parametrize("target", ["last.ckpt", "model.ckpt"])
def test_full_disk_keeps_the_previous_checkpoint_and_fails_the_run(trained_vae, tmp_path, target):
    """Resuming a finished run on a disk with room for half a checkpoint: another epoch fails at `last.ckpt`;
    no epoch left fails at `model.ckpt`. Either way exit 2 and one line naming the file; both checkpoints
    as they were, no temporary file left, state.json unfinished (but whole), the run FAILED with the reason."""
    proj = tmp_path / "project"
    shutil.copytree(trained_vae, proj)
    model_dir = proj / "data" / "models" / "vae"
    before = {name: (model_dir / name).read_bytes() for name in ("last.ckpt", "model.ckpt")}
    run_id = json.loads((model_dir / "state.json").read_text())["run_id"]
    more = ["vae.max_epochs=2"] if target == "last.ckpt" else []

    with FullDisk(model_dir) as disk:
        r = run_limited(["train"] + BIG_VAE + more + ["resume=true"], proj, disk.preexec())
        after = {name: (model_dir / name).read_bytes() for name in before}
        left = sorted(p.name for p in model_dir.iterdir())
        state = json.loads((model_dir / "state.json").read_text())

    line = error_line(r)
    assert line.startswith("genzoo: error: cannot write ") and f"data/models/vae/{target}: " in line, line
    assert f"(errno {disk.expected_errno})" in line, line
    assert f"the previous {target} is kept" in line, line
    assert after == before  # byte for byte
    assert not [n for n in left if n.endswith(".tmp")], left
    assert state["finished"] is False and state["run_id"] == run_id
    (rid, status, reason), = runs(proj / "mlflow.db")
    assert (rid, status) == (run_id, "FAILED") and target in reason and "\n" not in reason, reason


# --- SIGKILL in the middle of evaluate ------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A data root holding the 8-Gaussians toy (2000 points): vectors, so no feature network is needed."""
    from pipeline.config import load_config
    from pipeline.data.sources import load_source
    from pipeline.data.store import write_prepared
    from pipeline.paths import prepared_dir

    root = tmp_path_factory.mktemp("toy_data")
    cfg = load_config(TOY + [f"data.root={root}"], params_file=str(REPO / "params.yaml"))
    write_prepared(load_source(cfg.data), prepared_dir(cfg.data), cfg.data.dataset, cfg.data.seed)
    return root


@pytest.fixture
def toy_project(project_dir, toy_data) -> Path:
    shutil.copytree(toy_data / "prepared", project_dir / "data" / "prepared")
    return project_dir


# `genzoo evaluate` whose first artifact upload (right after the metrics are logged) never returns
SLOW_ARTIFACTS = ("import sys, time, mlflow; mlflow.log_artifact = lambda *a, **k: time.sleep(600); "
                  "from pipeline.cli import main; main(sys.argv[1:])")


def test_sigkill_during_evaluate_then_rerun_logs_each_metric_once(toy_project, empty_store, capsys):
    from pipeline.cli import main

    toy = TOY + [store(toy_project, empty_store)]
    main(["train", "family=gmm", "gmm.max_epochs=3"] + toy)
    run_id = json.loads((toy_project / "data" / "models" / "gmm" / "state.json").read_text())["run_id"]
    db = toy_project / "mlflow.db"

    def logged() -> dict:
        con = sqlite3.connect(db)
        try:
            return dict(con.execute("SELECT key, COUNT(*) FROM metrics WHERE run_uuid = ? AND "
                                    "(key LIKE 'test/%' OR key = 'perf/samples_per_second') GROUP BY key", (run_id,)))
        finally:
            con.close()

    # killed at the worst moment: every metric logged, the artifacts, the tag and the report not yet
    child = subprocess.Popen([sys.executable, "-c", SLOW_ARTIFACTS, "evaluate", "family=gmm"] + toy + EVAL,
                             cwd=toy_project, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not logged() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    first = logged()
    assert first and set(first.values()) == {1}, first
    assert not (toy_project / "reports" / "families" / "gmm.json").exists()

    main(["evaluate", "family=gmm"] + toy + EVAL)  # the rerun (in-process: the same code as the CLI's)
    capsys.readouterr()
    assert logged() == first  # each metric once: the rerun took up the killed evaluation's step
    report = json.loads((toy_project / "reports" / "families" / "gmm.json").read_text())
    assert "test/fid" in first and set(first) <= {f"test/{k}" for k in report["metrics"]} | {"perf/samples_per_second"}
    (rid, status, _), = runs(db)
    assert status == "FINISHED"

    main(["evaluate", "family=gmm"] + toy + EVAL)  # a finished evaluation again: a new step, no duplicate step
    con = sqlite3.connect(db)
    steps = con.execute("SELECT key, GROUP_CONCAT(step) FROM metrics WHERE run_uuid = ? AND key = 'test/fid' "
                        "GROUP BY key", (run_id,)).fetchall()
    con.close()
    assert sorted(steps[0][1].split(",")) == ["0", "1"], steps


# --- two `dvc repro` at once ----------------------------------------------------------------------------
def test_second_concurrent_dvc_repro_is_refused_and_the_first_finishes(tmp_path):
    """The project's own dvc.yaml and fetch stage in a fresh DVC project: while one `dvc repro fetch` runs
    `genzoo fetch`, a second one in the same folder stops at DVC's lock with one ERROR line."""
    proj = tmp_path / "dvcproj"
    proj.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "lightning_modules"):
        shutil.copytree(REPO / name, proj / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", "data/user/README.md"):  # data/user: a dep of the fetch stage
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, proj / name)
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=proj, env=env, check=True, capture_output=True)

    first = subprocess.Popen(dvc + ["repro", "fetch"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "Running stage 'fetch'" not in seen:  # DVC prints it as the stage's command starts
        line = first.stdout.readline()
        assert line, seen
        seen += line
    second = subprocess.run(dvc + ["repro", "fetch"], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    rest, _ = first.communicate(timeout=300)

    assert first.returncode == 0, seen + rest
    assert json.loads((proj / "data" / "prepared" / "digits" / "manifest.json").read_text())["dataset"] == "digits"
    assert (proj / "dvc.lock").is_file()
    out = second.stdout + second.stderr
    assert second.returncode != 0 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, out
    assert "is busy" in errors[0] or "Unable to acquire lock" in errors[0], errors[0]


# --- a read-only store ----------------------------------------------------------------------------------
def _without_dac_override():
    """Root writes through permission bits: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so the exec'd child (still root, owner of the files) obeys them like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_store_is_one_line_naming_it(digits_project, empty_store):
    """`mlflow.db` read-only (chmod 444), and a store in a read-only folder (chmod 555): exit 2, one line
    naming the store, before any run or model exists."""
    stores = {}
    for case in ("file", "folder"):
        (digits_project / f"store_{case}").mkdir()
        store(digits_project / f"store_{case}", empty_store)
        stores[case] = digits_project / f"store_{case}" / "mlflow.db"
    stores["file"].chmod(0o444)
    stores["folder"].parent.chmod(0o555)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    try:
        children = {case: subprocess.Popen(genzoo_cmd() + ["train"] + VAE + [f"tracking.uri=sqlite:///{db}"],
                                           cwd=digits_project, env=child_env(), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
                    for case, db in stores.items()}  # both at once: two process starts in the time of one
        results = {}
        for case, c in children.items():
            out, err = c.communicate(timeout=300)
            results[case] = subprocess.CompletedProcess(c.args, c.returncode, out, err)
    finally:
        stores["folder"].parent.chmod(0o755)
        stores["file"].chmod(0o644)
    for case, r in results.items():
        line = error_line(r)
        assert f"the MLflow store sqlite:///{stores[case]} cannot be written" in line, line
        assert "readonly database" in line or f"Permission denied: {stores[case]}.lock" in line, line
        assert runs(stores[case]) == []
    assert not (digits_project / "data" / "models" / "vae" / "model.ckpt").exists()


# --- data changed behind DVC's back ---------------------------------------------------------------------
def test_data_changed_after_fetch_is_named(digits_project, empty_store, capsys):
    """train_x.npy replaced by another valid array of the same shape (other digits): the manifest's sha256
    names it, exit 2, and the run that opened is FAILED with the reason."""
    from pipeline.cli import main

    path = digits_project / "data" / "prepared" / "digits" / "train_x.npy"
    x = np.load(path)
    np.save(path, x[::-1].copy())  # a well-formed file, other content
    with pytest.raises(SystemExit) as e:
        main(["train"] + VAE + [store(digits_project, empty_store)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("genzoo: error:"), err
    assert "train_x.npy" in err and "changed after fetch" in err and "genzoo fetch" in err
    [(_, status, reason)] = runs(digits_project / "mlflow.db")
    assert status == "FAILED" and "train_x.npy" in reason
    assert not (digits_project / "data" / "models" / "vae" / "model.ckpt").exists()


# --- a GAN that diverges ----------------------------------------------------------------------------------
GAN = ["family=gan", "gan.width=16", "gan.mlp_layers=1", "gan.fid_every_n_epochs=1000", "gan.collapse_epochs=2"]


def assert_failed_without_model(project: Path, err: str, named: str) -> None:
    assert err.startswith("genzoo: error: training diverged: gan:") and err.count("\n") == 1, err
    assert named in err, err
    [(_, status, reason)] = runs(project / "mlflow.db")
    assert status == "FAILED" and named in reason, reason
    model_dir = project / "data" / "models" / "gan"
    assert not (model_dir / "model.ckpt").exists()
    assert json.loads((model_dir / "state.json").read_text())["finished"] is False


def test_gan_whose_discriminator_wins_fails_the_run(toy_project, empty_store, capsys):
    """G frozen (a learning rate of 1e-30) and an unconstrained D at a high rate: D's loss falls to ~0 within
    a few epochs and stays there; two such epochs in a row end training FAILED."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train"] + TOY + GAN + [store(toy_project, empty_store), "gan.lr_g=1e-30", "gan.spectral_norm=false", "gan.lr_d=0.01", "gan.max_epochs=40"])
    assert e.value.code == 2
    assert_failed_without_model(toy_project, capsys.readouterr().err, "the discriminator won")


def test_gan_whose_generator_collapses_to_a_point_fails_the_run(toy_project, empty_store, capsys, monkeypatch):
    """A generator whose every sample is the same point (forced in-process): mode collapse, FAILED."""
    from lightning_modules.gan.model import GAN as GANModel
    from pipeline.cli import main

    generate = GANModel.generate  # the real G, its first sample repeated
    monkeypatch.setattr(GANModel, "generate", staticmethod(lambda g, z, y: generate(g, z, y)[:1].expand(len(z), -1)))
    with pytest.raises(SystemExit) as e:
        main(["train"] + TOY + GAN + [store(toy_project, empty_store), "gan.max_epochs=10"])
    assert e.value.code == 2
    assert_failed_without_model(toy_project, capsys.readouterr().err, "mode collapse")
