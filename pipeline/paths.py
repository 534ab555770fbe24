"""Every path the stages read or write, in one place (dvc.yaml names the same ones)."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from pipeline.data.names import dataset_slug
from pipeline.errors import GenzooError

REPORTS = Path("reports")
FEATNET_REPORT = REPORTS / "featnet.json"  # featnet accuracy and the real-data floor
METRICS_JSON = REPORTS / "metrics.json"  # DVC metrics: one row per family
INDEX_HTML = REPORTS / "index.html"
PLOTS = REPORTS / "plots"  # DVC plot data, one file per family: its validation loss by step
ROC_PLOTS = REPORTS / "roc"  # DVC plot data, one file per family with an anomaly ROC (data.holdout_class)
FEATNET_FILE = "featnet.ckpt"
STATE_FILE = "state.json"  # beside a family's checkpoints: config hash, run id, finished or not


def prepared_dir(data_cfg) -> Path:
    """`<data.root>/prepared/<dataset slug>/`: the fetch stage's splits and manifest (`toy2d-moons`, `wine` for
    `csv:data/user/wine.csv`: one folder, never a path nested under it; `pipeline/data/names.py`)."""
    return Path(data_cfg.root) / "prepared" / dataset_slug(data_cfg.dataset)


def featnet_dir(cfg) -> Path:
    return Path(cfg.data.root) / "featnet"


# A sweep point (`genzoo train -m`) has its own folders, named by its slug (`n_components=3`): outside
# `data/models/<family>` (the train stage's DVC output, which a default run clears) and outside
# `reports/families` and `reports/samples` (the evaluate stage's DVC outputs).
SWEEPS = "sweeps"


def models_dir(cfg, family: str, point: Optional[str] = None) -> Path:
    """`<data.root>/models/<family>/`: model.ckpt, last.ckpt, state.json, mlflow_run.json, config.yaml; a sweep
    point's in `<data.root>/sweeps/<family>/<point>/`."""
    if point:
        return Path(cfg.data.root) / SWEEPS / family / point
    return Path(cfg.data.root) / "models" / family


def _reports_dir(kind: str, family: str, point: Optional[str]) -> Path:
    """`reports/<kind>/`, or a sweep point's `reports/sweeps/<family>/<point>/`."""
    return REPORTS / SWEEPS / family / point if point else REPORTS / kind


def family_report_path(family: str, point: Optional[str] = None) -> Path:
    return _reports_dir("families", family, point) / f"{family}.json"


def samples_png(family: str, point: Optional[str] = None) -> Path:
    return _reports_dir("samples", family, point) / f"{family}.png"


def class_samples_png(family: str, point: Optional[str] = None) -> Path:
    """One row of samples per requested class."""
    return _reports_dir("samples", family, point) / f"{family}_by_class.png"


# --- writing: atomically -----------------------------------------------------------------------------
def write_atomic(path: Union[str, Path], write: Callable, mode: str = "wb") -> None:
    """`write(f)` into a temporary file beside `path`, fsync it, then rename it over `path` (and fsync the
    folder): a reader, or the next run, finds the old file or the new one, never a part of one. A failed
    write (a full disk, a size limit) leaves the old file as it was and is one error line naming both."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would have made it (mkstemp's is 0600)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        cause = _os_error(e)  # torch.save reports a failed write as a RuntimeError raised while handling it
        if cause is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        reason = cause.strerror or os.strerror(cause.errno or errno.EIO)
        raise GenzooError(f"cannot write {path}: {reason} (errno {cause.errno}); {kept}") from None
    try:  # the rename itself survives a crash once the folder's entry is on disk
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def copy_atomic(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """`src` copied to `dst` with `write_atomic`."""
    import shutil

    with open(src, "rb") as source:
        write_atomic(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def _os_error(e: BaseException):
    """The OSError with an errno in `e` or the exceptions it was raised from or while handling, else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
