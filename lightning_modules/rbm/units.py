"""The RBM's visible units, the only place where its two kinds differ: Bernoulli units over binarised data
(a piecewise-constant density on [0, 1]^D, see `lightning_modules.common.binarized`) and Gaussian units over
standardised real data (Krizhevsky 2009, sec. 1.4.1; Cho et al. 2011 learn log sigma the same way)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.common.binarized import binarize, density_offset, sample_half_cube
from lightning_modules.contract import DataInfo

Statistics = Tuple[Tensor, Tensor, Tensor]  # shift, scale, base visible bias


class BernoulliUnits:
    """Binary visibles: E_vis(v; b) = -b.v, p(v_i = 1 | h) = sigmoid(b_i + W_i.h)."""

    name = "bernoulli"  # sigma is always 1 and ignored
    default_lr, default_init_std = 0.05, 0.01

    @staticmethod
    def over_sigma(v: Tensor, sigma: Tensor) -> Tensor:
        return v

    @staticmethod
    def times_sigma(a: Tensor, sigma: Tensor) -> Tensor:
        return a

    @staticmethod
    def energy(v: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        return -(v * bias).sum(-1)

    @staticmethod
    def sample(pre: Tensor, sigma: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(pre), generator=generator)

    @staticmethod
    def log_likelihood(v: Tensor, pre: Tensor, sigma: Tensor) -> Tensor:
        """log p(v | h) given the visible input pre = b + Wh."""
        return (v * pre - F.softplus(pre)).sum(-1)

    @staticmethod
    def log_partition(pre: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        """log sum_v exp(-E_vis(v; bias) + v.(pre - bias)) = sum_i softplus(pre_i)."""
        return F.softplus(pre).sum(-1)

    @staticmethod
    def base_bias(v: Tensor) -> Tensor:
        """The base model fitted to binary data v: logit of the Laplace-smoothed pixel marginals (Salakhutdinov
        & Murray 2008's base model; also Hinton 2010 guide sec. 8's initial visible bias)."""
        p = (v.sum(0).double() + 1) / (len(v) + 2)
        return torch.logit(p).float()

    @classmethod
    def statistics(cls, x: Tensor) -> Statistics:
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1]), cls.base_bias(x > 0.5)

    @staticmethod
    def to_model(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return binarize(x).to(shift.dtype)

    @staticmethod
    def to_data(v: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return sample_half_cube(v)

    @staticmethod
    def log_jacobian(scale: Tensor) -> float:
        """log of the data-space density per unit of P(b): each half-cube has volume 2^-D."""
        return density_offset(scale.numel())


class GaussianUnits:
    """Gaussian visibles: E_vis(v; b) = sum_i (v_i - b_i)^2 / 2 sigma_i^2, p(v | h) = N(b + sigma * Wh, sigma^2)."""

    name = "gaussian"
    default_lr, default_init_std = 0.003, 0.5
    min_scale = 1e-3  # a constant input dimension would have an infinite density

    @staticmethod
    def over_sigma(v: Tensor, sigma: Tensor) -> Tensor:
        return v / sigma

    @staticmethod
    def times_sigma(a: Tensor, sigma: Tensor) -> Tensor:
        return a * sigma

    @staticmethod
    def energy(v: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        return 0.5 * ((v - bias) / sigma).square().sum(-1)

    @staticmethod
    def sample(pre: Tensor, sigma: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return pre + sigma * torch.randn(pre.shape, generator=generator, device=pre.device, dtype=pre.dtype)

    @staticmethod
    def log_likelihood(v: Tensor, pre: Tensor, sigma: Tensor) -> Tensor:
        return (-0.5 * ((v - pre) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def log_partition(pre: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        """log int exp(-sum (v - bias)^2 / 2 sigma^2 + v.(pre - bias) / sigma^2) dv, by completing the square."""
        per_dim = (pre.square() - bias.square()) / (2 * sigma.square()) + sigma.log() + 0.5 * math.log(2 * math.pi)
        return per_dim.sum(-1)

    @staticmethod
    def base_bias(v: Tensor) -> Tensor:
        """The base model fitted to standardised data v (its sigma is the RBM's): the data mean."""
        return v.double().mean(0).float()

    @classmethod
    def statistics(cls, x: Tensor) -> Statistics:
        x = x.double()
        scale = x.std(0).clamp_min(cls.min_scale)
        return x.mean(0).float(), scale.float(), torch.zeros(x.shape[1])

    @staticmethod
    def to_model(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return (x - shift) / scale

    @staticmethod
    def to_data(v: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return v * scale + shift

    @staticmethod
    def log_jacobian(scale: Tensor) -> Tensor:
        return -scale.log().sum()


UNITS = {u.name: u for u in (BernoulliUnits, GaussianUnits)}


def visible_units(visible: str, info: DataInfo):
    """`auto`: Bernoulli for images (binarised), Gaussian for real vectors."""
    if visible == "auto":
        visible = "bernoulli" if info.kind == "image" else "gaussian"
    return UNITS[visible]
