"""Masked affine autoregressive transform (MAF, Papamakarios et al. 2017, §3.1-3.2):
z_i = (x_i - mu_i(x_<i)) * exp(-a_i(x_<i)), with mu, a from one MADE pass, so density evaluation is one
pass and log|det dz/dx| = -sum_i a_i. Sampling inverts it one feature at a time (D passes)."""
from __future__ import annotations

from torch import Tensor

from lightning_modules.flow.transforms.base import Transform
from lightning_modules.flow.transforms.made import MADE
from lightning_modules.flow.transforms.nets import TanhScale


class MaskedAffineAutoregressive(Transform):
    def __init__(self, features: int, hidden: int, layers: int = 2):
        super().__init__()
        self.made = MADE(features, hidden, layers, outputs_per_feature=2)
        self.scale = TanhScale(features)
        self.features = features

    def _shift_log_scale(self, x: Tensor):
        mu, raw = self.made(x).chunk(2, dim=1)
        return mu, self.scale(raw)

    def forward(self, x: Tensor):
        mu, a = self._shift_log_scale(x)
        return (x - mu) * (-a).exp(), -a.sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        x = z.new_zeros(z.shape)
        for _ in range(self.features):  # after pass i, features <= i are exact
            mu, a = self._shift_log_scale(x)
            x = z * a.exp() + mu
        return x
