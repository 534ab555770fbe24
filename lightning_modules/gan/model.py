"""The GAN family: a generator / discriminator pair trained adversarially with manual optimisation.

- Losses: non-saturating (Goodfellow et al. 2014) or hinge (Lim & Ye 2017), see `gan_losses`.
- Two time-scale update rule (Heusel et al. 2017): G and D have their own Adam learning rates and betas,
  and D takes `n_critic` steps per G step (each D step on a fresh real batch, as in WGAN-GP).
- Optional spectral norm on D (Miyato et al. 2018) and an exponential moving average of G's weights used
  for sampling (Karras et al. 2018; Yazici et al. 2019, "The unusual effectiveness of averaging in GAN
  training"); `ema_decay: 0` disables it.

A GAN has no likelihood (`log_prob_kind = None`); `encode` gives D's penultimate features and the anomaly
score is -D(x). The kept checkpoint is the one with the best validation FID, measured every
`fid_every_n_epochs` epochs (`sample_quality_every_n_epochs` in the contract).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from lightning_modules.contract import Conditional, GenerativeModel, require
from lightning_modules.gan.losses import gan_loss
from lightning_modules.gan.nets import build_pair


@torch.no_grad()
def ema_update_(average: nn.Module, current: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * current, parameter by parameter; buffers (BatchNorm
    running statistics) are copied, so the averaged generator normalises like the current one."""
    for a, c in zip(average.parameters(), current.parameters()):
        a.lerp_(c, 1.0 - decay)
    for a, c in zip(average.buffers(), current.buffers()):
        a.copy_(c)


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at generator step `step` (1-based): min(decay, (1 + t) / (10 + t)), the warm-up of
    TensorFlow's ExponentialMovingAverage(num_updates). Without it a decay of 0.999 over a few hundred steps
    would keep the average mostly at the random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step))


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode inside the block, the previous mode restored after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class GAN(GenerativeModel):
    family = "gan"
    log_prob_kind = None

    @dataclass
    class Config:
        max_epochs: int = 200
        seed: int = 0
        loss: Literal["hinge", "nonsaturating"] = "hinge"
        latent_dim: int = 32
        width: int = 32  # images: channels at full resolution (doubling per halving); vectors: hidden units
        mlp_layers: int = 3  # vectors only: hidden layers of the MLP pair
        spectral_norm: bool = True  # on every layer of D
        lr_g: float = 2e-4
        lr_d: float = 4e-4
        beta1_g: float = 0.5
        beta2_g: float = 0.999
        beta1_d: float = 0.5
        beta2_d: float = 0.999
        n_critic: int = 1  # D steps per G step
        ema_decay: float = 0.999  # 0: sample from G itself; ~1/(1-decay) G steps averaged
        fid_every_n_epochs: int = 5  # validation FID this often; the best-FID checkpoint is the model
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

        def __post_init__(self):
            require(self.n_critic >= 1, "n_critic", f"must be >= 1, not {self.n_critic}")
            require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), not {self.ema_decay}")
            require(self.fid_every_n_epochs >= 1, "fid_every_n_epochs", f"must be >= 1, not {self.fid_every_n_epochs}")

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        self.automatic_optimization = False
        self.loss = gan_loss(self.config.loss)
        with torch.random.fork_rng():  # initial weights depend on cfg.seed only
            torch.manual_seed(self.config.seed)
            self.generator, self.discriminator = build_pair(
                self.info, self.config.latent_dim, self.config.width, self.config.mlp_layers, self.config.spectral_norm)
        # Not a parameter of any optimiser: frozen, so DDP does not expect gradients for it.
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if self.config.ema_decay > 0 else None
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))  # survives checkpoints
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))

    # --- the contract -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        generator = self.generator_ema if self.generator_ema is not None else self.generator
        with evaluating(generator):
            return generator(self.noise(n))

    def encode(self, x: Tensor) -> Tensor:
        return self.discriminator.features(x)

    def sample_quality_every_n_epochs(self) -> Optional[int]:
        return self.config.fid_every_n_epochs

    def anomaly_score(self, x: Tensor) -> Tensor:
        return -self.discriminator(x)

    # --- training -------------------------------------------------------------------------------
    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.config.latent_dim, generator=generator).to(self.device)

    def configure_optimizers(self):
        adam = lambda params, lr, b1, b2: torch.optim.Adam(params, lr=lr, betas=(b1, b2))  # noqa: E731
        c = self.config
        return [adam(self.generator.parameters(), c.lr_g, c.beta1_g, c.beta2_g),
                adam(self.discriminator.parameters(), c.lr_d, c.beta1_d, c.beta2_d)]

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        # D has no BatchNorm, so one forward pass over both halves equals two separate ones
        logits = self.discriminator(torch.cat([real, fake]))
        return self.loss.discriminator(logits[: len(real)], logits[len(real):])

    def _optimizer_step(self, optimizer, loss: Tensor) -> Tensor:
        """One step of `optimizer` on `loss`. Its zero_grad also drops the gradients the other player's last
        step left on these parameters.

        Both players' losses are backpropagated through both networks (D's fakes are not detached), so every
        parameter gets a gradient in every backward pass and plain DDP (find_unused_parameters=False) works;
        toggle_optimizer would freeze the other network and leave DDP waiting for its gradients."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        opt_g, opt_d = self.optimizers()
        log = dict(on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))

        loss_d = self._optimizer_step(opt_d, self.discriminator_loss(x, self.generator(self.noise(len(x)))))
        self.d_steps += 1
        # train/loss is D's loss, the same quantity as val/loss: their gap shows D overfitting
        self.log("train/loss_d", loss_d, **log)
        self.log("train/loss", loss_d, **log)

        if int(self.d_steps) % self.config.n_critic == 0:
            loss_g = self._optimizer_step(opt_g, self.loss.generator(self.discriminator(self.generator(self.noise(len(x))))))
            self.log("train/loss_g", loss_g, **log)
            if self.generator_ema is not None:
                self.g_steps += 1
                ema_update_(self.generator_ema, self.generator, ema_decay_at(self.config.ema_decay, int(self.g_steps)))

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        g = torch.Generator().manual_seed(self.config.seed + batch_idx)  # the same fakes every validation
        loss = self.discriminator_loss(x, self.generator(self.noise(len(x), g)))
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(x))
