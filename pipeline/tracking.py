"""MLflow plumbing shared by the stages: where the store is, the run of a family, its tags, its failure.

Default store: sqlite `mlflow.db` in the working directory; `tracking.uri` or `MLFLOW_TRACKING_URI`
override it. Telemetry is off unless the user turned it on. A family's training and evaluation share
one run: train writes its id to `mlflow_run.json` beside the checkpoint and evaluate reopens it.

Names: the experiment `genzoo-<dataset slug>`, a run `<family>-<dataset slug>` (a sweep point's with the
point appended: `gmm-toy2d-moons-n_components=3`), a registered model `genzoo-<dataset slug>-<family>` whose
alias `champion` is its best version by `tracking.champion_metric` (`promote_champion`). The experiment is
tagged a classic ML one (`mlflow.experimentKind`), a training run's input is the prepared data set
(`log_dataset_input`), and `genzoo ui` opens the runs table in the view `prepare_runs_view` stores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from pipeline.data.names import dataset_slug
from pipeline.errors import GenzooError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_FILE = "mlflow_run.json"


def quiet_telemetry() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if not sys.stderr.isatty():  # MLflow's download bars: progress only on a terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
    return cfg.tracking.experiment or f"genzoo-{dataset_slug(cfg.data.dataset)}"


def run_name(cfg, family: str, point=None) -> str:
    """`<family>-<dataset slug>`; a sweep point's (`pipeline.sweeps.SweepPoint`) ends with the point's slug."""
    name = f"{family}-{dataset_slug(cfg.data.dataset)}"
    return f"{name}-{point.slug}" if point is not None else name


def registered_model_name(cfg, family: str) -> str:
    return f"genzoo-{dataset_slug(cfg.data.dataset)}-{family}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


SWEEP_TAG = "genzoo.sweep"  # the sweep's id: every point of one `genzoo train -m` shares it
SWEEP_POINT_TAG = "genzoo.sweep_point"  # the point's swept overrides (`gmm.n_components=3`)
DVC_EXPERIMENT_TAG = "genzoo.dvc_experiment"
DVC_EXP_NAME = "DVC_EXP_NAME"  # what `dvc exp run` names the experiment it runs the stages of (dvc.env)


def run_tags(cfg, family: str, manifest: dict, point=None) -> dict:
    return {
        "genzoo.family": family,
        "genzoo.dataset": cfg.data.dataset,
        "genzoo.git_commit": git_commit(),
        "genzoo.data_hash": manifest["content_hash"],
        # semi-supervised runs (`data.labels_per_class`) are told apart from the fully labelled ones in the UI
        "genzoo.labels_per_class": str(cfg.data.labels_per_class) if cfg.data.labels_per_class is not None else "all",
        **context_tags(point),
    }


def context_tags(point=None) -> dict:
    """What a run was part of: the DVC experiment (`dvc exp run` sets DVC_EXP_NAME for the stages it runs, in the
    workspace, a queue or a temporary copy) and the sweep point."""
    tags = {}
    if os.environ.get(DVC_EXP_NAME):
        tags[DVC_EXPERIMENT_TAG] = os.environ[DVC_EXP_NAME]
    if point is not None:
        tags[SWEEP_TAG] = point.sweep_id
        tags[SWEEP_POINT_TAG] = " ".join(point.overrides)
    return tags


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
        import mlflow

        ensure_experiment(mlflow.MlflowClient(uri), experiment)
        return
    import fcntl
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow resets it on import: no table-creation chatter
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "a")
    except OSError as e:  # e.g. no lock file yet, in a read-only folder
        raise GenzooError(_unwritable(uri, f"{e.strerror or e}: {e.filename}")) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            check_writable(uri)
            ensure_experiment(mlflow.MlflowClient(uri), experiment)  # creates and migrates missing tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow 3's UI reads to tell ML experiments from GenAI ones
CLASSIC_ML = "custom_model_development"


def ensure_experiment(c, name: str) -> str:
    """The experiment `name` (created when missing), marked as a classic ML experiment (`mlflow.experimentKind`)
    unless it already has a kind; its id."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: CLASSIC_ML})
        except MlflowException:  # created meanwhile by another process (a tracking server takes no file lock)
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML)
    return exp.experiment_id


