"""Generative classification with HMMs: one HMM per class, predict argmax_c log p(x | c) + log p(c)
(the classic isolated-word recogniser layout, Rabiner 1989 sec. VI)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from lightning_modules.common.em import fit_em
from lightning_modules.hmm.model import HMM


def fit_class_models(x: Tensor, y: Tensor, num_classes: int, cfg: dict, info: dict) -> List[HMM]:
    models = []
    for c in range(num_classes):
        model = HMM(cfg, info)
        fit_em(model, x[y == c], model.config.max_epochs, model.config.tol)
        models.append(model)
    return models


def predict(models: List[HMM], x: Tensor, log_prior: Tensor) -> Tensor:
    scores = torch.stack([m.log_prob(x) for m in models], 1) + log_prior
    return scores.argmax(1)
