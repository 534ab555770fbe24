"""Fetch source `hmm_synthetic`: float sequences sampled from a seeded random Gaussian HMM.

The generating model is known, so the manifest carries its mean per-sequence test log-likelihood
(`true_test_loglik`) as the reference a trained HMM should approach.
"""
from __future__ import annotations

import numpy as np
import torch

from lightning_modules import forward_backward as fb
from lightning_modules.contract import DataInfo
from lightning_modules.gaussian import gaussian_log_prob, precision_cholesky
from pipeline.datasets import Prepared, _three_splits, register

N_STATES, DIM, STEPS, N_SEQUENCES = 4, 2, 30, 2000


def random_hmm(rng: np.random.Generator, n_states: int = N_STATES, dim: int = DIM) -> dict:
    """Sticky transitions (Dirichlet with 5x weight on staying), well separated means, random SPD covariances."""
    a = rng.normal(size=(n_states, dim, dim))
    return {
        "startprob": rng.dirichlet(np.ones(n_states)),
        "transmat": np.stack([rng.dirichlet(np.ones(n_states) + 5 * np.eye(n_states)[i]) for i in range(n_states)]),
        "means": rng.normal(scale=3.0, size=(n_states, dim)),
        "covars": a @ a.transpose(0, 2, 1) / dim + 0.5 * np.eye(dim),
    }


def sample_hmm(params: dict, n: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """(n, steps, dim) sequences; the state chain is drawn for all sequences at once, step by step."""
    cum_trans = params["transmat"].cumsum(1)
    z = np.empty((n, steps), dtype=np.int64)
    z[:, 0] = rng.choice(len(params["startprob"]), size=n, p=params["startprob"])
    for t in range(1, steps):
        z[:, t] = (rng.random(n)[:, None] > cum_trans[z[:, t - 1]]).sum(1).clip(max=len(cum_trans) - 1)
    chol = np.linalg.cholesky(params["covars"])
    eps = rng.normal(size=(n, steps, params["means"].shape[1]))
    return params["means"][z] + np.einsum("ntde,nte->ntd", chol[z], eps)


def true_loglik(params: dict, x: np.ndarray) -> np.ndarray:
    """log p(x) per sequence under the generating HMM (exact forward algorithm)."""
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
    xs = torch.as_tensor(x, dtype=torch.float64)
    n, steps, dim = xs.shape
    log_emit = gaussian_log_prob(xs.reshape(-1, dim), t["means"], precision_cholesky(t["covars"], "full"), "full")
    mask = torch.ones(n, steps, dtype=torch.bool)
    return fb.loglik(t["startprob"], t["transmat"], log_emit.view(n, steps, -1), mask).numpy()


def load(dcfg, rng: np.random.Generator) -> Prepared:
    params = random_hmm(rng)
    x = sample_hmm(params, N_SEQUENCES, STEPS, rng).astype(np.float32)
    splits = _three_splits(x, np.zeros(len(x), dtype=np.int64), dcfg, rng)
    extra = {"true_test_loglik": float(true_loglik(params, splits["test"][0]).mean())}
    info = DataInfo(shape=(STEPS, DIM), kind="sequence")
    return Prepared(splits, info, f"genzoo random Gaussian HMM ({N_STATES} states, {DIM}-d, {STEPS} steps)", extra)


register("hmm_synthetic", load)
