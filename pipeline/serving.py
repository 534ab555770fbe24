"""A genzoo model as an MLflow pyfunc model, without pickle.

The logged artifact is the Lightning checkpoint itself (tensors and a plain config, loaded with
`weights_only=True`), and the MLmodel file names this installed module as the pyfunc `loader_module`: MLflow
imports it and calls `_load_pyfunc`, so loading a model from a store runs no code and unpickles no object
that the store holds. `mlflow.pyfunc.load_model(uri).predict(x)` serves `GenerativeModel.forward`: p(y | x)
where the model classifies, else the anomaly score.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoints import load_model



class GenzooPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: `predict` takes data-space arrays (B, *shape)."""

    def __init__(self, model):
        self.model = model

    def predict(self, model_input, params=None):
        """Float data as float32; token sequences (integers) keep their integer type: they index the vocabulary."""
        x = np.asarray(model_input)
        x = torch.as_tensor(x) if np.issubdtype(x.dtype, np.integer) else torch.as_tensor(x, dtype=torch.float32)
        with torch.no_grad():
            return self.model(x).cpu().numpy()


def _load_pyfunc(data_path: str) -> GenzooPyfunc:
    """MLflow's entry point for `loader_module`: `data_path` is the logged checkpoint."""
    return GenzooPyfunc(load_model(Path(data_path)))
