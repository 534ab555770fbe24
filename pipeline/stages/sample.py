"""`genzoo sample --model <checkpoint | runs:/<id>/model> -n 64 -o grid.png`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.checkpoints import load_any
from pipeline.errors import GenzooError
from pipeline.plots import save_samples


def sample_to_file(model_ref: Optional[str], n: int, output: str, temperature: Optional[float] = None) -> Path:
    if not model_ref:
        raise GenzooError("say which model: --model <checkpoint path | runs:/<run id>/model>")
    model = load_any(model_ref)
    kwargs = {}
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
