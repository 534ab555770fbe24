"""Scale-out and fault tolerance, for real (CPU, gloo, no mocks): the launchers a cluster uses start every
rank themselves (torchrun, SLURM's srun), several jobs share one MLflow store, and `-m` sweeps.

* torchrun: 2 ranks of `python -m pipeline.cli train` make ONE finished MLflow run and exactly the GMM
  of a 1-process run (EM all-reduces its sufficient statistics, so the result is world-size free).
* SLURM: 2 processes started with the variables srun sets (no SLURM installed) are wired by Lightning's
  SLURMEnvironment; docs/slurm/genzoo.sbatch itself runs end to end with a stand-in `srun`.
* Concurrency: two jobs started at once on the same fresh sqlite store both finish with full histories.
* Sweep: `genzoo train -m gmm.n_components=2,3` gives one finished, evaluated run per point.

Every multi-process test starts from a fresh store, as a first job on a cluster does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GENZOO, PARAMS, REPO

SBATCH = REPO / "docs" / "slurm" / "genzoo.sbatch"
GMM = ["family=gmm", "trainer.accelerator=cpu", "gmm.max_epochs=3", "gmm.tol=0", "tracking.log_model=false"]
VAE = ["family=vae", "trainer.accelerator=cpu", "vae.max_epochs=2", "vae.hidden=32", "vae.channels=8",
       "vae.iwae_k=8", "tracking.log_model=false"]
DDP2 = ["trainer.devices=2", "trainer.strategy=ddp"]
TIMEOUT = 240
# launcher / cluster variables a parent (or an earlier in-process DDP test) may leave behind
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _genzoo(*args) -> list:
    return ([str(GENZOO)] if GENZOO.is_file() else [sys.executable, "-m", "pipeline.cli"]) + list(args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(root: Path, digits_folder: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(PARAMS, root / "params.yaml")
    shutil.copytree(digits_folder, root / "data" / "prepared" / "digits")
    return root


def _uri(db: Path) -> str:
    assert db.is_absolute()
    return f"tracking.uri=sqlite:///{db}"  # sqlite:////abs/path


class Result:
    def __init__(self, returncode: int, stdout: str):
        self.returncode, self.stdout = returncode, stdout


def _start(cmd, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (so it and every rank it starts can be killed together), output to `log`."""
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(procs, timeout: float, kill_on_bad_exit: bool = False) -> list:
    """Exit codes. Past the timeout, or (like `srun --kill-on-bad-exit`) once a task failed, the rest are killed
    with their whole process group, so a rank waiting for a dead peer cannot hang the test (they read -9)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]  # poll every process, every round
            if all(c is not None for c in codes) or (kill_on_bad_exit and any(codes)):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    return [p.returncode for p in procs]


def _run(cmd, cwd: Path, env: dict, timeout: float = TIMEOUT):
    log = cwd.parent / f"{cwd.name}-{time.monotonic_ns()}.log"
    start = time.perf_counter()
    (code,) = _wait_all([_start(cmd, cwd, env, log)], timeout)
    return Result(code, log.read_text()), time.perf_counter() - start


def _ok(out) -> str:
    why = " (killed at the timeout)" if out.returncode == -signal.SIGKILL else ""
    assert out.returncode == 0, f"exit {out.returncode}{why}\n{out.stdout[-5000:]}"
    return out.stdout


def _query(db: Path, sql: str, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _runs(db: Path) -> list:
    return _query(db, "SELECT run_uuid, status FROM runs ORDER BY start_time")


def _metric_counts(db: Path, run_id: str) -> dict:
    return dict(_query(db, "SELECT key, COUNT(*) FROM metrics WHERE run_uuid = ? GROUP BY key", run_id))


def _param(db: Path, run_id: str, key: str) -> str:
    rows = _query(db, "SELECT value FROM params WHERE run_uuid = ? AND key = ?", run_id, key)
    assert len(rows) == 1, (run_id, key, rows)
    return rows[0][0]


def _gmm_state(project: Path) -> dict:
    ckpt = project / "data" / "models" / "gmm" / "model.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert {"weights", "means", "prec_chol"} <= a.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-5), f"{k} differs"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def _one_finished_run(project: Path, db: Path) -> str:
    """The store holds exactly one run, FINISHED, the one the GMM folder names, trained on 2 devices."""
    run_file = json.loads((project / "data" / "models" / "gmm" / "mlflow_run.json").read_text())
    state = json.loads((project / "data" / "models" / "gmm" / "state.json").read_text())
    assert _runs(db) == [(run_file["run_id"], "FINISHED")], _runs(db)
    assert state["finished"] and state["run_id"] == run_file["run_id"]
    assert _param(db, run_file["run_id"], "trainer.devices") == "2"
    counts = _metric_counts(db, run_file["run_id"])
    assert counts.get("val/loss") == 3 and counts.get("train/loglik") == 3, counts  # one EM step per epoch, logged once
    return run_file["run_id"]


@pytest.fixture(scope="module")
def single_gmm(tmp_path_factory, digits_folder):
    """The reference: the same GMM trained by one plain process (1 device)."""
    project = _project(tmp_path_factory.mktemp("gmm_single") / "project", digits_folder)
    db = project / "mlflow.db"
    out, seconds = _run(_genzoo("train", *GMM, "trainer.devices=1", _uri(db)), project, _env())
    _ok(out)
    assert [s for _, s in _runs(db)] == ["FINISHED"]
    print(f"\n[scaleout] 1-process GMM train: {seconds:.1f} s")
    return {"state": _gmm_state(project), "seconds": seconds}


def test_torchrun_two_ranks_one_run_same_gmm(digits_project, tmp_path, single_gmm):
    db = tmp_path / "torchrun.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "pipeline.cli", "train", *GMM, *DDP2, _uri(db)]
    out, seconds = _run(cmd, digits_project, _env(OMP_NUM_THREADS=1))
    stdout = _ok(out)
    assert stdout.count("trained gmm:") == 2, stdout  # both ranks ran the train stage to the end

    _one_finished_run(digits_project, db)
    diff = _max_diff(single_gmm["state"], _gmm_state(digits_project))
    print(f"\n[scaleout] torchrun 2-rank GMM train: {seconds:.1f} s (1 process: {single_gmm['seconds']:.1f} s); "
          f"max |param diff| {diff:.3g}")


def _slurm_env(project: Path, **extra) -> dict:
    """What SLURM puts in a job's environment for `--nodes=1 --ntasks-per-node=2` (batch step)."""
    return _env(SLURM_JOB_ID=4242, SLURM_JOB_NAME="genzoo", SLURM_NTASKS=2, SLURM_NPROCS=2,
                SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=1, SLURM_JOB_NUM_NODES=1, SLURM_NODEID=0, SLURM_PROCID=0,
                SLURM_LOCALID=0, SLURM_NODELIST="127.0.0.1", SLURM_JOB_NODELIST="127.0.0.1",
                SLURM_SUBMIT_DIR=project, MASTER_PORT=_free_port(), OMP_NUM_THREADS=1, **extra)


