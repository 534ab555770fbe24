"""Loading trained models safely, from a checkpoint file or an MLflow model URI, and logging them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lightning_modules.registry import FAMILIES, family_class
from pipeline.data.store import data_info
from pipeline.errors import GenzooError

# A logged MLflow model (`log_mlflow_model`) is the checkpoint file under this name, served by this installed module
CHECKPOINT = "model.ckpt"
LOADER_MODULE = "pipeline.serving"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_model(path: Path, cls=None):
    """A trained family from a Lightning checkpoint, loaded with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise GenzooError(f"checkpoint {path} not found")
    try:
        if cls is None:
            family = torch.load(path, map_location="cpu", weights_only=True).get("genzoo_family")
            if family not in FAMILIES:
                raise GenzooError(f"checkpoint {path} does not name a genzoo family")
            cls = family_class(family)
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except GenzooError:
        raise
    except Exception as e:  # truncated zip, bad pickle, missing keys: name the file
        raise GenzooError(f"checkpoint {path} is corrupt or not a genzoo checkpoint: {_first_line(e)}") from None
    return model.eval()


def trained_on_of(manifest: dict) -> dict:
    """What a model trained on this prepared data records (`GenerativeModel.trained_on`)."""
    return {"dataset": manifest["dataset"], "data_hash": manifest["content_hash"]}


def check_same_data(trained_on: Optional[dict], manifest: dict, source, family: str, info=None) -> None:
    """Refuse a model (`source`: its checkpoint or folder) trained on other prepared data than `manifest`'s:
    another dataset, or the same name with other content (another seed, split or labelled subset). `info`, the
    model's DataInfo, also catches a checkpoint that predates the record (trained_on None) by its data shape."""
    asked = trained_on_of(manifest)
    retrain = f"run `genzoo train family={family} data.dataset={asked['dataset']}` first"
    if trained_on is not None and trained_on != asked:
        raise GenzooError(f"{source} was trained on {trained_on['dataset']} (data {trained_on['data_hash'][:12]}), "
                          f"not on {asked['dataset']} (data {asked['data_hash'][:12]}): {retrain}")
    shape = list(data_info(manifest).shape)
    if info is not None and list(info.shape) != shape:
        raise GenzooError(f"{source} was trained on data of shape {list(info.shape)}, and {asked['dataset']} has "
                          f"shape {shape}: {retrain}")


def checkpoint_data(path: Path) -> Optional[dict]:
    """The `trained_on` record of a checkpoint file, read without building the model."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("genzoo_data")
    except Exception as e:
        raise GenzooError(f"checkpoint {path} is corrupt or not a genzoo checkpoint: {_first_line(e)}") from None


def load_model_uri(uri: str):
    """A model logged by the evaluate stage (`runs:/<id>/model`, `models:/<name>@<alias>`, ...): its checkpoint
    file is downloaded and loaded like any checkpoint, with `weights_only=True` (nothing in the store is
    unpickled or run)."""
    import mlflow.artifacts

    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as e:
        raise GenzooError(f"cannot load MLflow model {uri}: {_first_line(e)}") from None
    flavor = _genzoo_flavor(folder)
    if flavor is None:
        raise GenzooError(f"MLflow model {uri} was not logged by genzoo's pickle-free pyfunc (re-run `genzoo "
                          "evaluate`); genzoo loads no pickled model")
    return load_model(folder / flavor["data"])


def _genzoo_flavor(folder: Path) -> Optional[dict]:
    """The pyfunc flavour of a downloaded MLflow model folder, when genzoo's loader serves it."""
    import yaml

    try:
        flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return flavor if flavor.get("loader_module") == LOADER_MODULE and flavor.get("data") else None


def load_any(model: str):
    return load_model_uri(model) if ":/" in model else load_model(Path(model))


