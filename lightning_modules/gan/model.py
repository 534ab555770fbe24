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

Conditional (P(X, Y), labelled data): G(z, y) and the projection discriminator D(x, y) of Miyato & Koyama
2018 (see `nets`). D sees the real pairs (x, y) of the batch and fakes G(z, y') with y' ~ p(y), the
training labels' frequencies; G is trained on fresh (z, y') the same way. It still has no likelihood, so
it cannot classify (`can_classify` is False). The anomaly score is -max_y D(x, y): how real x looks as
the class it most resembles (a real digit scores high for its own class, so a label-agnostic score
should not penalise it for the others); `encode` stays phi(x), which does not depend on y.

Semi-supervised (`objective`; `auto`: when the training labels have UNLABELLED entries): the (K+1)-class
discriminator of Salimans et al. 2016 ("Improved techniques for training GANs", section 5), see `losses`.
The projection discriminator's D(x, y) for every y serve as the K class logits l_y, so no parameter is
added; the fake class's logit is fixed at 0, D(x) = Z / (Z + 1) with Z = sum_y exp l_y. D minimises the
cross-entropy of the batch's labelled examples (their mean: the stand-in for the paper's separate
labelled minibatch) + -log D(x) on every real example + -log(1 - D(G(z, y))) on the fakes; `classify`
is log softmax_y l_y(x), so such a model classifies. G minimises feature matching on phi (section 3.1)
plus, to keep `sample(n, y)` drawing class y, feature matching per class (`g_class_fm`): E[phi(x) | y],
the real side weighted by D's p(y | x) (one-hot where the label is known), against E[phi(G(z, y)) | y].
The AC-GAN-like alternative, D's cross-entropy on (G(z, y), y) (`g_class_weight`), asks for fakes D
classifies easily and cost accuracy on digits with 10 labels per class (0.889 against 0.925 without it,
seed 0, 200 epochs); feature matching per class kept it (0.930) with 96% of the samples of the class
asked for (an RBF SVM trained on every real label judging).

`objective: auto` resolves in `set_class_prior` (UNLABELLED among the training labels) or at the first
training batch that has some, and is kept in the buffer `k_plus_one`: fully labelled training runs the
projection objective exactly as before.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.ema import ema_decay_at, ema_update_
from lightning_modules.common.nets import evaluating
from lightning_modules.contract import (UNLABELLED, Conditional, ConfigError, GenerativeModel,
                                        TrainingDiverged, require_range)
from lightning_modules.gan.losses import (class_feature_matching, class_responsibilities, feature_matching, gan_loss,
                                          k_plus_one_discriminator)
from lightning_modules.gan.nets import build_pair


