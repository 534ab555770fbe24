"""Generator / discriminator pairs sized from the data shape.

Images get a DCGAN pair (Radford et al. 2016): the generator projects z to a small seed map and doubles it
with strided transposed convolutions (BatchNorm + ReLU); the discriminator mirrors it with strided
convolutions and LeakyReLU(0.2). The number of doublings is worked out from (H, W): halve while both stay
even and at least `min_seed` (8 -> 4, 28 -> 14 -> 7, 32 -> 16 -> 8 -> 4). The discriminator has no
BatchNorm, so real and fake batches can share one forward pass and spectral norm (Miyato et al. 2018)
controls its Lipschitz constant alone. Any other continuous data (2-D toys, float sequences) gets an MLP
pair over the flattened example.

Every discriminator is `features` (its penultimate representation, what `encode` returns) followed by a
linear `head` to one logit.

Class-conditional pairs (P(X, Y)): the generator sees a learned class embedding concatenated to its noise,
G(z, y) = G'([z, e(y)]), and the discriminator is the projection discriminator of Miyato & Koyama 2018
(eq. 3), D(x, y) = psi(phi(x)) + <v_y, phi(x)>, with phi = `features`, psi = `head` and the class vectors
v_y the rows of a bias-free linear layer `embed` (so spectral norm covers them too, as in their SNEmbedID).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_modules.common.nets import mlp, mlp_layers, num_stages
from lightning_modules.contract import DataInfo

LEAK = 0.2  # DCGAN's LeakyReLU slope in D


class SpectralNorm(nn.Module):
    """`layer` run with its weight divided by its largest singular value sigma (Miyato et al. 2018), the
    weight seen as a (out, in * kernel) matrix; sigma is tracked by one power iteration per training forward.

    torch.nn.utils.parametrizations.spectral_norm computes the same, but parametrized modules cannot be
    pickled, and ddp_spawn pickles the model; the older hook-based version cannot be deep-copied.
    """

    def __init__(self, layer: nn.Module, warmup_iterations: int = 15):
        super().__init__()
        self.layer = layer
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        self.register_buffer("u", F.normalize(torch.randn(rows), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(cols), dim=0))
        for _ in range(warmup_iterations):
            self._power_iteration()

    @torch.no_grad()
    def _power_iteration(self) -> None:
        w = self.layer.weight.flatten(1)
        self.v.copy_(F.normalize(w.t() @ self.u, dim=0))
        self.u.copy_(F.normalize(w @ self.v, dim=0))

    @property
    def weight(self) -> Tensor:
        """The weight the layer runs with; gradients flow through sigma = u^T W v (u, v held fixed)."""
        w = self.layer.weight
        sigma = self.u.clone() @ w.flatten(1) @ self.v.clone()  # clones: later iterations update u, v in place
        return w / sigma

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._power_iteration()
        return functional_call(self.layer, {"weight": self.weight}, (x,))


def with_spectral_norm(module: nn.Module) -> nn.Module:
    """Wrap every conv / linear layer of `module` in SpectralNorm."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(module, name, SpectralNorm(child))
        else:
            with_spectral_norm(child)
    return module


def _dcgan_init(module: nn.Module) -> None:
    """Weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02) (Radford et al. 2016, section 4)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:  # the projection's class vectors have none
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Discriminator(nn.Module):
    """`features` then a linear `head`; forward gives one logit per example, shape (B,)."""

    def __init__(self, features: nn.Module, feature_dim: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)


class ProjectionDiscriminator(Discriminator):
    """D(x, y) = psi(phi(x)) + <v_y, phi(x)> (Miyato & Koyama 2018, eq. 3); `embed` holds the v_y as rows."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__(features, feature_dim)
        self.embed = nn.Linear(feature_dim, num_classes, bias=False)

    def class_logits(self, x: Tensor) -> Tensor:
        """D(x, y) for every class y, shape (B, K), from one pass of `features`."""
        return self.logits_from_features(self.features(x))

    def logits_from_features(self, h: Tensor) -> Tensor:
        """D(x, y) for every class from phi(x) = h. The (K+1)-class objective reads these as the K class
        logits l_y (the shared psi(phi(x)) cancels in p(y | x) and scales Z(x) alike for all classes)."""
        return self.head(h) + self.embed(h)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.head(h).squeeze(-1) + self.embed(h).gather(1, y[:, None]).squeeze(1)


