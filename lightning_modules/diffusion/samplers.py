"""Samplers of a variance-preserving diffusion, walking a uniform grid of times from t = 1 (z ~ N(0, I)) to
t = 0, given a noise predictor eps_hat(z, lambda):

- `ddpm`: ancestral sampling from the model's reverse process p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))
  (Ho et al. 2020, eq. 6-7; in log-SNR form, Kingma et al. 2021 appendix A.4);
- `ddim`: the deterministic DDIM update z_s = alpha_s x_hat + sigma_s eps_hat (Song et al. 2021, eq. 12 with
  eta = 0), the Euler step of the probability-flow ODE in log-SNR time;
- `encode` / `decode`: the probability-flow ODE that DDIM discretises, run from t = 0 to t = 1 and back with Heun's
  second-order method: the deterministic latent and its inverse.

`clip` bounds x_hat (images: [-1, 1]) while sampling, as the DDPM reference code does; the inversion never clips.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_modules.diffusion.schedule import CosineSchedule

# (z, log_snr (B,)) -> eps_hat
NoiseFn = Callable[[Tensor, Tensor], Tensor]


def _coefficients(log_snr: Tensor, like: Tensor):
    """(alpha, sigma) at `log_snr`, shaped to broadcast over `like` and in its dtype."""
    shape = (-1,) + (1,) * (like.dim() - 1)
    alpha, sigma = torch.sigmoid(log_snr).sqrt().view(shape), torch.sigmoid(-log_snr).sqrt().view(shape)
    return alpha.to(like.dtype), sigma.to(like.dtype)


def _predict(eps_fn: NoiseFn, z: Tensor, log_snr: Tensor, clip: Optional[float]):
    """(x_hat, eps_hat) at z, with eps_hat made consistent with a clipped x_hat."""
    lam = log_snr.expand(len(z))
    alpha, sigma = _coefficients(lam, z)
    eps = eps_fn(z, lam)
    x = (z - sigma * eps) / alpha
    if clip is not None:
        x = x.clamp(-clip, clip)
        eps = (z - alpha * x) / sigma
    return x, eps


def log_snr_grid(schedule: CosineSchedule, steps: int, device=None) -> Tensor:
    """lambda at t = 1, (steps-1)/steps, ..., 0: increasing."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return schedule.log_snr(t).float()


@torch.no_grad()
def ddpm(eps_fn: NoiseFn, z: Tensor, schedule: CosineSchedule, steps: int, clip: Optional[float] = None,
         generator: Optional[torch.Generator] = None) -> Tensor:
    """z ~ N(0, I) at t = 1 -> x: the mean of p(x | z_0) = z_0 / alpha_0."""
    grid = log_snr_grid(schedule, steps, z.device)
    for lam_t, lam_s in zip(grid[:-1], grid[1:]):
        x, _ = _predict(eps_fn, z, lam_t, clip)
        alpha_t, _ = _coefficients(lam_t.view(1), z)
        alpha_s, sigma_s = _coefficients(lam_s.view(1), z)
        c = -torch.expm1(lam_t - lam_s)  # 1 - SNR(t) / SNR(s)
        mean = alpha_s * ((1 - c) * z / alpha_t + c * x)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = mean + (c.sqrt() * sigma_s) * noise
    return z / _coefficients(grid[-1:], z)[0]


@torch.no_grad()
def ddim(eps_fn: NoiseFn, z: Tensor, schedule: CosineSchedule, steps: int, clip: Optional[float] = None) -> Tensor:
    """The deterministic map from the latent z at t = 1 to x."""
    grid = log_snr_grid(schedule, steps, z.device)
    for lam_t, lam_s in zip(grid[:-1], grid[1:]):
        x, eps = _predict(eps_fn, z, lam_t, clip)
        alpha_s, sigma_s = _coefficients(lam_s.view(1), z)
        z = alpha_s * x + sigma_s * eps
    return z / _coefficients(grid[-1:], z)[0]


def _heun(eps_fn: NoiseFn, z: Tensor, grid: Tensor) -> Tensor:
    """The probability-flow ODE from grid[0] to grid[-1] (either direction) by Heun's method in the variables
    y = z / alpha and s = sigma / alpha = e^(-lambda / 2), where it reads dy/ds = eps_hat (DDIM's update is its Euler
    step): second order, so an encoding and its decoding agree to ~1e-3 with 100 steps where Euler needs thousands."""
    for lam_a, lam_b in zip(grid[:-1], grid[1:]):
        alpha_a, sigma_a = _coefficients(lam_a.view(1), z)
        alpha_b, sigma_b = _coefficients(lam_b.view(1), z)
        y, ds = z / alpha_a, sigma_b / alpha_b - sigma_a / alpha_a
        eps_a = eps_fn(z, lam_a.to(z.dtype).expand(len(z)))
        eps_b = eps_fn(alpha_b * (y + ds * eps_a), lam_b.to(z.dtype).expand(len(z)))
        z = alpha_b * (y + ds * 0.5 * (eps_a + eps_b))
    return z


@torch.no_grad()
def encode(eps_fn: NoiseFn, x: Tensor, schedule: CosineSchedule, steps: int) -> Tensor:
    """x -> its deterministic latent at t = 1 (the DDIM / probability-flow inversion, Song et al. 2021), starting
    from z_0 = alpha_0 x."""
    grid = log_snr_grid(schedule, steps, x.device).double().flip(0)
    return _heun(eps_fn, x * _coefficients(grid[:1], x)[0], grid)


@torch.no_grad()
def decode(eps_fn: NoiseFn, latent: Tensor, schedule: CosineSchedule, steps: int) -> Tensor:
    """The inverse of `encode` (same steps): the latent at t = 1 -> x = z_0 / alpha_0."""
    grid = log_snr_grid(schedule, steps, latent.device).double()
    return _heun(eps_fn, latent, grid) / _coefficients(grid[-1:], latent)[0]