# --- the runs table `genzoo ui` opens ------------------------------------------------------------------
VIEW_KEY = "genzoo"  # the shared view state `?viewStateShareKey=genzoo`: an experiment tag MLflow's UI reads
VIEW_METRICS = ("test/nll", "test/bpd", "test/fid", "test/kid_mean", "test/precision", "test/recall",
                "perf/train_seconds")


def runs_view_state() -> dict:
    """Shared view state of MLflow's runs table (MLflow 3.x: the keys of its URL state and view state): sorted by
    test/nll (lowest first; runs without it last), the Dataset column and the key `test/*` metrics shown."""
    column = lambda kind, key: f"{kind}.`{key}`"  # noqa: E731  MLflow's canonical column key
    return {"orderByKey": column("metrics", "test/nll"), "orderByAsc": True,
            "selectedColumns": [column("attributes", "Dataset"), column("tags", "genzoo.family"),
                                *(column("metrics", m) for m in VIEW_METRICS), column("attributes", "Models")]}


def prepare_runs_view(cfg) -> str:
    """Mark the configured data set's experiment (created when missing) as classic ML and store the runs view
    `genzoo ui` opens; the experiment's id."""
    uri = tracking_uri(cfg)
    ensure_store(uri, experiment_name(cfg))
    c = client(cfg)
    exp_id = ensure_experiment(c, experiment_name(cfg))
    c.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(runs_view_state()))
    return exp_id


def runs_view_url(base: str, experiment_id: str) -> str:
    """The experiment's training-runs table (`workflowType=machine_learning`: MLflow 3.17's UI picks its GenAI or
    ML layout from that switch, remembered per browser) in genzoo's view."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


# --- the data set as an MLflow input ------------------------------------------------------------------
def log_dataset_input(c, run_id: str, cfg, manifest: dict, x, y, context: str) -> None:
    """The prepared data set as the run's input (the UI's Dataset column): named by its slug, digest = the
    manifest's content hash, source = the prepared folder; the schema from a few rows of `x`/`y` (the split
    already read), the profile the split's full shape."""
    import mlflow.data
    import numpy as np
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from pipeline.paths import prepared_dir

    x, y = np.asarray(x), np.asarray(y)
    source = LocalArtifactDatasetSource(str(prepared_dir(cfg.data).resolve()))
    sample = mlflow.data.from_numpy(x[:8], targets=y[:8], source=source, name=dataset_slug(cfg.data.dataset),
                                    digest=manifest["content_hash"][:16])
    d = sample.to_dict()  # name, digest, source, source_type, schema (public API; profile replaced below)
    profile = json.dumps({"features_shape": list(x.shape), "targets_shape": list(y.shape),
                          "dataset": cfg.data.dataset, "content_hash": manifest["content_hash"]})
    dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"), profile)
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def _unwritable(uri: str, why: str) -> str:
    return (f"the MLflow store {uri} cannot be written ({why}): make the file and its folder writable, or point "
            "tracking.uri (or MLFLOW_TRACKING_URI) at another store")


def check_writable(uri: str) -> None:
    """A write to a sqlite store, rolled back, before any run opens: a read-only `mlflow.db` (or folder, or a
    full disk) is then one error line naming the store, not a traceback from the middle of training."""
    import sqlite3

    path = Path(uri[len("sqlite:///"):])
    if not path.exists():  # MLflow creates it: the folder must take a new file
        if not os.access(path.parent, os.W_OK):
            raise GenzooError(_unwritable(uri, f"cannot create files in {path.parent}"))
        return
    try:
        con = sqlite3.connect(path, timeout=60)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE genzoo_write_probe (x INTEGER)")  # a page to write: the journal must open
        finally:
            con.rollback()
            con.close()
    except sqlite3.Error as e:
        raise GenzooError(_unwritable(uri, str(e))) from None