def log_mlflow_model(model, checkpoint: Path, example: torch.Tensor, name: str = "model",
                     registered_model_name: Optional[str] = None):
    """Log the model into the active run as a pyfunc model (data in -> `model.forward` out) whose artifact is
    `checkpoint`, loaded by genzoo's installed `pipeline.serving` module: no pickle (see that module). It carries
    its signature, `example` as its input example and `model_requirements()`; `registered_model_name` also
    registers it as a new version of that model. Returns MLflow's ModelInfo (`model_uri`,
    `registered_model_version`)."""
    import shutil
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import infer_signature

    x = example.detach().cpu().numpy()
    with torch.no_grad():
        out = model(example).detach().cpu().numpy()
    signature = infer_signature(x, out)
    with tempfile.TemporaryDirectory() as tmp:  # the artifact keeps the fixed name CHECKPOINT
        data = Path(tmp) / CHECKPOINT
        shutil.copyfile(checkpoint, data)
        return mlflow.pyfunc.log_model(name=name, loader_module=LOADER_MODULE, data_path=str(data),
                                       signature=signature, input_example=x, pip_requirements=model_requirements(),
                                       registered_model_name=registered_model_name)


# Where a logged model is loaded elsewhere (`mlflow models serve`, a fresh virtualenv), pip installs these.
# GENZOO_PIP_REQUIREMENT replaces genzoo's own line (e.g. `genzoo==0.1.0` from a private index).
PIP_REQUIREMENT_ENV = "GENZOO_PIP_REQUIREMENT"


def model_requirements() -> list:
    """genzoo (`genzoo_requirement`), and the torch and Lightning versions that wrote the checkpoint (without
    a local build tag such as `+cu130`, which only the PyTorch index resolves)."""
    from importlib.metadata import version

    return [genzoo_requirement(), f"torch=={torch.__version__.split('+')[0]}",
            f"pytorch-lightning=={version('pytorch-lightning')}"]


def genzoo_requirement() -> str:
    """genzoo as pip can install it elsewhere: `$GENZOO_PIP_REQUIREMENT` if set; else the git URL and commit it
    was installed from (a `pip install git+...`, or an install of a git clone whose `origin` remote is set:
    `genzoo @ git+<origin>@<HEAD>`, which must be pushed, and holds no uncommitted change); else the local
    folder (`genzoo @ file:///...`: this machine only); else `genzoo==<version>` (from an index that has it)."""
    import json
    import os
    from importlib.metadata import distributions

    if os.environ.get(PIP_REQUIREMENT_ENV):
        return os.environ[PIP_REQUIREMENT_ENV]
    found = list(distributions(name="genzoo"))  # a source tree's genzoo.egg-info may come first on sys.path
    if not found:
        return "genzoo"
    dist = next((d for d in found if d.read_text("direct_url.json")), found[0])
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url, vcs = direct.get("url", ""), direct.get("vcs_info")
    if vcs and url:
        return f"genzoo @ {vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id') or vcs.get('requested_revision')}"
    if url.startswith("file://"):
        folder = Path(url[len("file://"):])
        remote = _git_origin(folder)
        if remote is not None:
            return f"genzoo @ git+{remote[0]}@{remote[1]}"
        if folder.is_dir():
            return f"genzoo @ {url}"
    return f"genzoo=={dist.version}"


def _git_origin(folder: Path):
    """(pip URL of the `origin` remote, HEAD commit) of a git checkout, or None."""
    import re
    import subprocess

    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        origin, head = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if not origin or not head:
        return None
    scp = re.fullmatch(r"(?:([\w.-]+)@)?([\w.-]+):(?!//)(.+)", origin)  # git@host:org/repo.git
    if "://" not in origin and scp and not Path(origin).exists():
        origin = f"ssh://{scp.group(1) + '@' if scp.group(1) else ''}{scp.group(2)}/{scp.group(3)}"
    elif "://" not in origin:  # a local path
        origin = Path(origin).resolve().as_uri()
    return origin, head
