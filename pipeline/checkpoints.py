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


def log_mlflow_model(model, checkpoint: Path, example: torch.Tensor, name: str = "model") -> Optional[str]:
    """Log the model into the active run as a pyfunc model (data in -> `model.forward` out) whose artifact is
    `checkpoint`, loaded by genzoo's installed `pipeline.serving` module: no pickle (see that module)."""
    import shutil
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(example).detach().cpu().numpy()
    signature = infer_signature(example.numpy(), out)
    with tempfile.TemporaryDirectory() as tmp:  # the artifact keeps the fixed name CHECKPOINT
        data = Path(tmp) / CHECKPOINT
        shutil.copyfile(checkpoint, data)
        info = mlflow.pyfunc.log_model(name=name, loader_module=LOADER_MODULE, data_path=str(data),
                                       signature=signature, pip_requirements=["torch", "pytorch-lightning", "genzoo"])
    return info.model_uri