class ConditionalGenerator(nn.Module):
    """G(z, y) = net([z, e(y)]): a learned embedding of the class concatenated to the noise; `net` takes
    latent_dim + embed_dim inputs."""

    def __init__(self, net: nn.Module, num_classes: int, embed_dim: int):
        super().__init__()
        self.net = net
        self.embed = nn.Embedding(num_classes, embed_dim)  # N(0, 1) rows, the scale of z

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([z, self.embed(y)], 1))


def discriminator(features: nn.Module, feature_dim: int, num_classes: Optional[int]) -> Discriminator:
    """The plain discriminator, or the projection one for `num_classes` classes."""
    if num_classes is None:
        return Discriminator(features, feature_dim)
    return ProjectionDiscriminator(features, feature_dim, num_classes)


# --- images: DCGAN ------------------------------------------------------------------------------
class DCGANGenerator(nn.Module):
    def __init__(self, shape: Tuple[int, int, int], latent_dim: int, width: int, min_seed: int = 4):
        super().__init__()
        channels, height, wide = shape
        k = num_stages(height, wide, min_seed)
        self.seed_shape = (width * 2**k, height // 2**k, wide // 2**k)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, math.prod(self.seed_shape)), nn.Unflatten(1, self.seed_shape),
            nn.BatchNorm2d(self.seed_shape[0]), nn.ReLU(),
        )
        ups = []
        for i in range(k, 0, -1):  # width * 2^i channels -> width * 2^(i-1), spatial size doubles
            ups += [nn.ConvTranspose2d(width * 2**i, width * 2 ** (i - 1), 4, 2, 1),
                    nn.BatchNorm2d(width * 2 ** (i - 1)), nn.ReLU()]
        self.upsample = nn.Sequential(*ups)
        self.to_image = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.Sigmoid())  # data space [0, 1]
        _dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.to_image(self.upsample(self.project(z)))


def dcgan_discriminator(shape: Tuple[int, int, int], width: int, spectral: bool, num_classes: Optional[int] = None,
                        min_seed: int = 4) -> Discriminator:
    channels, height, wide = shape
    k = num_stages(height, wide, min_seed)
    layers = [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(LEAK)]
    for i in range(k):  # width * 2^i channels -> width * 2^(i+1), spatial size halves
        layers += [nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 4, 2, 1), nn.LeakyReLU(LEAK)]
    feature_dim = width * 2**k * (height // 2**k) * (wide // 2**k)
    d = discriminator(nn.Sequential(*layers, nn.Flatten()), feature_dim, num_classes)
    _dcgan_init(d)
    return with_spectral_norm(d) if spectral else d


# --- anything else continuous: MLP over the flattened example ------------------------------------
class MLPGenerator(nn.Module):
    def __init__(self, shape: tuple, latent_dim: int, width: int, layers: int, bounded: bool):
        super().__init__()
        self.net = nn.Sequential(mlp(latent_dim, width, math.prod(shape), layers, nn.ReLU),
                                 nn.Unflatten(1, tuple(shape)), *([nn.Sigmoid()] if bounded else []))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def mlp_discriminator(shape: tuple, width: int, layers: int, spectral: bool,
                      num_classes: Optional[int] = None) -> Discriminator:
    hidden = mlp_layers([math.prod(shape)] + [width] * layers, lambda: nn.LeakyReLU(LEAK))
    d = discriminator(nn.Sequential(nn.Flatten(), *hidden), width, num_classes)
    return with_spectral_norm(d) if spectral else d


def build_pair(info: DataInfo, latent_dim: int, width: int, mlp_layers: int, spectral: bool,
               num_classes: Optional[int] = None):
    """(generator, discriminator) for this data: DCGAN for images, an MLP pair otherwise. With `num_classes`
    the pair is class-conditional: G(z, y) takes a class embedding of latent_dim units beside z, and D(x, y)
    is the projection discriminator."""
    if info.vocab_size is not None:
        raise ValueError("the GAN family needs continuous data; token sequences are not supported")
    g_in = latent_dim if num_classes is None else 2 * latent_dim
    if info.kind == "image":
        shape = tuple(info.shape)
        g, d = DCGANGenerator(shape, g_in, width), dcgan_discriminator(shape, width, spectral, num_classes)
    else:
        bounded = info.levels is not None  # dequantised levels live in [0, 1]
        g = MLPGenerator(info.shape, g_in, width, mlp_layers, bounded)
        d = mlp_discriminator(info.shape, width, mlp_layers, spectral, num_classes)
    return (g, d) if num_classes is None else (ConditionalGenerator(g, num_classes, latent_dim), d)
