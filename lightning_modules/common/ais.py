"""Annealed importance sampling of a log normalising constant (Neal 2001; Salakhutdinov & Murray 2008).

Anneal from a base distribution p_0 with known normaliser Z_0 to the target p_1 through unnormalised
intermediates f_beta, 0 = beta_0 < ... < beta_K = 1. Each chain starts with an exact draw v ~ p_0 and
accumulates the importance weight

    log w = sum_k [log f_{beta_k}(v_{k-1}) - log f_{beta_{k-1}}(v_{k-1})],   v_k ~ T_{beta_k}(. | v_{k-1}),

where T_beta leaves p_beta invariant. E[w] = Z_1 / Z_0, so log Z_1 ~ log Z_0 + log mean(w). The estimate of
log Z is biased low by Jensen (stochastically a lower bound), the usual caveat for AIS-based likelihoods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

from lightning_modules.contract import progress

# (v, beta_prev, beta) -> (log f_beta(v) - log f_beta_prev(v) for each row of v, v' ~ T_beta(. | v)), where T_beta
# leaves p_beta invariant: one call, so that a model can share the work between the weight and the move
AnnealStep = Callable[[Tensor, float, float], Tuple[Tensor, Tensor]]


def beta_schedule(n_steps: int) -> Tensor:
    """Salakhutdinov & Murray (2008, sec. 4.2)'s piecewise-linear schedule, scaled to `n_steps`
    intermediate distributions: 500/14500 of the steps for beta in [0, 0.5), 4000/14500 in [0.5, 0.9) and
    the rest in [0.9, 1] (most of the work is spent where the target's structure switches on)."""
    if n_steps < 3:
        return torch.linspace(0.0, 1.0, max(n_steps, 1) + 1, dtype=torch.float64)
    n1 = max(1, round(n_steps * 500 / 14500))
    n2 = max(1, round(n_steps * 4000 / 14500))
    n3 = max(1, n_steps - n1 - n2)
    return torch.cat([
        torch.linspace(0.0, 0.5, n1 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.5, 0.9, n2 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.9, 1.0, n3 + 1, dtype=torch.float64),
    ])


def effective_sample_size(log_w: Tensor) -> Tensor:
    """Kish's (sum w)^2 / sum w^2 over the last dimension: n when every chain carries the same weight, 1
    when a single chain dominates the estimate (a sign that the schedule is too short)."""
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def log_z_standard_error(log_w: Tensor) -> Tensor:
    """The delta-method standard error of log Z = log mean(w) over the last dimension: sd(w) / (sqrt(n)
    mean(w)), with the unbiased sd, computed on w / max(w) (the ratio does not change); NaN for one chain."""
    w = torch.exp(log_w.double() - log_w.double().amax(-1, keepdim=True))
    n = w.shape[-1]
    if n < 2:
        return torch.full(w.shape[:-1], float("nan"), dtype=torch.float64)
    return w.std(-1, unbiased=True) / (math.sqrt(n) * w.mean(-1))


@dataclass
class AISResult:
    log_z: float
    log_weights: Tensor  # one per chain; log_z = log_z_base + logmeanexp(log_weights)

    def effective_sample_size(self) -> float:
        return float(effective_sample_size(self.log_weights))

    def log_z_standard_error(self) -> float:
        return float(log_z_standard_error(self.log_weights))


@torch.no_grad()
def ais_log_z(step: AnnealStep, sample_base: Callable[[int], Tensor], log_z_base: float, betas: Tensor,
              n_chains: int) -> AISResult:
    """Estimate log Z_1 of f_1 = f_{betas[-1]}, given exact draws from and the log normaliser of
    p_0 = f_{betas[0]} / Z_0."""
    betas = [float(b) for b in betas]
    v = sample_base(n_chains)
    log_w = torch.zeros(n_chains, dtype=torch.float64, device=v.device)
    for k in progress(range(1, len(betas)), "AIS"):
        log_ratio, v = step(v, betas[k - 1], betas[k])  # the move after the last weight is not used
        log_w += log_ratio.to(torch.float64)
    log_z = log_z_base + float(torch.logsumexp(log_w, 0)) - math.log(n_chains)
    return AISResult(log_z, log_w)
