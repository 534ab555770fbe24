"""The RBM's visible units, the only place where its kinds differ: Bernoulli units over binarised data
(a piecewise-constant density on [0, 1]^D, see `lightning_modules.common.binarized`), Gaussian units over
standardised real data (Krizhevsky 2009, sec. 1.4.1; Cho et al. 2011 learn log sigma the same way), and
categorical (softmax) units over discrete levels (Salakhutdinov, Mnih & Hinton 2007, sec. 2), with one weight per
level or, ordinal, one per pixel along the intensity."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.common.binarized import binarize, density_offset, sample_half_cube
from lightning_modules.contract import DataInfo

Statistics = Tuple[Tensor, Tensor, Tensor]  # shift, scale, base visible bias


def sample_bernoulli(p: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Independent draws with success probabilities p, as (u < p) with u ~ U[0, 1): the law of torch.bernoulli
    at half its cost on CPU (the Gibbs sweeps spend most of their time here)."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return (u < p).to(p.dtype)


class BernoulliUnits:
    """Binary visibles: E_vis(v; b) = -b.v, p(v_i = 1 | h) = sigmoid(b_i + W_i.h)."""

    name = "bernoulli"  # sigma is always 1 and ignored
    default_lr, default_init_std = 0.05, 0.01

    @staticmethod
    def model_dim(info: DataInfo) -> int:
        """The number of visible units (one per data dimension)."""
        return info.dim

    @classmethod
    def interaction_dim(cls, info: DataInfo) -> int:
        """The rows of W: what `over_sigma` maps the visibles to (the visibles themselves unless said otherwise)."""
        return cls.model_dim(info)

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
        return sample_bernoulli(torch.sigmoid(pre), generator)

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
    model_dim = BernoulliUnits.model_dim
    interaction_dim = BernoulliUnits.model_dim

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


class CategoricalUnits(BernoulliUnits):
    """Softmax visibles (Salakhutdinov, Mnih & Hinton 2007, "Restricted Boltzmann machines for collaborative
    filtering", eq. 1-2): pixel i's level l in 0..L-1 is a one-hot group v_i. of L binary units, so the model has
    D L visibles, E_vis(v; b) = -b.v as for Bernoulli units, and p(v_il = 1 | h) = softmax_l(b_il + W_il.h).
    The density on [0, 1]^D is P(levels) L^D, uniform within each level's bin [l / L, (l + 1) / L): the
    dequantisation convention of every family, so -log p(x) - D log L is the discrete-data NLL.
    A class per number of levels (`level_units`) keeps the protocol static."""

    name = "categorical"
    levels = 2  # L, set by `level_units`
    default_lr, default_init_std = 0.05, 0.01

    @classmethod
    def model_dim(cls, info: DataInfo) -> int:
        return info.dim * cls.levels

    @classmethod
    def groups(cls, a: Tensor) -> Tensor:
        """(..., D L) -> (..., D, L): one row per pixel."""
        return a.unflatten(-1, (-1, cls.levels))

    @classmethod
    def one_hot(cls, level: Tensor, like: Tensor) -> Tensor:
        """Integer levels (..., D) -> flattened one-hot groups (..., D L) with `like`'s dtype and device."""
        v = torch.zeros(level.shape + (cls.levels,), dtype=like.dtype, device=like.device)
        return v.scatter_(-1, level[..., None], 1.0).flatten(-2)

    @classmethod
    def sample(cls, pre: Tensor, sigma: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One level per group by inversion of its softmax CDF (left unnormalised: u is scaled by the total)."""
        logits = cls.groups(pre)
        cdf = (logits - logits.amax(-1, keepdim=True)).exp().cumsum(-1)
        u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=pre.device, dtype=pre.dtype)
        return cls.one_hot((cdf < u * cdf[..., -1:]).sum(-1).clamp_max(cls.levels - 1), pre)

    @classmethod
    def log_likelihood(cls, v: Tensor, pre: Tensor, sigma: Tensor) -> Tensor:
        return (v * torch.log_softmax(cls.groups(pre), -1).flatten(-2)).sum(-1)

    @classmethod
    def log_partition(cls, pre: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        """log sum_v exp(v.pre) over one-hot groups = sum_i logsumexp_l pre_il."""
        return torch.logsumexp(cls.groups(pre), -1).sum(-1)

    @classmethod
    def base_bias(cls, v: Tensor) -> Tensor:
        """Independent categorical pixels fitted to one-hot data v: log of the Laplace-smoothed level frequencies."""
        p = (cls.groups(v).sum(0).double() + 1) / (len(v) + cls.levels)
        return p.log().flatten().float()

    @classmethod
    def statistics(cls, x: Tensor) -> Statistics:
        """No standardisation (shift and scale are per data dimension and unused)."""
        shift, scale = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        return shift, scale, cls.base_bias(cls.to_model(x, shift, scale))

    @classmethod
    def to_model(cls, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """x in [0, 1] (dequantised levels) -> one-hot level floor(x L) per pixel, flattened to D L."""
        return cls.one_hot((x * cls.levels).floor().long().clamp(0, cls.levels - 1), shift)

    @classmethod
    def to_data(cls, v: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """A uniform draw in each pixel's level bin: (l + u) / L."""
        level = cls.groups(v).argmax(-1).to(v.dtype)
        return (level + torch.rand_like(level)) / cls.levels

    @classmethod
    def log_jacobian(cls, scale: Tensor) -> float:
        """log L^D (scale has one entry per data dimension): each level bin has volume L^-D."""
        return scale.numel() * math.log(cls.levels)


@lru_cache(maxsize=None)
def _intensity(levels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(levels, dtype=dtype, device=device) / (levels - 1)


class OrdinalUnits(CategoricalUnits):
    """Categorical levels whose interaction with the hidden layer is along the intensity: the energy is
        E(v, h) = -b.v - c.h - sum_i t(l_i) W_i.h,    t(l) = l / (L - 1) in [0, 1],
    so p(l_i = l | h) = softmax_l(b_il + t(l) W_i.h): a free histogram per pixel (the D L biases b), tilted by
    the hidden units (an exponential-family harmonium, Welling, Rosen-Zvi & Hinton 2005, with the level as the
    sufficient statistic; with L = 2 it is the Bernoulli RBM). The weights are D x H instead of the softmax
    units' D L x H: a hidden unit moves a pixel darker or brighter instead of to unrelated levels, which on
    digits keeps the samples' pixels from scattering over the levels."""

    name = "ordinal"

    @staticmethod
    def interaction_dim(info: DataInfo) -> int:
        return info.dim

    @classmethod
    def intensity(cls, dtype: torch.dtype, device) -> Tensor:
        """t(l) = l / (L - 1) for l = 0..L-1 (cached per dtype and device: the Gibbs sweeps ask for it twice each)."""
        return _intensity(cls.levels, dtype, torch.device(device))

    @classmethod
    def over_sigma(cls, v: Tensor, sigma: Tensor) -> Tensor:
        """One-hot groups (..., D L) -> each pixel's intensity t(l) (..., D)."""
        return cls.groups(v) @ cls.intensity(v.dtype, v.device)

    @classmethod
    def times_sigma(cls, a: Tensor, sigma: Tensor) -> Tensor:
        """Per-pixel hidden input W_i.h (..., D) -> its contribution t(l) W_i.h to every level (..., D L)."""
        return (a[..., None] * cls.intensity(a.dtype, a.device)).flatten(-2)


@lru_cache(maxsize=None)
def level_units(base: type, levels: int) -> type:
    """The categorical or ordinal units class for L levels (cached, so each L has one class)."""
    return type(f"{base.__name__}{levels}", (base,), {"levels": levels})


UNITS = {u.name: u for u in (BernoulliUnits, GaussianUnits)}
LEVEL_UNITS = {u.name: u for u in (CategoricalUnits, OrdinalUnits)}
MAX_LEVELS = 32  # `auto` above this binarises: the D L visible units grow with the levels


def visible_units(visible: str, info: DataInfo):
    """`auto`: ordinal for images with at most 32 levels (digits), Bernoulli (binarised) for images with
    more (MNIST), Gaussian for real vectors."""
    if visible == "auto":
        if info.kind != "image":
            visible = "gaussian"
        elif info.levels is not None and info.levels <= MAX_LEVELS:
            visible = "ordinal"
        else:
            visible = "bernoulli"
    if visible in LEVEL_UNITS:
        if info.levels is None:
            raise ValueError(f"{visible} visibles need discrete data (DataInfo.levels)")
        return level_units(LEVEL_UNITS[visible], info.levels)
    return UNITS[visible]
