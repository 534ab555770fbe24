"""Loading trained models safely, from a checkpoint file or an MLflow model URI, and logging them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lightning_modules.registry import FAMILIES, family_class
from pipeline.errors import GenzooError


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


def load_model_uri(uri: str):
    """`runs:/<id>/model` (or any MLflow model URI) logged by the evaluate stage."""
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").eval()
    except Exception as e:
        raise GenzooError(f"cannot load MLflow model {uri}: {_first_line(e)}") from None


def load_any(model: str):
    return load_model_uri(model) if ":/" in model else load_model(Path(model))


def log_mlflow_model(model, example: torch.Tensor, name: str = "model") -> Optional[str]:
    """Log the model with a signature (data in -> anomaly score out) into the active run."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(example).detach().cpu().numpy()
    signature = infer_signature(example.numpy(), out)
    # pickle, not MLflow 3's default pt2 export: sample() is not a traced forward graph
    info = mlflow.pytorch.log_model(model, name=name, signature=signature, serialization_format="pickle",
                                    pip_requirements=["torch", "pytorch-lightning", "genzoo"])
    return info.model_uri
