"""A fixed feature permutation (log-det 0): reversing the order of the features between autoregressive
layers, so that each feature is conditioned on every other one somewhere in the stack (MAF, Papamakarios
et al. 2017, §3.2; the alternating orders of Neural Spline Flows, Durkan et al. 2019)."""
from __future__ import annotations

from torch import Tensor

from lightning_modules.flow.transforms.base import Transform


class Reverse(Transform):
    """(B, D) -> the features in reverse order; its own inverse."""

    def forward(self, x: Tensor):
        return x.flip(1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y.flip(1)
