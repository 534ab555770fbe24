"""The variational bound on -log p(x) of a continuous-time diffusion (Kingma et al. 2021, "Variational diffusion
models", eqs. 11-17), for continuous data x (D dimensions, in the model's own scale):

    -log p(x) <= E_q[-log p(x | z_0)] + KL(q(z_1 | x) || N(0, I)) + (1/2) int_{lambda_min}^{lambda_max} E_eps ||eps - eps_hat(z_lambda, lambda)||^2 d lambda

- the decoder at t = 0 is the Gaussian p(x | z_0) = N(z_0 / alpha_0, (sigma_0 / alpha_0)^2 I), whose expected
  negative log-likelihood under q(z_0 | x) = N(alpha_0 x, sigma_0^2 I) is exact: D/2 (log(2 pi sigma_0^2 / alpha_0^2) + 1);
- the prior term is the closed-form KL of N(alpha_1 x, sigma_1^2 I) from N(0, I);
- the diffusion term, VDM's eq. 17 with the time integral changed to one over the log-SNR lambda (which makes it
  independent of the schedule between its end points), is estimated without bias by one lambda ~ U[lambda_min,
  lambda_max] and one eps per example, times the interval's length.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lightning_modules.diffusion.schedule import CosineSchedule

# (z (B, D), log_snr (B,)) -> predicted noise eps_hat (B, D)
NoisePredictor = Callable[[Tensor, Tensor], Tensor]


def _per_example_sum(a: Tensor) -> Tensor:
    return a.flatten(1).sum(1)


def endpoint_terms(x: Tensor, schedule: CosineSchedule) -> Tensor:
    """Reconstruction (t = 0) plus prior (t = 1) terms of the bound, exact, per example (B,)."""
    d = x[0].numel()
    lam0 = torch.tensor(schedule.log_snr_max, dtype=torch.float64)
    lam1 = torch.tensor(schedule.log_snr_min, dtype=torch.float64)
    # sigma_0^2 / alpha_0^2 = e^{-lambda_max}
    reconstruction = 0.5 * d * (math.log(2 * math.pi) - float(lam0) + 1.0)
    alpha1_sq, sigma1_sq = torch.sigmoid(lam1), torch.sigmoid(-lam1)
    prior = 0.5 * (_per_example_sum(alpha1_sq * x.double() ** 2) + d * (sigma1_sq - 1 - sigma1_sq.log()))
    return (reconstruction + prior).to(x.dtype)


def diffusion_term_at(x: Tensor, predict_noise: NoisePredictor, schedule: CosineSchedule, log_snr: Tensor,
                      eps: Tensor) -> Tensor:
    """The diffusion term's integrand at given draws, times the interval's length: (range / 2) ||eps - eps_hat||^2
    per example (B,), with z_lambda = alpha x + sigma eps; unbiased for the term when lambda ~ U[lambda_min,
    lambda_max] (each lambda's marginal; stratified draws qualify)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    alpha, sigma = torch.sigmoid(log_snr).sqrt().view(shape), torch.sigmoid(-log_snr).sqrt().view(shape)
    error = _per_example_sum(((eps - predict_noise(alpha * x + sigma * eps, log_snr)) ** 2).double())
    # control variate: ||eps||^2 - D has mean 0 whatever lambda is. At high SNR eps_hat ~ 0 and the error is
    # mostly ||eps||^2, at low SNR eps_hat ~ eps; subtracting alpha^2 (||eps||^2 - D) removes most of the draw's
    # variance at the high end and little at the low end, and leaves the estimate unbiased.
    d = x[0].numel()
    error = error - torch.sigmoid(log_snr).double() * (_per_example_sum(eps.double() ** 2) - d)
    return 0.5 * (schedule.log_snr_max - schedule.log_snr_min) * error


def diffusion_term(x: Tensor, predict_noise: NoisePredictor, schedule: CosineSchedule,
                   generator: torch.Generator | None = None) -> Tensor:
    """One unbiased draw of (1/2) int E||eps - eps_hat||^2 d lambda per example (B,): lambda uniform on the
    schedule's range, z_lambda = alpha x + sigma eps."""
    lam = schedule.log_snr_min + (schedule.log_snr_max - schedule.log_snr_min) * torch.rand(
        len(x), generator=generator, device=x.device, dtype=x.dtype)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return diffusion_term_at(x, predict_noise, schedule, lam, eps).to(x.dtype)


def negative_log_likelihood_bound(x: Tensor, predict_noise: NoisePredictor, schedule: CosineSchedule,
                                  generator: torch.Generator | None = None) -> Tensor:
    """An unbiased estimate of the upper bound on -log p(x), per example (B,): average several calls to shrink
    its variance (the bound itself does not depend on how many)."""
    return endpoint_terms(x, schedule) + diffusion_term(x, predict_noise, schedule, generator)
