"""Families with a Bernoulli observation model (binary VAE decoder, Bernoulli RBM) see data in [0, 1]^D
through a 0.5 threshold. Their probability mass P(b) over binary images defines the piecewise-constant
density p(x) = P(b(x)) * 2^D on [0, 1]^D (uniform within each half-cube), which is comparable with every
other family's continuous density."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def binarize(x: Tensor) -> Tensor:
    return (x > 0.5).to(x.dtype)


def density_offset(dim: int) -> float:
    """log 2^D: from log P(b) to the log-density of the half-cube of b."""
    return dim * math.log(2.0)


def sample_half_cube(b: Tensor) -> Tensor:
    """A draw from the uniform density on the half-cube of each binary b: (b + u) / 2."""
    return (b + torch.rand_like(b)) / 2