def test_srun_style_two_tasks_use_slurm_environment(tmp_path, digits_folder, single_gmm):
    project = _project(tmp_path / "project", digits_folder)
    db = tmp_path / "slurm.db"
    env = _slurm_env(project)

    # Lightning itself takes this environment for SLURM's: rank 1 of 2, address from SLURM_NODELIST
    probe = ("import pytorch_lightning as pl; t = pl.Trainer(accelerator='cpu', devices=2, strategy='ddp', "
             "logger=False); c = t.strategy.cluster_environment; "
             "print(type(c).__name__, c.world_size(), c.global_rank(), c.local_rank(), c.main_address, c.main_port)")
    out, _ = _run([sys.executable, "-c", probe], project, {**env, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert _ok(out).split()[-6:] == ["SLURMEnvironment", "2", "1", "1", "127.0.0.1", env["MASTER_PORT"]], out.stdout

    # what `srun --kill-on-bad-exit=1 genzoo train ...` does with --ntasks-per-node=2: the command once per task
    start = time.perf_counter()
    cmd = _genzoo("train", *GMM, *DDP2, "trainer.num_nodes=1", _uri(db))
    logs = [tmp_path / f"task{rank}.log" for rank in (0, 1)]
    procs = [_start(cmd, project, {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}, logs[rank])
             for rank in (0, 1)]
    codes = _wait_all(procs, TIMEOUT, kill_on_bad_exit=True)
    seconds = time.perf_counter() - start
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- task {r} (exit {c})\n{t[-3000:]}" for r, (c, t) in enumerate(zip(codes, texts)))
    assert all(t.count("trained gmm:") == 1 for t in texts)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in texts[1], texts[1][-2000:]  # task 1 joined as rank 1 of 2

    _one_finished_run(project, db)
    diff = _max_diff(single_gmm["state"], _gmm_state(project))
    print(f"\n[scaleout] srun-style 2-task GMM train: {seconds:.1f} s; max |param diff| {diff:.3g}")


FAKE_SRUN = '''#!{python}
"""Test stand-in for srun on one node: starts --ntasks copies of the command (default $SLURM_NTASKS) with
the per-task variables srun sets, waits for all, exits non-zero if any task did; logs each step."""
import os, subprocess, sys, time
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
n = int(opts.get("ntasks", os.environ["SLURM_NTASKS"]))
env = dict(os.environ, SLURM_NTASKS=str(n), SLURM_NPROCS=str(n), SLURM_STEP_NUM_TASKS=str(n))
if "ntasks-per-node" in opts:
    env["SLURM_NTASKS_PER_NODE"] = opts["ntasks-per-node"]
procs = [subprocess.Popen(args, env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0"))
         for i in range(n)]
while True:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
        break
    if opts.get("kill-on-bad-exit", "0") != "0" and any(codes):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
codes = [p.wait() for p in procs]
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(" ".join([str(n), args[1] if len(args) > 1 else args[0]] + [str(c) for c in codes]) + "\\n")
sys.exit(next((c for c in codes if c), 0))
'''


def test_sbatch_script_runs_end_to_end_with_a_stand_in_srun(tmp_path, digits_folder, single_gmm):
    syntax = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    text = SBATCH.read_text()
    for directive in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--time="):
        assert f"#SBATCH {directive}" in text, directive
    assert "genzoo train" in text and "trainer.num_nodes=" in text and "srun" in text

    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    project = _project(tmp_path / "project", digits_folder)
    db = tmp_path / "sbatch.db"
    steps = tmp_path / "srun_steps.log"
    env = _slurm_env(project, FAMILY="gmm", FAKE_SRUN_LOG=steps,
                     PATH=os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    overrides = [*GMM[1:], "featnet.max_epochs=1", "eval.n_samples=100", "eval.kid_subset_size=50",
                 "eval.kid_subsets=5", _uri(db)]
    out, seconds = _run(["bash", str(SBATCH), *overrides], project, env, timeout=2 * TIMEOUT)
    _ok(out)

    # the batch script ran one 2-task training step and one 1-task evaluation step, all tasks exit 0
    assert steps.read_text().splitlines() == ["2 train 0 0", "1 evaluate 0"]
    assert (project / "data" / "featnet" / "featnet.ckpt").is_file()
    run_id = _one_finished_run(project, db)
    assert any(k.startswith("test/") for k in _metric_counts(db, run_id))  # evaluate logged into the training run
    assert (project / "reports" / "families" / "gmm.json").is_file()
    diff = _max_diff(single_gmm["state"], _gmm_state(project))
    print(f"\n[scaleout] sbatch script (featnet + 2-task train + evaluate): {seconds:.1f} s; max |param diff| {diff:.3g}")


def test_two_jobs_at_once_share_one_sqlite_store(tmp_path, digits_folder):
    # what one run logs when it has the store to itself
    alone = _project(tmp_path / "alone", digits_folder)
    alone_db = tmp_path / "alone.db"
    out, alone_seconds = _run(_genzoo("train", *VAE, _uri(alone_db)), alone, _env())
    _ok(out)
    ((alone_run, status),) = _runs(alone_db)
    assert status == "FINISHED"
    expected = _metric_counts(alone_db, alone_run)
    assert expected["val/loss"] == 2 and expected["train/loss"] == 2, expected  # one value per epoch

    # two jobs, two projects, one fresh store, started together
    db = tmp_path / "shared" / "mlflow.db"
    db.parent.mkdir()
    projects = [_project(tmp_path / f"job{i}", digits_folder) for i in (0, 1)]
    start = time.perf_counter()
    procs = [_start(_genzoo("train", *VAE, _uri(db)), p, _env(), p / "train.log") for p in projects]
    codes = _wait_all(procs, TIMEOUT)
    seconds = time.perf_counter() - start
    logs = [(p / "train.log").read_text() for p in projects]
    assert codes == [0, 0], "\n".join(f"--- job {i} (exit {c})\n{t[-3000:]}" for i, (c, t) in enumerate(zip(codes, logs)))

    run_ids = [json.loads((p / "data/models/vae/mlflow_run.json").read_text())["run_id"] for p in projects]
    assert len(set(run_ids)) == 2
    assert sorted(_runs(db)) == sorted((r, "FINISHED") for r in run_ids)
    alone_val = [v for (v,) in _query(alone_db, "SELECT value FROM metrics WHERE key='val/loss' ORDER BY step")]
    for run_id in run_ids:
        assert _metric_counts(db, run_id) == expected, (run_id, _metric_counts(db, run_id), expected)
        val = _query(db, "SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'val/loss' ORDER BY step", run_id)
        assert len({s for s, _ in val}) == 2
        assert torch.allclose(torch.tensor([v for _, v in val]), torch.tensor(alone_val), rtol=1e-4), (val, alone_val)
    print(f"\n[scaleout] concurrent store: 2 runs, metric rows per run {sum(expected.values())} "
          f"({expected}); alone {alone_seconds:.1f} s, both at once {seconds:.1f} s")


def test_multirun_sweep_makes_one_finished_run_per_point(digits_project, tmp_path):
    """Each point trained into its own folder and evaluated (the feature network first: FID on digits)."""
    db = tmp_path / "sweep.db"
    tiny = [o for o in GMM if not o.startswith(("family=", "gmm.max_epochs="))] + [
        "gmm.max_epochs=1", "gmm.conditional=false", "eval.n_samples=100", "eval.kid_subset_size=50",
        "eval.kid_subsets=5", _uri(db)]
    _ok(_run(_genzoo("featnet", "featnet.max_epochs=1", "trainer.accelerator=cpu"), digits_project, _env())[0])
    # the README's spelling: `-m` right after the command
    out, seconds = _run(_genzoo("train", "-m", "family=gmm", "gmm.n_components=2,3", *tiny), digits_project, _env())
    stdout = _ok(out)
    assert stdout.count("sweep point ") == 2 and stdout.count("trained gmm:") == 2, stdout

    runs = _runs(db)
    assert [s for _, s in runs] == ["FINISHED", "FINISHED"], runs
    components = {run_id: int(_param(db, run_id, "gmm.n_components")) for run_id, _ in runs}
    assert sorted(components.values()) == [2, 3], components
    val = {run_id: _query(db, "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'val/loss'", run_id)
           for run_id, _ in runs}
    assert all(len(v) == 1 for v in val.values()), val  # one epoch each
    assert len({v[0][0] for v in val.values()}) == 2, val  # other components, another model
    for run_id, k in components.items():
        assert _query(db, "SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = 'test/fid'", run_id) == [(1,)]
        folder = digits_project / "data" / "sweeps" / "gmm" / f"n_components={k}"
        assert json.loads((folder / "mlflow_run.json").read_text())["run_id"] == run_id
    print(f"\n[scaleout] sweep of 2 points: {seconds:.1f} s")
