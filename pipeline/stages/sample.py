"""`genzoo sample --model <checkpoint | runs:/<id>/model> -n 64 -o grid.png [--label c]`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.checkpoints import load_any
from pipeline.errors import GenzooError
from pipeline.plots import save_samples


def sample_to_file(model_ref: Optional[str], n: int, output: str, temperature: Optional[float] = None,
                   label: Optional[int] = None) -> Path:
    if not model_ref:
        raise GenzooError("say which model: --model <checkpoint path | runs:/<run id>/model>")
    model = load_any(model_ref)
    kwargs = {}
    if label is not None:
        if not model.conditional:
            raise GenzooError(f"--label: this {model.family} model was trained without labels (conditional=false)")
        if not 0 <= label < model.num_classes:
            raise GenzooError(f"--label must be a class in 0..{model.num_classes - 1}, not {label}")
        kwargs["y"] = torch.full((n,), label, dtype=torch.long)
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