class GAN(GenerativeModel):
    semi_supervised_method = ("(K+1)-class discriminator with feature matching (Salimans et al. 2016), per-class "
                              "feature matching for the conditional generator")
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
        # conditional: the projection GAN, the semi-supervised (K+1)-class one, or (auto) the latter when
        # some training labels are UNLABELLED
        objective: Literal["auto", "projection", "k_plus_one"] = "auto"
        g_class_fm: float = 1.0  # (K+1): weight of G's per-class feature matching (keeps G(z, y) of class y)
        g_class_weight: float = 0.0  # (K+1): weight of D's cross-entropy on (G(z, y), y) in G's loss
        # divergence (`collapse_epochs` epochs in a row ends training FAILED; 0: never): D won outright, its
        # epoch-mean loss below `collapse_d_loss` (adversarial objectives: the (K+1) one's G does not try to
        # fool D), or mode collapse, G's samples spread across the batch below `collapse_std` x the data's
        collapse_epochs: int = 10
        collapse_d_loss: float = 0.01
        collapse_std: float = 0.001

        def __post_init__(self):
            require_range(self, "latent_dim", "width", "mlp_layers", low=1)
            require_range(self, "lr_g", "lr_d", low=0, low_open=True)
            require_range(self, "beta1_g", "beta2_g", "beta1_d", "beta2_d", low=0, high=1, high_open=True)  # Adam's
            require_range(self, "n_critic", "fid_every_n_epochs", low=1)
            require_range(self, "ema_decay", low=0, high=1, high_open=True)  # 0: sample from G itself
            require_range(self, "g_class_fm", "g_class_weight", low=0)
            require_range(self, "collapse_epochs", "collapse_d_loss", "collapse_std", low=0)  # 0 epochs: never

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        self.automatic_optimization = False
        self.loss = gan_loss(self.config.loss)
        with torch.random.fork_rng():  # initial weights depend on cfg.seed only
            torch.manual_seed(self.config.seed)
            self.generator, self.discriminator = build_pair(
                self.info, self.config.latent_dim, self.config.width, self.config.mlp_layers, self.config.spectral_norm,
                self.num_classes)
        # Not a parameter of any optimiser: frozen, so DDP does not expect gradients for it.
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if self.config.ema_decay > 0 else None
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))  # survives checkpoints
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))
        if self.conditional:  # the objective in use: a buffer, so the checkpoint keeps what `auto` chose
            self.register_buffer("k_plus_one", torch.tensor(self.config.objective == "k_plus_one"))
        elif self.config.objective == "k_plus_one":
            raise ConfigError("objective", "k_plus_one needs a conditional model (labelled data)")
        self._epoch_stats: Optional[Tensor] = None  # this epoch's (sum of D loss, fake spread, real spread, batches)
        self.collapse_streak = {"d_won": 0, "mode_collapse": 0}  # epochs in a row; kept in checkpoints

    # --- the contract -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        self.no_labels_unless_conditional(y)
        labels = self.sample_labels(n, y) if self.conditional else None
        generator = self.generator_ema if self.generator_ema is not None else self.generator
        with evaluating(generator):
            return self.generate(generator, self.noise(n), labels)

    def encode(self, x: Tensor) -> Tensor:
        return self.discriminator.features(x)

    def sample_quality_every_n_epochs(self) -> Optional[int]:
        return self.config.fid_every_n_epochs

    def selects_on_sample_quality(self) -> bool:
        """The (K+1) discriminator is a classifier trained beside G with feature matching, which trades
        sample quality for accuracy (Salimans et al. 2016, section 5): its best-FID epoch is not its best
        classifier (digits, 10 labels per class: 0.900 at the best-FID epoch 110 of 200, 0.939 at the end),
        so the last checkpoint is the model."""
        return not self.can_classify()

    def can_classify(self) -> bool:
        """True for the (K+1)-class discriminator, whose K class logits give p(y | x)."""
        return self.conditional and bool(self.k_plus_one)

    def classify(self, x: Tensor) -> Tensor:
        """log p(y | x) = log softmax_y l_y(x) from D's class logits (Salimans et al. 2016, section 5)."""
        if not self.can_classify():
            raise NotImplementedError("a GAN classifies only when trained with the k_plus_one objective")
        with evaluating(self.discriminator):
            return torch.log_softmax(self.discriminator.class_logits(x), 1)

    def set_class_prior(self, y: Tensor) -> None:
        """The contract's prior from the labelled entries; `objective: auto` becomes k_plus_one here when
        some training label is UNLABELLED, else projection."""
        super().set_class_prior(y)
        self.resolve_objective(bool((torch.as_tensor(y) == UNLABELLED).any()), reset=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["genzoo_gan_collapse_streak"] = dict(self.collapse_streak)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.conditional:  # a checkpoint from before the (K+1) objective trained the projection one
            checkpoint["state_dict"].setdefault("k_plus_one", torch.tensor(False))
        self.collapse_streak.update(checkpoint.get("genzoo_gan_collapse_streak", {}))

    def anomaly_score(self, x: Tensor) -> Tensor:
        if self.conditional and bool(self.k_plus_one):  # -logit of D(x) = Z / (Z + 1): -log Z
            return -torch.logsumexp(self.discriminator.class_logits(x), 1)
        if self.conditional:
            return -self.discriminator.class_logits(x).max(1).values
        return -self.discriminator(x)

    # --- training -------------------------------------------------------------------------------
    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.config.latent_dim, generator=generator).to(self.device)

    def fake_labels(self, n: int, generator: torch.Generator | None = None) -> Optional[Tensor]:
        """Classes for n fakes, y ~ p(y) (`generator`: a seeded draw); None for an unconditional model."""
        if not self.conditional:
            return None
        if generator is None:
            return self.sample_labels(n)
        prior = self.class_log_prior().exp().float().cpu()
        return torch.multinomial(prior, n, replacement=True, generator=generator).to(self.device)

    @staticmethod
    def generate(generator: nn.Module, z: Tensor, y: Optional[Tensor]) -> Tensor:
        return generator(z) if y is None else generator(z, y)

    def critic(self, x: Tensor, y: Optional[Tensor]) -> Tensor:
        """D(x), or D(x, y) for a conditional model."""
        return self.discriminator(x) if y is None else self.discriminator(x, y)

    def fakes(self, n: int, generator: torch.Generator | None = None):
        """(G(z, y), y) for n fresh draws of z (and y ~ p(y); y is None when unconditional), from the trained G."""
        y = self.fake_labels(n, generator)
        return self.generate(self.generator, self.noise(n, generator), y), y

    def configure_optimizers(self):
        adam = lambda params, lr, b1, b2: torch.optim.Adam(params, lr=lr, betas=(b1, b2))  # noqa: E731
        c = self.config
        return [adam(self.generator.parameters(), c.lr_g, c.beta1_g, c.beta2_g),
                adam(self.discriminator.parameters(), c.lr_d, c.beta1_d, c.beta2_d)]

    def discriminator_loss(self, real: Tensor, fake: Tensor, y_real: Optional[Tensor] = None,
                           y_fake: Optional[Tensor] = None) -> Tensor:
        # D has no BatchNorm, so one forward pass over both halves equals two separate ones
        y = None if y_real is None else torch.cat([y_real, y_fake])
        logits = self.critic(torch.cat([real, fake]), y)
        return self.loss.discriminator(logits[: len(real)], logits[len(real):])

    # --- the (K+1)-class objective (Salimans et al. 2016, section 5) -------------------------------
    def resolve_objective(self, hidden_labels: bool, reset: bool = False) -> None:
        """`auto` -> k_plus_one when labels are hidden (`reset`: else back to projection, for the labels
        `set_class_prior` hands over); `projection` refuses hidden labels."""
        if hidden_labels and self.config.objective == "projection":
            raise ValueError("objective projection needs every training label (some are UNLABELLED)")
        if self.config.objective == "auto" and (hidden_labels or reset):
            self.k_plus_one.fill_(hidden_labels)

    def uses_k_plus_one(self, y: Optional[Tensor]) -> bool:
        """Whether this batch trains the (K+1) objective; `auto` turns to it for good at the first batch with
        UNLABELLED labels (where `set_class_prior` was not given the training labels)."""
        if y is None:
            return False
        self.resolve_objective(bool((y == UNLABELLED).any()))
        return bool(self.k_plus_one)

    def k_plus_one_discriminator_loss(self, real: Tensor, y_real: Tensor, fake: Tensor) -> Tensor:
        """Supervised cross-entropy + -log D(x) + -log(1 - D(G(z))), from one pass (D has no BatchNorm)."""
        logits = self.discriminator.class_logits(torch.cat([real, fake]))
        return k_plus_one_discriminator(logits[: len(real)], y_real, logits[len(real):])

    def k_plus_one_generator_loss(self, real: Tensor, y_real: Tensor) -> Tensor:
        """Feature matching on phi (Salimans et al. 2016, section 3.1) + `g_class_fm` x feature matching per
        class + `g_class_weight` x D's cross-entropy on (G(z, y), y), for fresh z and y ~ p(y). The last is
        computed even at weight 0, so that D's class layers get a gradient (plain DDP expects one)."""
        fake, y_fake = self.fakes(len(real))
        d = self.discriminator
        with torch.no_grad():
            real_features = d.features(real)
            real_probs = class_responsibilities(d.logits_from_features(real_features), y_real)
        features = d.features(fake)
        c = self.config
        return (feature_matching(real_features, features)
                + c.g_class_fm * class_feature_matching(real_features, real_probs, features, y_fake)
                + c.g_class_weight * F.cross_entropy(d.logits_from_features(features), y_fake))

    def _optimizer_step(self, optimizer, loss: Tensor) -> Tensor:
        """One step of `optimizer` on `loss`. Its zero_grad also drops the gradients the other player's last
        step left on these parameters.

        Under DDP both players' losses are backpropagated through both networks (D's fakes are not detached),
        so every parameter gets a gradient in every backward pass and plain DDP (find_unused_parameters=False)
        works; toggle_optimizer would freeze the other network and leave DDP waiting for its gradients. On one
        process D's fakes are detached: the backward through G that D's step would pay is only dropped."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def real_batch(self, batch):
        """(x, y) of a batch; y is None for an unconditional model, which ignores the labels."""
        return batch[0], (batch[1] if self.conditional else None)

    def training_step(self, batch, batch_idx):
        x, y = self.real_batch(batch)
        k_plus_one = self.uses_k_plus_one(y)
        opt_g, opt_d = self.optimizers()
        log = dict(on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))

        fake, y_fake = self.fakes(len(x))
        if self.trainer.world_size == 1:  # G's gradient from D's loss is dropped anyway (`_optimizer_step`)
            fake = fake.detach()
        loss_d = (self.k_plus_one_discriminator_loss(x, y, fake) if k_plus_one
                  else self.discriminator_loss(x, fake, y, y_fake))
        loss_d = self._optimizer_step(opt_d, loss_d)
        self.d_steps += 1
        self._track_collapse(loss_d, x, fake)
        # train/loss is D's loss, the same quantity as val/loss: their gap shows D overfitting
        self.log("train/loss_d", loss_d, **log)
        self.log("train/loss", loss_d, **log)

        if int(self.d_steps) % self.config.n_critic == 0:
            loss_g = (self.k_plus_one_generator_loss(x, y) if k_plus_one
                      else self.loss.generator(self.critic(*self.fakes(len(x)))))
            loss_g = self._optimizer_step(opt_g, loss_g)
            self.log("train/loss_g", loss_g, **log)
            if self.generator_ema is not None:
                self.g_steps += 1
                ema_update_(self.generator_ema, self.generator, ema_decay_at(self.config.ema_decay, int(self.g_steps)))

    # --- divergence --------------------------------------------------------------------------------
    @staticmethod
    def spread(x: Tensor) -> Tensor:
        """How far a batch's examples are from one another: each feature's std across the batch, averaged."""
        return x.detach().flatten(1).float().std(0).mean()

    def _track_collapse(self, loss_d: Tensor, real: Tensor, fake: Tensor) -> None:
        """Adds this step's D loss and the spreads of its fakes and real batch to the epoch's sums (a few
        reductions over a batch the step already holds; on the training device, no synchronisation)."""
        if len(real) < 2:
            return
        stats = torch.stack([loss_d.float(), self.spread(fake), self.spread(real), torch.ones((), device=real.device)])
        self._epoch_stats = stats if self._epoch_stats is None else self._epoch_stats + stats

    def on_train_epoch_end(self) -> None:
        """Logs the epoch's `train/sample_spread` (G's spread / the data's) and raises TrainingDiverged once D
        has won, or G collapsed, `collapse_epochs` epochs in a row. The sums are added across ranks first, so
        every rank takes the same decision."""
        stats = self._epoch_stats if self._epoch_stats is not None else torch.zeros(4, device=self.device)
        self._epoch_stats = None
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if float(stats[3]) == 0:
            return
        d_loss, fake_spread, real_spread = (stats[:3] / stats[3]).tolist()
        ratio = fake_spread / real_spread if real_spread > 0 else float("inf")
        self.log("train/sample_spread", ratio, on_step=False, on_epoch=True)
        c = self.config
        adversarial = not (self.conditional and bool(self.k_plus_one))  # (K+1): G does feature matching
        s = self.collapse_streak
        s["mode_collapse"] = s["mode_collapse"] + 1 if ratio < c.collapse_std else 0
        s["d_won"] = s["d_won"] + 1 if adversarial and d_loss < c.collapse_d_loss else 0
        if c.collapse_epochs <= 0:
            return
        epoch = self.trainer.current_epoch
        if s["mode_collapse"] >= c.collapse_epochs:
            raise TrainingDiverged(
                f"gan: mode collapse at epoch {epoch}: the generator's samples spread {ratio:.3g} x the data's, below "
                f"gan.collapse_std={c.collapse_std}, for {s['mode_collapse']} epochs in a row (gan.collapse_epochs)")
        if s["d_won"] >= c.collapse_epochs:
            raise TrainingDiverged(
                f"gan: the discriminator won at epoch {epoch}: its mean loss {d_loss:.3g} stayed below "
                f"gan.collapse_d_loss={c.collapse_d_loss} for {s['d_won']} epochs in a row (gan.collapse_epochs), "
                f"so the generator learns nothing more")

    def validation_step(self, batch, batch_idx):
        x, y = self.real_batch(batch)
        g = torch.Generator().manual_seed(self.config.seed + batch_idx)  # the same fakes every validation
        fake, y_fake = self.fakes(len(x), g)
        if self.conditional and bool(self.k_plus_one):
            loss = self.k_plus_one_discriminator_loss(x, y, fake)
        else:
            loss = self.discriminator_loss(x, fake, y, y_fake)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(x))
