"""The diffusion family: a variance-preserving diffusion in continuous time with the cosine schedule (Ho et al.
2020; Nichol & Dhariwal 2021), trained by denoising score matching with eps-prediction.

- Data: images in [0, 1] are mapped to [-1, 1] (x' = 2x - 1, a Jacobian of D log 2); vectors are standardised
  by the training set's per-feature mean and standard deviation (their Jacobian too).
- Loss: E ||eps - eps_hat(alpha x + sigma eps, lambda)||^2 / D with the log-SNR lambda drawn from
  `loss_weighting`: `elbo` (lambda uniform: the weighting of the likelihood bound, Kingma et al. 2021),
  `cosine` (t uniform: DDPM's "simple" loss, best for samples), or `mixed` (half the batch each, the default: the
  bound needs the high-SNR end the cosine weighting neglects, the samples need the middle).
- An exponential moving average of the weights (`ema_decay`) is the model that samples and is scored.
- P(X, Y): the denoiser takes the class, or "no label" with probability `label_dropout` in training, so one
  network is both p(x | y) and p(x); sampling with guidance w uses (1 + w) eps(z, y) - w eps(z)
  (classifier-free guidance, Ho & Salimans 2022). w = 0 is the plain conditional model, w = -1 the unconditional
  one, w > 0 trades diversity (recall) for fidelity (precision).
- `log_prob`: minus the continuous-time variational bound (VDM, see `bound`), an unbiased Monte Carlo estimate
  from `bound_samples` stratified log-SNR draws per example (`log_prob_kind = "lower_bound"`). For a model of
  P(X, Y) every class is scored at the same draws (common random numbers), so log p(x | y) differences, and
  with them p(y | x), are not swamped by the draws' noise.
- `anomaly_score`: minus the bound of the unconditional model (the "no label" input).
- `encode`: the unconditional denoiser's bottleneck features of the clean input at a fixed noise level, for the
  probes; `ddim_latent` / `decode`: the deterministic DDIM latent at t = 1 (the probability-flow ODE) and back.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.ema import ema_decay_at, ema_update_
from lightning_modules.common.nets import evaluating
from lightning_modules.contract import UNLABELLED, Conditional, GenerativeModel, out_of_range, require, require_range
from lightning_modules.diffusion import samplers
from lightning_modules.diffusion.bound import diffusion_term_at, endpoint_terms
from lightning_modules.diffusion.denoisers import ResidualMLP, UNet
from lightning_modules.diffusion.schedule import CosineSchedule


class Diffusion(GenerativeModel):
    semi_supervised_method = ("unlabelled examples train the \"no label\" denoiser; a classifier on its bottleneck "
                              "features is trained jointly on the labelled ones")
    family = "diffusion"
    log_prob_kind = "lower_bound"
    needs_init_data = True  # vectors are standardised by the training set's statistics

    @dataclass
    class Config:
        max_epochs: int = 200
        seed: int = 0
        lr: float = 2e-3
        warmup_steps: int = 200  # linear warm-up, then cosine decay to 0 over the run
        ema_decay: float = 0.999
        channels: int = 32  # images: U-Net channels at full resolution (doubling per halving)
        width: int = 256  # vectors: residual MLP width
        blocks: int = 4  # vectors: residual blocks
        dropout: float = 0.1
        loss_weighting: Literal["mixed", "elbo", "cosine"] = "mixed"
        log_snr_max: float = 10.0  # t = 0
        log_snr_min: float = -10.0  # t = 1
        label_dropout: float = 0.1  # P(X, Y): probability of training a labelled example as unlabelled
        guidance: float = 0.0  # classifier-free guidance scale w of `sample`
        # scored by the evaluate stage; w = -1 is the unconditional model, 0 the conditional one
        guidance_sweep: List[float] = field(default_factory=lambda: [0.0, 0.25, 1.0])
        sampler: Literal["ddpm", "ddim"] = "ddpm"
        sample_steps: int = 100
        encode_log_snr: float = 4.0  # the noise level at which `encode` reads the denoiser's bottleneck
        latent_steps: int = 100  # Heun steps (2 network calls each) of `ddim_latent` and `decode`
        bound_samples: int = 16  # Monte Carlo draws per example of the likelihood bound
        # semi-supervised (some training labels hidden): weight of the labelled examples' cross-entropy of the
        # classifier on the denoiser's bottleneck features, which then is `classify`
        classifier_weight: float = 1.0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

        def __post_init__(self):
            require_range(self, "ema_decay", "label_dropout", "dropout", low=0, high=1, high_open=True)
            require_range(self, "log_snr_max", "log_snr_min", "encode_log_snr")  # finite
            require(self.log_snr_max > self.log_snr_min, "log_snr_max",
                    f"must exceed log_snr_min ({self.log_snr_min}), not {self.log_snr_max}")
            require_range(self, "sample_steps", "latent_steps", "bound_samples", "channels", "width", "blocks", low=1)
            require_range(self, "lr", low=0, low_open=True)
            require_range(self, "warmup_steps", "classifier_weight", low=0)
            require_range(self, "guidance", low=-1)  # -1: the unconditional model
            require(all(out_of_range(w, low=-1) is None for w in self.guidance_sweep), "guidance_sweep",
                    f"every scale must be >= -1, not {list(self.guidance_sweep)}")

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        self.schedule = CosineSchedule(c.log_snr_max, c.log_snr_min)
        log_snr_range = (c.log_snr_min, c.log_snr_max)
        with torch.random.fork_rng(devices=[]):  # initial weights depend on the seed only
            torch.manual_seed(c.seed)
            if self.info.kind == "image":
                self.denoiser = UNet(self.info.shape, c.channels, self.num_classes, log_snr_range, c.dropout)
            elif self.info.kind == "vector":
                self.denoiser = ResidualMLP(self.info.dim, c.width, c.blocks, self.num_classes, log_snr_range,
                                            c.dropout)
            else:
                raise ValueError(f"diffusion: no denoiser for {self.info.kind} data (images and vectors only)")
            # semi-supervised: p(y | x) from the bottleneck features `encode` reads (drawn after the denoiser, so
            # its initial weights do not move; trained only when labels are hidden)
            self.classifier = nn.Linear(self._feature_dim(), self.num_classes) if self.conditional else None
        # frozen (not optimised): DDP expects no gradients for it; the checkpoint keeps it
        self.denoiser_ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.classifier_ema = copy.deepcopy(self.classifier).requires_grad_(False) if self.conditional else None
        # vectors: x' = (x - shift) / scale from the training data; images: fixed [0, 1] -> [-1, 1]
        d = self.info.dim
        image = self.info.kind == "image"
        self.register_buffer("shift", torch.full((d,), 0.5 if image else 0.0))
        self.register_buffer("scale", torch.full((d,), 0.5 if image else 1.0))

    def _feature_dim(self) -> int:
        with torch.no_grad(), evaluating(self.denoiser):
            z = torch.zeros((1, *self.info.shape))
            return self.denoiser.bottleneck(z, torch.zeros(1), None).shape[1]

    # --- data <-> model space -----------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.info.kind == "vector" and self.global_step == 0:
            x = self.init_data().flatten(1).double()
            self.shift.copy_(x.mean(0).float())
            self.scale.copy_(x.std(0).clamp_min(1e-6).float())

    def _to_model(self, x: Tensor) -> Tensor:
        return ((x.flatten(1) - self.shift) / self.scale).view(x.shape)

    def _from_model(self, z: Tensor) -> Tensor:
        return (z.flatten(1) * self.scale + self.shift).view(z.shape)

    def _log_det(self) -> Tensor:
        """log |dx' / dx| = -sum log scale: log p(x) = log p(x') + this."""
        return -self.scale.double().log().sum()

    # --- the noise predictor, with guidance ----------------------------------------------------
    def _noise_fn(self, y: Optional[Tensor], guidance: float = 0.0):
        """eps_hat(z, lambda) of the averaged network for labels y (None: unconditional) at guidance scale w."""
        net = self.denoiser_ema
        if y is None or guidance == 0:
            return lambda z, lam: net(z, lam, y)
        if guidance == -1:  # (1 + w) eps(z, y) - w eps(z) at w = -1: the unconditional model
            return lambda z, lam: net(z, lam, None)
        null = torch.full_like(y, self.num_classes)

        def guided(z: Tensor, lam: Tensor) -> Tensor:
            cond, uncond = net(torch.cat([z, z]), torch.cat([lam, lam]), torch.cat([y, null])).chunk(2)
            return cond + guidance * (cond - uncond)  # (1 + w) eps(z, y) - w eps(z)

        return guided

    # --- the contract ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None, guidance: Optional[float] = None) -> Tensor:
        """n samples; a conditional model draws the requested classes (None: y ~ p(y)) with guidance scale
        `guidance` (None: the configured `guidance`)."""
        self.no_labels_unless_conditional(y)
        c = self.config
        y = self.sample_labels(n, y) if self.conditional else None
        w = c.guidance if guidance is None else guidance
        z = torch.randn((n, *self.info.shape), device=self.device)
        clip = 1.0 if self.info.kind == "image" else None
        with evaluating(self.denoiser_ema):
            eps_fn = self._noise_fn(y, w)
            if c.sampler == "ddim":
                x = samplers.ddim(eps_fn, z, self.schedule, c.sample_steps, clip)
            else:
                x = samplers.ddpm(eps_fn, z, self.schedule, c.sample_steps, clip)
        return self.to_data_space(self._from_model(x))

    def sample_sweep(self) -> Dict[str, dict]:
        """One setting per guidance scale of `guidance_sweep` (the configured `guidance` itself: {}, the default
        samples); none for an unconditional model."""
        if not self.conditional:
            return {}
        return {f"w{w:g}": ({} if w == self.config.guidance else {"guidance": float(w)})
                for w in self.config.guidance_sweep}

    def _bound_draws(self, x: Tensor, k: int):
        """k stratified draws per example: lambda_j = lo + range * ((u + j) / k mod 1), each uniform on the range,
        and eps_j ~ N(0, I). Shapes (k, B) and (k, *x.shape)."""
        u = torch.rand(len(x), device=x.device, dtype=x.dtype)
        frac = (u[None] + torch.arange(k, device=x.device, dtype=x.dtype)[:, None] / k) % 1.0
        lam = self.schedule.log_snr_min + (self.schedule.log_snr_max - self.schedule.log_snr_min) * frac
        return lam, torch.randn((k, *x.shape), device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def _bounds(self, x: Tensor, labels: List[Optional[Tensor]], draws: Optional[int] = None) -> Tensor:
        """log p(x | y) >= -(bound) for each label tensor in `labels` (None: unconditional), at shared draws
        (`bound_samples` unless given): (B, len(labels)) in data space."""
        z0 = self._to_model(x)
        lam, eps = self._bound_draws(z0, draws or self.config.bound_samples)
        out = []
        with evaluating(self.denoiser_ema):
            for y in labels:
                fn = self._noise_fn(y)
                term = torch.stack([diffusion_term_at(z0, fn, self.schedule, lam[k], eps[k]) for k in range(len(lam))])
                out.append(-(endpoint_terms(z0.double(), self.schedule) + term.mean(0)))
        return torch.stack(out, 1) + self._log_det()

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.no_labels_unless_conditional(y)
        if self.conditional and y is None:
            return self.marginal_log_prob(x)
        return self._bounds(x, [y])[:, 0]

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        self._require_conditional()
        classes = [torch.full((len(x),), c, dtype=torch.long, device=x.device) for c in range(self.num_classes)]
        return self._bounds(x, classes)

    def anomaly_score(self, x: Tensor) -> Tensor:
        """-log p(x) by the bound of the same network without a label (the unconditional model that label dropout
        trains): one bound per example instead of one per class."""
        return -self._bounds(x, [None])[:, 0]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """The representation for probes: the unconditional denoiser's bottleneck features at log-SNR
        `encode_log_snr`, fed the clean input alpha x (deterministic; on digits a linear probe on them scores
        0.986-0.989 for log-SNR 4 to 8, against 0.80 on the DDIM latent, which keeps every pixel's detail)."""
        with evaluating(self.denoiser_ema):
            return self._features(self.denoiser_ema, x)

    def _features(self, net: nn.Module, x: Tensor) -> Tensor:
        lam = torch.full((len(x),), self.config.encode_log_snr, device=x.device, dtype=x.dtype)
        return net.bottleneck(torch.sigmoid(lam[0]).sqrt() * self._to_model(x), lam, None)

    def classify(self, x: Tensor) -> Tensor:
        """log p(y | x): trained semi-supervised, the classifier on the bottleneck features (its labelled
        cross-entropy trained them jointly with the denoiser); else Bayes' rule over the class-conditional bounds."""
        if not self.semi_supervised:
            return super().classify(x)
        with torch.no_grad(), evaluating(self.classifier_ema):
            return torch.log_softmax(self.classifier_ema(self.encode(x)).double(), 1)

    @torch.no_grad()
    def ddim_latent(self, x: Tensor) -> Tensor:
        """The deterministic DDIM latent at t = 1: the probability-flow ODE solved from the data upwards with
        `latent_steps` Heun steps (unconditional)."""
        with evaluating(self.denoiser_ema):
            latent = samplers.encode(self._noise_fn(None), self._to_model(x), self.schedule, self.config.latent_steps)
        return latent.flatten(1)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """The inverse of `ddim_latent`: the probability-flow ODE from the latent back to data."""
        with evaluating(self.denoiser_ema):
            z = samplers.decode(self._noise_fn(None), latent.view(-1, *self.info.shape), self.schedule,
                                self.config.latent_steps)
        return self._from_model(z)

    # --- training -------------------------------------------------------------------------------
    def _training_log_snr(self, n: int) -> Tensor:
        lo, hi = self.schedule.log_snr_min, self.schedule.log_snr_max
        uniform = lo + (hi - lo) * torch.rand(n, device=self.device)
        cosine = self.schedule.log_snr(torch.rand(n, device=self.device))
        weighting = self.config.loss_weighting
        if weighting == "elbo":
            return uniform
        if weighting == "cosine":
            return cosine
        return torch.where(torch.arange(n, device=self.device) % 2 == 0, uniform, cosine)

    def _dropped_labels(self, y: Optional[Tensor]) -> Optional[Tensor]:
        """The denoiser's class input: "no label" with probability `label_dropout`, and always for an UNLABELLED
        example of a semi-supervised split, which so trains the unconditional denoiser that guidance and the
        conditional bounds share (the class-conditional one learns from the labelled examples alone)."""
        if y is None:
            return None
        drop = (torch.rand(len(y), device=y.device) < self.config.label_dropout) | (y == UNLABELLED)
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], (batch[1] if self.conditional else None)
        z0 = self._to_model(x)
        lam = self._training_log_snr(len(x))
        eps = torch.randn_like(z0)
        shape = (-1,) + (1,) * (z0.dim() - 1)
        alpha, sigma = torch.sigmoid(lam).sqrt().view(shape), torch.sigmoid(-lam).sqrt().view(shape)
        pred = self.denoiser(alpha * z0 + sigma * eps, lam, self._dropped_labels(y))
        loss = ((eps - pred) ** 2).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))
        if self.semi_supervised and self.config.classifier_weight > 0:
            loss = loss + self.config.classifier_weight * self._labelled_cross_entropy(x, y)
        return loss

    def _labelled_cross_entropy(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the feature classifier over the batch's labelled examples (0 if it has none),
        the labelled term of semi-supervised training; its gradient shapes the denoiser's features too."""
        seen = y != UNLABELLED
        if not bool(seen.any()):  # still touch every classifier weight: DDP expects a gradient for each
            return sum(p.sum() for p in self.classifier.parameters()) * 0.0
        logits = self.classifier(self._features(self.denoiser, x[seen]))
        ce = F.cross_entropy(logits, y[seen])
        self.log("train/classifier_ce", ce, on_step=False, on_epoch=True, sync_dist=True, batch_size=int(seen.sum()))
        return ce

    def setup(self, stage: str) -> None:
        # the feature classifier trains only on a semi-supervised split (`set_class_prior` has run by now); frozen
        # otherwise, so DDP finds no parameter without a gradient
        if self.classifier is not None:
            self.classifier.requires_grad_(self.semi_supervised)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = ema_decay_at(self.config.ema_decay, self.global_step)
        ema_update_(self.denoiser_ema, self.denoiser, decay)
        if self.classifier is not None:
            ema_update_(self.classifier_ema, self.classifier, decay)

    def validation_step(self, batch, batch_idx):
        """val/loss: the likelihood bound of the averaged model, -log p(x | y) with labels, in nats per example
        (one draw per example: unbiased, and cheap enough for every epoch)."""
        x, y = batch[0], (batch[1] if self.conditional else None)
        bound = -self._bounds(x, [y], draws=1)[:, 0]
        self.log("val/loss", bound.mean().float(), on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self):
        """Adam; the learning rate rises linearly over `warmup_steps`, then follows a cosine to 0 at the end."""
        c = self.config
        params = [p for p in self.parameters() if p.requires_grad]  # the denoiser, and the classifier if it trains
        opt = torch.optim.Adam(params, lr=c.lr)
        total = self.trainer.estimated_stepping_batches
        total = None if math.isinf(total) else max(1, int(total))

        def factor(step: int) -> float:
            if step < c.warmup_steps:
                return (step + 1) / c.warmup_steps
            if total is None:
                return 1.0
            progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
