"""`genzoo sample --model <checkpoint | runs:/<id>/model> -n 64 -o grid.png [--label c]`, or `genzoo sample
family=<name>` for the model trained on the configured data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.checkpoints import check_same_data, load_any
from pipeline.errors import GenzooError
from pipeline.paths import models_dir
from pipeline.plots import save_samples
from pipeline.runtime import datamodule_for, eval_device


def sample_to_file(model_ref: Optional[str], n: int, output: str, temperature: Optional[float] = None,
                   label: Optional[int] = None, cfg=None) -> Path:
    """Samples of `model_ref`, or (None) of the configured family's trained model, which must have been trained
    on the configured data."""
    if model_ref:
        model = load_any(model_ref)
    elif cfg is not None and cfg.family:
        path = models_dir(cfg, cfg.family) / "model.ckpt"
        model = load_any(str(path))
        check_same_data(model.trained_on, datamodule_for(cfg).manifest, path, cfg.family, model.info)
    else:
        raise GenzooError("say which model: --model <checkpoint path | runs:/<run id>/model>, or family=<name> for "
                          "the one trained on the configured data")
    if cfg is not None:
        model.to(eval_device(cfg))  # eval.device
    kwargs = {}
    if label is not None:
        if not model.conditional:
            raise GenzooError(f"--label: this {model.family} model was trained without labels (conditional=false)")
        if not 0 <= label < model.num_classes:
            raise GenzooError(f"--label must be a class in 0..{model.num_classes - 1}, not {label}")
        kwargs["y"] = torch.full((n,), label, dtype=torch.long, device=model.device)
    if temperature is not None:
        if not model.takes_temperature:
            raise GenzooError(f"{model.family} sampling takes no temperature")
        kwargs["temperature"] = temperature
    with torch.no_grad():
        samples = model.sample(n, **kwargs).cpu()
    out = Path(output)
    if out.suffix == ".pt":
        torch.save(samples, out)
        return out
    return save_samples(samples, model.info.kind, out, n)
