"""Variational autoencoder (Kingma & Welling 2014) trained on the (beta-)ELBO; `log_prob` is the
importance-weighted bound of Burda et al. 2016 (IWAE), a lower bound that tightens as k grows.

With labels it is the conditional VAE of Sohn et al. 2015 (M2's generative model without its classifier,
Kingma et al. 2014): p(x | y, z) p(z) with q(z | x, y), the one-hot label joining the encoder's head and
the decoder's input. log p(x | y) is the IWAE bound under q(z | x, y); log p(x) is the log-sum-exp over
classes of log p(y) + that bound, itself a stochastic lower bound (`class_bounds`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.binarized import binarize, density_offset, sample_half_cube
from lightning_modules.common.nets import ConvDecoder, ConvEncoder, mlp
from lightning_modules.contract import Conditional, GenerativeModel
from lightning_modules.vae.class_bounds import class_bounds, every_class

LOG_2PI = math.log(2 * math.pi)
# conditional bounds (`class_bounds`): pilot samples per class, how close to the best class's pilot
# log p(x, y) a class must come to get the full iwae_k, and the largest decoder batch (examples x samples)
PILOT_K = 4
PLAUSIBLE_NATS = 10.0
MAX_DECODER_ROWS = 2**14


def normal_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log N(x; mean, exp(log_scale)^2), elementwise."""
    return -0.5 * ((x - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI


class VAE(GenerativeModel):
    family = "vae"
    supports_fsdp = True
    log_prob_kind = "lower_bound"

    @dataclass
    class Config:
        max_epochs: int = 150
        seed: int = 0
        latent_dim: int = 16
        hidden: int = 256
        channels: int = 32
        arch: Literal["auto", "conv", "mlp", "linear"] = "auto"  # auto: conv for images, mlp otherwise
        likelihood: Literal["gaussian", "bernoulli"] = "gaussian"  # bernoulli: binarised data
        obs_scale: Literal["pixel", "shared"] = "pixel"  # gaussian noise scale: per dimension, or one for all
        min_log_scale: float = -4.0
        beta: float = 1.0
        lr: float = 2e-3
        iwae_k: int = 256
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c, shape, d = self.config, self.info.shape, self.info.dim
        arch = c.arch if c.arch != "auto" else ("conv" if self.info.kind == "image" else "mlp")
        z, k = c.latent_dim, self.num_classes or 0  # k one-hot label inputs (none when unconditional)
        # the encoder's last module reads [features, one-hot y] (`posterior`), the decoder [z, one-hot y]
        if arch == "conv":
            self.encoder = nn.Sequential(ConvEncoder(shape, c.hidden, c.channels), nn.SiLU(),
                                         nn.Linear(c.hidden + k, 2 * z))
            self.decoder = ConvDecoder(z + k, shape, shape[0], c.channels)
        elif arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp(d + k, c.hidden, 2 * z))
            self.decoder = nn.Sequential(mlp(z + k, c.hidden, d), nn.Unflatten(1, shape))
        else:  # linear: probabilistic PCA's model with an amortised Gaussian posterior
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d + k, 2 * z))
            self.decoder = nn.Sequential(nn.Linear(z + k, d), nn.Unflatten(1, shape))
        n_scales = d if c.obs_scale == "pixel" else 1
        self.log_scale = nn.Parameter(torch.full((n_scales,), -1.0))

    # --- model pieces -------------------------------------------------------------------------------
    def with_label(self, h: Tensor, y: Optional[Tensor]) -> Tensor:
        """[h, one-hot y] (h (N, F), y (N,)) for a conditional model, else h."""
        if not self.conditional:
            return h
        return torch.cat([h, F.one_hot(y, self.num_classes).to(h.dtype)], 1)

    def posterior(self, x: Tensor, y: Optional[Tensor] = None):
        """q(z | x) or q(z | x, y): mean and log-variance."""
        mu, log_var = self.encoder[-1](self.with_label(self.encoder[:-1](x), y)).chunk(2, dim=-1)
        return mu, log_var.clamp(-12, 8)

    def decode(self, z: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The decoder's output for p(x | z) or p(x | y, z); z (N, L)."""
        return self.decoder(self.with_label(z, y))

    def obs_log_prob(self, x: Tensor, out: Tensor) -> Tensor:
        """log p(x | z) summed over dimensions, for decoder output `out`; x in data space."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, binarize(x), reduction="none").flatten(1).sum(1) + density_offset(self.info.dim)
        return normal_log_prob(x.flatten(1), out.flatten(1), self._log_scale()).sum(1)

    def _log_scale(self) -> Tensor:
        return self.log_scale.clamp(min=self.config.min_log_scale)

    def elbo_terms(self, x: Tensor, y: Optional[Tensor] = None):
        mu, log_var = self.posterior(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        rec = self.obs_log_prob(x, self.decode(z, y))
        kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)  # KL(q(z|x) || N(0, I)), closed form
        return rec, kl

    # --- training -------------------------------------------------------------------------------------
    def labels_of(self, batch) -> Optional[Tensor]:
        """The batch's labels when the model is conditional, else None."""
        return batch[1] if self.conditional else None

    def training_step(self, batch, batch_idx):
        x = batch[0]
        rec, kl = self.elbo_terms(x, self.labels_of(batch))
        loss = -(rec - self.config.beta * kl).mean()
        self.log("train/loss", loss, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        self.log("train/kl", kl.mean(), on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        rec, kl = self.elbo_terms(x, self.labels_of(batch))
        self.log("val/loss", -(rec - kl).mean(), on_epoch=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    # --- the contract -----------------------------------------------------------------------------------
    def elbo(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.no_labels_unless_conditional(y)
        rec, kl = self.elbo_terms(x, y)
        return rec - kl

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None, k: Optional[int] = None) -> Tensor:
        """The IWAE bound on log p(x | y) (y given) or log p(x) (unconditional model); a conditional model
        without y: the log-sum-exp over classes of log p(y) + the bound."""
        self.no_labels_unless_conditional(y)
        if self.conditional and y is None:
            return torch.logsumexp(self.class_log_likelihoods(x, k) + self.class_log_prior().to(x), 1)
        return self.iwae(x, y, k or self.config.iwae_k)

    def iwae(self, x: Tensor, y: Optional[Tensor], k: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """log (1/k) sum_i p(x, z_i | y) / q(z_i | x, y), z_i ~ q(z | x, y) (Burda et al. 2016, eq. 8)."""
        mu, log_var = self.posterior(x, y)
        std = torch.exp(0.5 * log_var)
        eps = torch.randn((k,) + mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + eps * std  # (k, B, L)
        log_q = (-0.5 * eps**2 - 0.5 * log_var - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        out = self.decode(z.flatten(0, 1), None if y is None else y.repeat(k))
        log_lik = self.obs_log_prob(x.repeat((k,) + (1,) * (x.dim() - 1)), out).view(k, -1)
        return torch.logsumexp(log_lik + log_prior - log_q, dim=0) - math.log(k)

    def class_log_likelihoods(self, x: Tensor, k: Optional[int] = None) -> Tensor:
        """IWAE bounds on log p(x | c) for every class c, (B, K): the full k for the classes that carry
        p(x)'s mass, a PILOT_K-sample bound for the others (`class_bounds`)."""
        self._require_conditional()
        return class_bounds(self.iwae, x, self.class_log_prior(), k or self.config.iwae_k, PILOT_K, PLAUSIBLE_NATS,
                            MAX_DECODER_ROWS)

    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        """Ancestral samples x ~ p(x | z) (or p(x | y, z)), z ~ N(0, I), in data space (images clipped to
        [0, 1]); a conditional model samples the classes `y` (None: y ~ p(y))."""
        self.no_labels_unless_conditional(y)
        y = self.sample_labels(n, y) if self.conditional else None
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        out = self.decode(z, y)
        if self.config.likelihood == "bernoulli":
            return sample_half_cube(torch.bernoulli(torch.sigmoid(out)))
        noise = torch.randn_like(out.flatten(1)) * self._log_scale().exp()
        return self.to_data_space((out.flatten(1) + noise).view(out.shape))

    def encode(self, x: Tensor) -> Tensor:
        """The mean of q(z | x). A conditional model's z leaves the class to y, so its representation is
        [p(y | x), mean of q(z | x, y) at the most likely y], p(y | x) from one-sample bounds per class drawn
        with a fixed seed (deterministic, and K decoder rows per example)."""
        if not self.conditional:
            return self.posterior(x)[0]
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        joint = every_class(self.iwae, x, self.num_classes, 1, MAX_DECODER_ROWS, g) + self.class_log_prior().to(x)
        return torch.cat([joint.softmax(1), self.posterior(x, joint.argmax(1))[0]], 1)