def write_run_file(model_dir: Path, run_id: str, experiment_id: str, uri: str) -> None:
    from pipeline.paths import write_text_atomic

    write_text_atomic(model_dir / RUN_FILE, json.dumps({"run_id": run_id, "experiment_id": experiment_id,
                                                         "tracking_uri": uri}) + "\n")


def read_run_file(model_dir: Path) -> Optional[dict]:
    path = model_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


EVALUATED_TAG = "genzoo.evaluated_step"


def _same_value(old: float, new: float) -> bool:
    """A metric value as the store gave it back against a freshly computed one (MLflow keeps NaN, and stores
    an infinity as the largest float)."""
    import math

    new = float(new)
    if math.isnan(new) or math.isnan(old):
        return math.isnan(new) and math.isnan(old)
    if math.isinf(new):
        return abs(old) >= 1e308 and (old > 0) == (new > 0)
    return math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0)


def log_evaluation(cfg, run_id: str, metrics: dict, volatile=()) -> int:
    """Log an evaluation's metrics into the run once, at the evaluation's step (returned); `mark_evaluated`
    records the step when the whole evaluation is done.

    MLflow appends to a metric's history and cannot take a value out of it, so an evaluation killed after
    its metrics were logged would, rerun, log every one twice. Here the run's newest step whose evaluation
    never finished is taken up again when the metrics it holds equal the recomputed ones (a seeded evaluation
    of the same model: `volatile` keys, timings, are not compared) and only the missing ones are logged.
    Anything else (an evaluation that finished, other values) is a new evaluation at the next step, so a
    (metric, step) pair is never logged twice and each metric's latest value is the latest evaluation's."""
    import time

    from mlflow.entities import Metric

    c = client(cfg)
    run = c.get_run(run_id)
    history = {k: c.get_metric_history(run_id, k) for k in metrics if k in run.data.metrics}
    last = max((m.step for h in history.values() for m in h), default=-1)
    at_last = {k: [m.value for m in h if m.step == last] for k, h in history.items()}
    unfinished = last >= 0 and run.data.tags.get(EVALUATED_TAG) != str(last)
    same = all(_same_value(v, metrics[k]) for k, values in at_last.items() if k not in volatile for v in values)
    if unfinished and same:
        step, fresh = last, {k: v for k, v in metrics.items() if not at_last.get(k)}
    else:
        step, fresh = last + 1, dict(metrics)
    now = int(time.time() * 1000)
    if fresh:
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(fresh.items())])
    return step


def mark_evaluated(cfg, run_id: str, step: int) -> None:
    client(cfg).set_tag(run_id, EVALUATED_TAG, str(step))


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
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0] if lines else ''}"  # one line; a traceback has the rest
        try:
            mark_failed(cfg, run_id_getter(), reason)
        except Exception:  # a store that cannot take the mark (full, read-only): the first error is the one to show
            pass
        raise


# --- the model registry -----------------------------------------------------------------------------
CHAMPION = "champion"


def _metric_of(c, run_id: Optional[str], metric: str) -> Optional[float]:
    """The run's latest value of `metric`; None when the run, or the metric, is missing or NaN."""
    import math

    if not run_id:
        return None
    try:
        value = c.get_run(run_id).data.metrics.get(metric)
    except Exception:  # a deleted run: its version cannot be compared
        return None
    return None if value is None or math.isnan(value) else float(value)


def promote_champion(cfg, name: str, version, run_id: str) -> bool:
    """Give `version` of the registered model `name` (logged by `run_id`) the alias `champion` when its run's
    `tracking.champion_metric` beats the current champion's run's (`tracking.champion_mode`: min or max; a tie
    keeps the champion). A version without the metric never becomes champion; a champion without it is
    replaced. True when `version` is the champion afterwards."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    metric, mode = cfg.tracking.champion_metric, cfg.tracking.champion_mode
    new = _metric_of(c, run_id, metric)
    if new is None:
        return False
    try:
        current = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        current = None
    if current is not None and str(current.version) != str(version):
        old = _metric_of(c, current.run_id, metric)
        if old is not None and not (new < old if mode == "min" else new > old):
            return False
    c.set_registered_model_alias(name, CHAMPION, str(version))
    return True
