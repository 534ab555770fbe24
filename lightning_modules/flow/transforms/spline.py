"""Rational-quadratic spline transforms (Neural Spline Flows, Durkan, Bekasov, Murray & Papamakarios 2019).

Each feature goes through its own monotonic rational-quadratic spline (§3.1): K bins on [-B, B] whose
widths w_k and heights h_k are softmaxes (each at least `min_bin` of the interval), and K - 1 interior knot
derivatives d_k = min_derivative + softplus(raw_k + c) (boundary derivatives d_0 = d_K = 1, so the map joins
the identity tails outside [-B, B] with a continuous derivative). With xi = (x - x_k) / w_k in bin k and
s_k = h_k / w_k, the spline is (eq. 4, Appendix A.1)

    y = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)],

its derivative (eq. 5, Appendix A.2)

    dy/dx = s_k^2 [d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)]^2,

and its inverse the root in [0, 1] of a quadratic a xi^2 + b xi + c = 0 (Appendix A.3), taken in the
cancellation-free form xi = 2c / (-b - sqrt(b^2 - 4ac)). The offset c = log(e^(1 - min_derivative) - 1) makes a
raw derivative of 0 exactly 1, so all-zero raw parameters (a zero-initialised conditioner) give uniform bins
with unit derivatives: the identity. The layers divide the raw widths and heights by sqrt(hidden units), as
the authors' code (nflows) does: with it a conditioner of O(1) weights gives a moderate spline, and on digits
(with a larger learning rate) the flow ends 1.8 nats better than without.

`MaskedSplineAutoregressive` (§3.2's autoregressive layer, as MAF's) takes the 3K - 1 spline parameters of
feature i from a MADE of x_<i: density evaluation is one pass, sampling D passes. `SplineCoupling` (§3.2's
coupling layer) takes them from an MLP of the masked features, one pass either way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common import nets
from lightning_modules.flow.transforms.base import Transform
from lightning_modules.flow.transforms.made import MADE
from lightning_modules.flow.transforms.nets import zero_init


def rational_quadratic_spline(x: Tensor, raw_widths: Tensor, raw_heights: Tensor, raw_derivatives: Tensor,
                              bound: float = 3.0, inverse: bool = False, min_bin: float = 1e-3,
                              min_derivative: float = 1e-3):
    """The monotonic RQ spline of every entry of x, shape (B, *S), with raw parameters of shape (B, K, *S),
    (B, K, *S), (B, K - 1, *S) (the bins on dim 1: MADE's layout, and a softmax over a contiguous last dimension
    of size K is many times slower on the CPU); identity outside [-bound, bound]. Returns (y, log|dy/dx|), both
    of x's shape; with `inverse`, (x, log|dx/dy|) of the inverse map applied to `x`."""
    k = raw_widths.shape[1]
    if min_bin * k >= 1:
        raise ValueError(f"spline: {k} bins of at least {min_bin} do not fit in the interval")
    # bin sizes as fractions of [-bound, bound], each >= min_bin; knot k is -bound + 2 bound sum_{j<k} size_j
    width = min_bin + (1 - min_bin * k) * torch.softmax(raw_widths, dim=1)
    height = min_bin + (1 - min_bin * k) * torch.softmax(raw_heights, dim=1)
    cum_w, cum_h = torch.cumsum(width, 1), torch.cumsum(height, 1)
    # knot derivatives d_k = min_derivative + softplus(raw_k + offset), the offset making a raw 0 exactly 1: the
    # end knots' raw value is 0 (d_0 = d_K = 1); evaluated at the two knots of each input's bin only
    raw_d = F.pad(raw_derivatives, (0, 0) * (raw_derivatives.dim() - 2) + (1, 1))  # (B, K + 1, *S)
    offset = math.log(math.expm1(1 - min_derivative))

    inside = (x >= -bound) & (x <= bound)
    xc = torch.where(inside, x, torch.zeros_like(x))[:, None]  # tails: computed at 0, then the identity
    # the bin: how many interior knots lie at or below the input (a compare per knot: K is small)
    cum = cum_h if inverse else cum_w
    idx = ((2 * bound) * cum[:, :-1] - bound <= xc).sum(1, keepdim=True)  # (B, 1, *S), 0..K-1

    def at(t: Tensor) -> Tensor:
        return t.gather(1, idx)

    w, h = (2 * bound) * at(width), (2 * bound) * at(height)
    x0 = (2 * bound) * (at(cum_w) - at(width)) - bound
    y0 = (2 * bound) * (at(cum_h) - at(height)) - bound
    d0 = min_derivative + F.softplus(at(raw_d) + offset)
    d1 = min_derivative + F.softplus(raw_d.gather(1, idx + 1) + offset)
    s = h / w
    curv = d1 + d0 - 2 * s
    if not inverse:
        xi = (xc - x0) / w  # in [0, 1] up to rounding (no clamp: it would cut autograd's derivative there)
        q = xi * (1 - xi)
        denom = s + curv * q
        out = y0 + h * (s * xi**2 + d0 * q) / denom
    else:
        dy = xc - y0
        a = h * (s - d0) + dy * curv
        b = h * d0 - dy * curv
        c = -s * dy
        disc = (b**2 - 4 * a * c).clamp_min(0)  # >= 0 for a monotonic spline; clamp rounding only
        xi = (2 * c) / (-b - disc.sqrt())
        q = xi * (1 - xi)
        denom = s + curv * q
        out = x0 + xi * w
    logderiv = 2 * torch.log(s) + torch.log(d1 * xi**2 + 2 * s * q + d0 * (1 - xi) ** 2) - 2 * torch.log(denom)
    out, logderiv = out.squeeze(1), logderiv.squeeze(1)
    if inverse:
        logderiv = -logderiv
    return torch.where(inside, out, x), torch.where(inside, logderiv, torch.zeros_like(logderiv))


