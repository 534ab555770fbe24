"""GAN objectives on discriminator logits, each a (discriminator loss, generator loss) pair.

- "nonsaturating": D minimises the logistic loss -log sigma(D(x)) - log(1 - sigma(D(G(z)))); G maximises
  log sigma(D(G(z))) instead of minimising log(1 - sigma(D(G(z)))), which saturates early in training
  (Goodfellow et al. 2014, section 3). With log sigma(t) = -softplus(-t) and log(1 - sigma(t)) = -softplus(t).
- "hinge": D minimises E relu(1 - D(x)) + E relu(1 + D(G(z))), G minimises -E D(G(z))
  (Lim & Ye 2017, "Geometric GAN"; used with spectral norm by Miyato et al. 2018).
- Semi-supervised (K+1 classes, Salimans et al. 2016, section 5): D's K class logits, the fake class's
  fixed at 0; D is trained by cross-entropy on the labelled examples plus the logistic loss on
  logsumexp of the logits, G by feature matching (see the functions at the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.contract import UNLABELLED


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


# --- semi-supervised: the (K+1)-class discriminator (Salimans et al. 2016, section 5) ------------------
# D has logits l_1..l_K for the real classes and the fake class's logit fixed at 0, so with
# Z(x) = sum_k exp l_k(x), D(x) = Z / (Z + 1) = sigma(t) where t = logsumexp_k l_k: the unsupervised
# terms are the logistic loss on t, -log D(x) = softplus(-t) and -log(1 - D(G(z))) = softplus(t),
# stable for any logits; p(y | x, real) = softmax(l).


def k_plus_one_real(logits: Tensor) -> Tensor:
    """-log D(x) per example, (B,), from the K class logits (B, K)."""
    return F.softplus(-torch.logsumexp(logits, 1))


def k_plus_one_fake(logits: Tensor) -> Tensor:
    """-log(1 - D(G(z))) per example, (B,)."""
    return F.softplus(torch.logsumexp(logits, 1))


def supervised_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """-log p(y | x, real) averaged over the examples whose label is not UNLABELLED (0 when none is):
    the per-batch mean stands in for Salimans et al.'s separate labelled minibatch."""
    labelled = y != UNLABELLED
    if not bool(labelled.any()):
        return logits.sum() * 0.0  # keeps every logit in the graph (DDP expects a gradient for each)
    return F.cross_entropy(logits[labelled], y[labelled])


def k_plus_one_discriminator(real_logits: Tensor, y_real: Tensor, fake_logits: Tensor) -> Tensor:
    """L_supervised + L_unsupervised (Salimans et al. 2016, section 5): cross-entropy on the labelled real
    examples, -log D(x) on every real one and -log(1 - D(G(z))) on the fakes."""
    unsupervised = k_plus_one_real(real_logits).mean() + k_plus_one_fake(fake_logits).mean()
    return supervised_cross_entropy(real_logits, y_real) + unsupervised


def feature_matching(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """|| E f(x) - E f(G(z)) ||^2 / dim on D's penultimate features (Salimans et al. 2016, section 3.1;
    averaged over the features like their code, so its scale does not grow with the layer's width)."""
    return (real_features.flatten(1).mean(0) - fake_features.flatten(1).mean(0)).pow(2).mean()


def class_responsibilities(logits: Tensor, y: Tensor) -> Tensor:
    """p(y | x) from D's class logits (B, K), with the one-hot label in the rows whose label is known."""
    probs = torch.softmax(logits, 1)
    labelled = y != UNLABELLED
    probs[labelled] = F.one_hot(y[labelled], logits.shape[1]).to(probs.dtype)
    return probs


def class_feature_matching(real_features: Tensor, real_probs: Tensor, fake_features: Tensor,
                           y_fake: Tensor) -> Tensor:
    """Feature matching per class, for a conditional G: || E[f(x) | y] - E[f(G(z, y)) | y] ||^2 / dim averaged
    over the classes among the fakes, the real class means weighting each example by `real_probs` (B, K),
    its p(y | x) (a known label: one-hot). Not in Salimans et al.; it keeps G(z, y) of class y without the
    cross-entropy term that makes the fakes easy to classify (see the GAN module's docstring)."""
    real, fake = real_features.flatten(1), fake_features.flatten(1)
    real_means = real_probs.t() @ real / real_probs.sum(0)[:, None].clamp_min(1e-8)
    one_hot = F.one_hot(y_fake, real_probs.shape[1]).to(fake.dtype)
    counts = one_hot.sum(0)
    fake_means = one_hot.t() @ fake / counts[:, None].clamp_min(1)
    present = counts > 0
    return (real_means[present] - fake_means[present]).pow(2).mean()
