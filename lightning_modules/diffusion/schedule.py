"""The noise schedule of a variance-preserving diffusion, in continuous time t in [0, 1].

    z_t = alpha_t x + sigma_t eps,   eps ~ N(0, I),   alpha_t^2 + sigma_t^2 = 1,

parametrised by the log signal-to-noise ratio lambda(t) = log(alpha_t^2 / sigma_t^2), so that
alpha_t^2 = sigmoid(lambda) and sigma_t^2 = sigmoid(-lambda) (Kingma et al. 2021, "Variational diffusion models",
sec. 3). The cosine schedule of Nichol & Dhariwal (2021), alpha_t^2 = cos^2(pi t / 2) up to its offset, is in this
form lambda(t) = -2 log tan(a t + b) (Kingma & Gao 2023, "Understanding diffusion objectives", appendix D), with a
and b set so that lambda runs from `log_snr_max` at t = 0 to `log_snr_min` at t = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CosineSchedule:
    log_snr_max: float = 10.0  # at t = 0: sigma_0 = e^-5 ~ 0.007 on data of unit scale
    log_snr_min: float = -10.0  # at t = 1: alpha_1 = e^-5, so q(z_1 | x) is N(0, I) to within a KL of ~1e-5 per dim

    def __post_init__(self):
        if not self.log_snr_max > self.log_snr_min:
            raise ValueError(f"log_snr_max ({self.log_snr_max}) must exceed log_snr_min ({self.log_snr_min})")

    @property
    def _b(self) -> float:
        return math.atan(math.exp(-self.log_snr_max / 2))

    @property
    def _a(self) -> float:
        return math.atan(math.exp(-self.log_snr_min / 2)) - self._b

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = -2 log tan(a t + b), decreasing from log_snr_max to log_snr_min."""
        return -2 * torch.log(torch.tan(self._a * t + self._b))

    def d_log_snr(self, t: Tensor) -> Tensor:
        """d lambda / dt = -2 a / (sin cos) = -4 a / sin(2 (a t + b)) < 0."""
        return -4 * self._a / torch.sin(2 * (self._a * t + self._b))

    def alpha_sigma(self, t: Tensor):
        """(alpha_t, sigma_t) with alpha_t^2 = sigmoid(lambda), sigma_t^2 = sigmoid(-lambda)."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
