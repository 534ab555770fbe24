"""Generative classification with HMMs: one HMM per class, predict argmax_c log p(x | c) + log p(c)
(the classic isolated-word recogniser layout, Rabiner 1989 sec. VI)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from lightning_modules.em_loop import fit_em
from lightning_modules.hmm import HMM


def fit_class_models(x: Tensor, y: Tensor, num_classes: int, cfg: dict, info: dict) -> List[HMM]:
    models = []
    for c in range(num_classes):
        model = HMM(cfg, info)
        fit_em(model, x[y == c], model.cfg["max_epochs"], model.cfg["tol"])
        models.append(model)
    return models


def predict(models: List[HMM], x: Tensor, log_prior: Tensor) -> Tensor:
    scores = torch.stack([m.log_prob(x) for m in models], 1) + log_prior
    return scores.argmax(1)


def digits_rows_accuracy(cfg: Optional[dict] = None, seed: int = 0) -> float:
    """Test accuracy on `digits_rows` (8 steps of 8-pixel rows, dequantised with seeded noise)."""
    from pipeline.config import DataConfig
    from pipeline.datamodule import dequantize
    from pipeline.datasets import load_source

    p = load_source(DataConfig(dataset="digits_rows", seed=seed))
    g = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xte, yte) = [(dequantize(torch.from_numpy(x), p.info.levels, g), torch.from_numpy(y))
                              for x, y in (p.splits["train"], p.splits["test"])]
    k = p.info.num_classes
    models = fit_class_models(xtr, ytr, k, cfg or {}, p.info.to_dict())
    log_prior = torch.log(torch.bincount(ytr, minlength=k).double() / len(ytr))
    return (predict(models, xte, log_prior) == yte).double().mean().item()
