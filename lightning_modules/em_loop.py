"""EM without a Trainer, for small in-memory fits (one model per class, tests): the same
`initialize` / `e_step` / `m_step` that `EMModel` runs inside Lightning, one exact EM step per iteration."""
from __future__ import annotations

from typing import List

from torch import Tensor

from lightning_modules.em import EMModel


def fit_em(model: EMModel, x: Tensor, max_iter: int, tol: float = 0.0) -> List[float]:
    """Runs up to `max_iter` EM steps on all of x; returns the mean log-likelihood per example seen by
    each E-step (under the parameters before its M-step). Stops when it changes by less than `tol`."""
    if not bool(model.initialized):
        model.initialize(x)
        model.initialized.fill_(True)
    history: List[float] = []
    for _ in range(max_iter):
        stats = model.e_step(x)
        history.append((stats["loglik"] / stats["count"]).item())
        model.m_step(stats)
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            break
    return history
