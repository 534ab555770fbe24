"""Normalizing-flow building blocks (normflows / zuko style): a flow is a list of invertible transforms
over a base distribution.

Convention: a transform's `forward` goes data -> latent (the normalizing direction) and returns the
per-example log|det Jacobian| of that map; `inverse` goes latent -> data (the sampling direction).
"""
from lightning_modules.flow.transforms.actnorm import ActNorm
from lightning_modules.flow.transforms.autoregressive import MaskedAffineAutoregressive
from lightning_modules.flow.transforms.base import Sequential, Transform
from lightning_modules.flow.transforms.conv1x1 import InvertibleConv1x1
from lightning_modules.flow.transforms.coupling import AffineCoupling, channel_mask, checkerboard_mask
from lightning_modules.flow.transforms.distribution import ClassConditionalNormal, NormalizingFlow, StandardNormal
from lightning_modules.flow.transforms.logit import Logit
from lightning_modules.flow.transforms.made import MADE
from lightning_modules.flow.transforms.multiscale import Split
from lightning_modules.flow.transforms.permutation import Reverse
from lightning_modules.flow.transforms.spline import (
    MaskedSplineAutoregressive, SplineCoupling, rational_quadratic_spline,
)
from lightning_modules.flow.transforms.squeeze import Flatten, Squeeze

__all__ = [
    "ActNorm", "AffineCoupling", "ClassConditionalNormal", "Flatten", "InvertibleConv1x1", "Logit", "MADE",
    "MaskedAffineAutoregressive", "MaskedSplineAutoregressive", "NormalizingFlow", "Reverse", "Sequential", "Split",
    "SplineCoupling", "Squeeze", "StandardNormal", "Transform", "channel_mask", "checkerboard_mask",
    "rational_quadratic_spline",
]
