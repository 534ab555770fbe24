"""GAN objectives on discriminator logits, each a (discriminator loss, generator loss) pair.

- "nonsaturating": D minimises the logistic loss -log sigma(D(x)) - log(1 - sigma(D(G(z)))); G maximises
  log sigma(D(G(z))) instead of minimising log(1 - sigma(D(G(z)))), which saturates early in training
  (Goodfellow et al. 2014, section 3). With log sigma(t) = -softplus(-t) and log(1 - sigma(t)) = -softplus(t).
- "hinge": D minimises E relu(1 - D(x)) + E relu(1 + D(G(z))), G minimises -E D(G(z))
  (Lim & Ye 2017, "Geometric GAN"; used with spectral norm by Miyato et al. 2018).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GANLoss:
    discriminator: Callable[[Tensor, Tensor], Tensor]  # (real logits, fake logits) -> scalar
    generator: Callable[[Tensor], Tensor]  # fake logits -> scalar


def nonsaturating_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nonsaturating_g(fake: Tensor) -> Tensor:
    return F.softplus(-fake).mean()


def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: Tensor) -> Tensor:
    return -fake.mean()


LOSSES: Dict[str, GANLoss] = {
    "nonsaturating": GANLoss(nonsaturating_d, nonsaturating_g),
    "hinge": GANLoss(hinge_d, hinge_g),
}


def gan_loss(name: str) -> GANLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown GAN loss '{name}' (choices: {', '.join(LOSSES)})")
    return LOSSES[name]
