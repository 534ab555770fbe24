"""Fetch source `hmm_synthetic`: float sequences sampled from a seeded random Gaussian HMM.

The generating model is known, so the manifest carries its mean per-sequence test log-likelihood
(`true_test_loglik`) as the reference a trained HMM should approach.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits

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
    """log p(x) per sequence under the generating HMM: the forward algorithm in log space (Rabiner 1989,
    eqs. 19-21) in numpy and scipy, independent of the HMM family it is the reference for."""
    n, steps, dim = x.shape
    frames = x.reshape(-1, dim).astype(np.float64)
    log_b = np.stack([multivariate_normal(m, c).logpdf(frames) for m, c in zip(params["means"], params["covars"])], -1)
    log_b = log_b.reshape(n, steps, -1)
    log_a = np.log(params["transmat"])
    alpha = np.log(params["startprob"]) + log_b[:, 0]
    for t in range(1, steps):
        alpha = logsumexp(alpha[:, :, None] + log_a[None], axis=1) + log_b[:, t]
    return logsumexp(alpha, axis=1)


def load(dcfg, rng: np.random.Generator) -> Prepared:
    params = random_hmm(rng)
    x = sample_hmm(params, N_SEQUENCES, STEPS, rng).astype(np.float32)
    splits = three_splits(x, np.zeros(len(x), dtype=np.int64), dcfg, rng)
    extra = {"true_test_loglik": float(true_loglik(params, splits["test"][0]).mean())}
    info = DataInfo(shape=(STEPS, DIM), kind="sequence")
    return Prepared(splits, info, f"genzoo random Gaussian HMM ({N_STATES} states, {DIM}-d, {STEPS} steps)", extra)