class _SplineParams:
    """Splits a conditioner's (B, (3K - 1) * D) output, block p holding parameter p of every feature (MADE's
    layout), into raw widths, heights and derivatives of shape (B, K, D), (B, K, D), (B, K - 1, D). The raw
    widths and heights are divided by sqrt(hidden units), as in the authors' code (nflows), which keeps a
    spline of a conditioner with O(1) weights near the identity."""

    def __init__(self, features: int, bins: int, hidden: int):
        self.features, self.bins, self.scale = features, bins, 1 / math.sqrt(hidden)
        self.params = 3 * bins - 1

    def __call__(self, out: Tensor):
        """`out` (B, (3K - 1) * D), or (B, 3K - 1, D') already split into parameter blocks."""
        p = out.view(out.shape[0], self.params, -1)
        return p[:, : self.bins] * self.scale, p[:, self.bins : 2 * self.bins] * self.scale, p[:, 2 * self.bins :]


class MaskedSplineAutoregressive(Transform):
    """z_i = RQS(x_i; theta_i(x_<i)) with theta from one MADE pass (Durkan et al. 2019 §3.2, autoregressive
    form); log|det dz/dx| = sum_i log RQS'(x_i). Sampling inverts one feature at a time (D passes)."""

    def __init__(self, features: int, hidden: int, layers: int = 2, bins: int = 8, bound: float = 3.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"spline: need at least 2 bins, got {bins}")
        self.made = MADE(features, hidden, layers, outputs_per_feature=3 * bins - 1)  # zero-init last layer
        self.split = _SplineParams(features, bins, hidden)
        self.features, self.bound = features, bound

    def forward(self, x: Tensor):
        z, logd = rational_quadratic_spline(x, *self.split(self.made(x)), bound=self.bound)
        return z, logd.sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        """Feature i from the exact features < i, in D passes; each pass evaluates only the output units
        of feature i (the MADE's last layer is (3K - 1) blocks of D rows) and inverts only its spline."""
        hidden, last = self.made.net[:-1], self.made.net[-1]
        d, p = self.features, self.split.params
        weight = (last.weight * last.mask).view(p, d, -1)
        bias = last.bias.view(p, d)
        x = torch.zeros_like(z)
        for i in range(d):
            out = hidden(x) @ weight[:, i].T + bias[:, i]  # (B, 3K - 1): feature i's raw parameters
            xi = rational_quadratic_spline(z[:, i : i + 1], *self.split(out[:, :, None]), bound=self.bound,
                                           inverse=True)[0]
            x = torch.cat([x[:, :i], xi, x[:, i + 1 :]], 1)
        return x


class SplineCoupling(Transform):
    """Coupling form (Durkan et al. 2019 §3.2): features with mask 1 pass unchanged and condition, through
    an MLP, the splines of the others; log|det| = sum over the free features of log RQS'."""

    def __init__(self, mask: Tensor, hidden: int, layers: int = 2, bins: int = 8, bound: float = 3.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"spline: need at least 2 bins, got {bins}")
        features = mask.shape[0]
        self.register_buffer("mask", mask.float())
        self.net = nets.mlp(features, hidden, (3 * bins - 1) * features, layers, nn.ReLU)
        zero_init(self.net[-1])  # uniform bins, unit derivatives: the identity
        self.split = _SplineParams(features, bins, hidden)
        self.bound = bound

    def _spline(self, x: Tensor, inverse: bool):
        y, logd = rational_quadratic_spline(x, *self.split(self.net(x * self.mask)), bound=self.bound, inverse=inverse)
        free = self.mask == 0
        return torch.where(free, y, x), (logd * free).sum(1)

    def forward(self, x: Tensor):
        return self._spline(x, inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        return self._spline(y, inverse=True)[0]


__all__ = ["MaskedSplineAutoregressive", "SplineCoupling", "rational_quadratic_spline"]
