"""Variational autoencoder (Kingma & Welling 2014) trained on the (beta-)ELBO; `log_prob` is the
importance-weighted bound of Burda et al. 2016 (IWAE), a lower bound that tightens as k grows."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.binarized import binarize, density_offset, sample_half_cube
from lightning_modules.common.nets import ConvDecoder, ConvEncoder, mlp
from lightning_modules.contract import Conditional, GenerativeModel

LOG_2PI = math.log(2 * math.pi)


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
        z = c.latent_dim
        if arch == "conv":
            self.encoder = nn.Sequential(ConvEncoder(shape, c.hidden, c.channels), nn.SiLU(), nn.Linear(c.hidden, 2 * z))
            self.decoder = ConvDecoder(z, shape, shape[0], c.channels)
        elif arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp(d, c.hidden, 2 * z))
            self.decoder = nn.Sequential(mlp(z, c.hidden, d), nn.Unflatten(1, shape))
        else:  # linear: probabilistic PCA's model with an amortised Gaussian posterior
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, 2 * z))
            self.decoder = nn.Sequential(nn.Linear(z, d), nn.Unflatten(1, shape))
        n_scales = d if c.obs_scale == "pixel" else 1
        self.log_scale = nn.Parameter(torch.full((n_scales,), -1.0))

    # --- model pieces -------------------------------------------------------------------------------
    def posterior(self, x: Tensor):
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return mu, log_var.clamp(-12, 8)

    def obs_log_prob(self, x: Tensor, out: Tensor) -> Tensor:
        """log p(x | z) summed over dimensions, for decoder output `out`; x in data space."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, binarize(x), reduction="none").flatten(1).sum(1) + density_offset(self.info.dim)
        return normal_log_prob(x.flatten(1), out.flatten(1), self._log_scale()).sum(1)

    def _log_scale(self) -> Tensor:
        return self.log_scale.clamp(min=self.config.min_log_scale)

    def elbo_terms(self, x: Tensor):
        mu, log_var = self.posterior(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        rec = self.obs_log_prob(x, self.decoder(z))
        kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)  # KL(q(z|x) || N(0, I)), closed form
        return rec, kl

    # --- training -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x = batch[0]
        rec, kl = self.elbo_terms(x)
        loss = -(rec - self.config.beta * kl).mean()
        self.log("train/loss", loss, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        self.log("train/kl", kl.mean(), on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        rec, kl = self.elbo_terms(x)
        self.log("val/loss", -(rec - kl).mean(), on_epoch=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    # --- the contract -----------------------------------------------------------------------------------
    def elbo(self, x: Tensor) -> Tensor:
        rec, kl = self.elbo_terms(x)
        return rec - kl

    def log_prob(self, x: Tensor, k: int | None = None) -> Tensor:
        """IWAE bound: log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x) (Burda et al. 2016, eq. 8)."""
        k = k or self.config.iwae_k
        mu, log_var = self.posterior(x)
        std = torch.exp(0.5 * log_var)
        eps = torch.randn((k,) + mu.shape, device=mu.device, dtype=mu.dtype)
        z = mu + eps * std  # (k, B, L)
        log_q = (-0.5 * eps**2 - 0.5 * log_var - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        out = self.decoder(z.flatten(0, 1))
        log_lik = self.obs_log_prob(x.repeat((k,) + (1,) * (x.dim() - 1)), out).view(k, -1)
        return torch.logsumexp(log_lik + log_prior - log_q, dim=0) - math.log(k)

    def sample(self, n: int) -> Tensor:
        """Ancestral samples x ~ p(x | z), z ~ N(0, I), in data space (images clipped to [0, 1])."""
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        out = self.decoder(z)
        if self.config.likelihood == "bernoulli":
            return sample_half_cube(torch.bernoulli(torch.sigmoid(out)))
        noise = torch.randn_like(out.flatten(1)) * self._log_scale().exp()
        return self.to_data_space((out.flatten(1) + noise).view(out.shape))

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]
