"""Variational autoencoder (Kingma & Welling 2014) trained on the (beta-)ELBO; `log_prob` is the
importance-weighted bound of Burda et al. 2016 (IWAE), a lower bound that tightens as k grows.

With labels it is the conditional VAE of Sohn et al. 2015 (M2's generative model without its classifier,
Kingma et al. 2014): p(x | y, z) p(z) with q(z | x, y), the one-hot label joining the encoder's head and
the decoder's input. log p(x | y) is the IWAE bound under q(z | x, y); log p(x) is the log-sum-exp over
classes of log p(y) + that bound, itself a stochastic lower bound (`class_bounds`).

With hidden labels (`data.labels_per_class`: UNLABELLED in `set_class_prior`, `provide_init_data` and the
batches) it is M2 itself (Kingma, Rezende, Mohamed & Welling 2014): the CVAE plus a classifier q(y | x),
trained on J^alpha (eq. 9, `semi`): a labelled example by L(x, y) + alpha log q(y | x), an unlabelled one by
U(x) = sum_y q(y | x) L(x, y) + H(q(y | x)). The classifier appears only then (`semi_supervised: auto`), so a
fully labelled model is the CVAE bit for bit. `classify` stays Bayes' rule over the per-class bounds, not
q(y | x): on digits with 10 labels per class (150 epochs) it was the better of the two on every seed
measured (seeds 0, 1, 2: 0.969, 0.947, 0.958 against q's 0.950, 0.936, 0.933)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.binarized import binarize, density_offset, sample_half_cube
from lightning_modules.common.nets import ConvDecoder, ConvEncoder, mlp
from lightning_modules.contract import UNLABELLED, Conditional, ConfigError, GenerativeModel, require_range
from lightning_modules.vae.class_bounds import class_bounds, every_class
from lightning_modules.vae.semi import sum_over_classes, top_classes

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
    needs_init_data = True  # semi-supervised: eq. 9's classification term draws from the labelled examples
    semi_supervised_method = "M2: a classifier q(y | x) and the class as a latent of the CVAE (Kingma et al. 2014)"

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
        # M2 (Kingma et al. 2014): a classifier q(y | x) and the unlabelled bound; auto: when the training
        # labels handed to `set_class_prior` hide some (UNLABELLED)
        semi_supervised: Literal["auto", True, False] = "auto"
        # eq. 9's alpha / N, the weight of E_labelled[log q(y | x)] next to the mean bound (`semi`); the
        # paper's 0.1 N is 0.1 here (with no labelled_draws: 0.82 on digits, 10 labels per class, 60 epochs)
        alpha: float = 10.0
        semi_classes: int = 2  # U(x) sums over this many classes of highest q(y | x) (`semi.top_classes`)
        labelled_draws: int = 64  # labelled examples drawn per step for eq. 9's classification term

        def __post_init__(self):
            require_range(self, "latent_dim", "hidden", "channels", "iwae_k", "semi_classes", low=1)
            require_range(self, "lr", low=0, low_open=True)
            require_range(self, "beta", "alpha", "labelled_draws", low=0)
            require_range(self, "min_log_scale")  # any finite log scale

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
        self.arch = arch
        self.classifier: Optional[nn.Module] = None  # q(y | x), M2's classifier: semi-supervised models only
        self._labelled: Optional[Tuple[Tensor, Tensor]] = None  # the labelled training examples (`provide_init_data`)
        if c.semi_supervised is True:
            self.add_classifier()

    # --- model pieces -------------------------------------------------------------------------------
    def with_label(self, h: Tensor, y: Optional[Tensor]) -> Tensor:
        """[h, one-hot y] (h (N, F), y (N,)) for a conditional model, else h."""
        if not self.conditional:
            return h
        return torch.cat([h, F.one_hot(y, self.num_classes).to(h.dtype)], 1)

    def posterior(self, x: Tensor, y: Optional[Tensor] = None, h: Optional[Tensor] = None):
        """q(z | x) or q(z | x, y): mean and log-variance; `h`: x's label-free features `encoder[:-1](x)`
        where they are already computed (the unlabelled bound reuses them for every class)."""
        h = self.encoder[:-1](x) if h is None else h
        mu, log_var = self.encoder[-1](self.with_label(h, y)).chunk(2, dim=-1)
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

    def elbo_terms(self, x: Tensor, y: Optional[Tensor] = None, h: Optional[Tensor] = None):
        mu, log_var = self.posterior(x, y, h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        rec = self.obs_log_prob(x, self.decode(z, y))
        kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)  # KL(q(z|x) || N(0, I)), closed form
        return rec, kl

    # --- semi-supervised (M2, Kingma et al. 2014) ----------------------------------------------------
    def add_classifier(self) -> None:
        """M2's classifier q(y | x): an MLP on the flattened input as wide as the encoder, with K outputs
        (linear for the linear arch): cheap next to the decoder passes of the unlabelled bound.
        Built after every other module and from its own seeded generator, so the generative model's
        initialisation and the global random stream are those of the fully labelled model."""
        if not self.conditional:
            raise ConfigError("semi_supervised", "needs a conditional model (labelled data)")
        c, k = self.config, self.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            body = nn.Linear(self.info.dim, k) if self.arch == "linear" else mlp(self.info.dim, c.hidden, k)
            net = nn.Sequential(nn.Flatten(), body)
        self.classifier = net.to(self.log_scale.device)

    def note_hidden_labels(self, y: Tensor) -> None:
        """Training labels with UNLABELLED entries make a `semi_supervised: auto` model semi-supervised (its
        checkpoint's config says so from then on)."""
        if self.classifier is not None or not bool((y == UNLABELLED).any()):
            return
        if self.config.semi_supervised is False:
            raise ConfigError("semi_supervised", "the training labels are partly hidden (use auto or true)")
        self.config.semi_supervised = True
        self.hparams["cfg"]["semi_supervised"] = True
        self.add_classifier()

    @torch.no_grad()
    def set_class_prior(self, y: Tensor) -> None:
        """log p(y) from the labelled examples; hidden labels make the model semi-supervised."""
        super().set_class_prior(y)
        self.note_hidden_labels(y)

    def provide_init_data(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """The training set: a semi-supervised model keeps its labelled examples for eq. 9's classification
        term (`labelled_draw`; not checkpointed, handed over again on resume); a fully labelled one ignores it."""
        super().provide_init_data(x, y)
        if y is not None and self.conditional:
            self.note_hidden_labels(y)
            visible = y != UNLABELLED
            self._labelled = (x[visible], y[visible]) if self.classifier is not None and visible.any() else None

    def labelled_draw(self, device) -> Optional[Tuple[Tensor, Tensor]]:
        """`labelled_draws` labelled training examples drawn uniformly with the global generator (which
        the train stage reseeds every step), or None without them."""
        if self._labelled is None or not self.config.labelled_draws:
            return None
        x, y = self._labelled
        pick = torch.randint(len(y), (self.config.labelled_draws,))
        return x[pick].to(device), y[pick].to(device)

    def classifier_log_probs(self, x: Tensor) -> Tensor:
        """log q(y | x), (B, K)."""
        return torch.log_softmax(self.classifier(x), 1)

    def labelled_bound(self, x: Tensor, y: Tensor, h: Optional[Tensor] = None) -> Tensor:
        """L(x, y) (eq. 6): the (beta-)ELBO on log p(x | y), plus log p(y)."""
        rec, kl = self.elbo_terms(x, y, h)
        return rec - self.config.beta * kl + self.class_log_prior().to(rec)[y]

    def unlabelled_bound(self, x: Tensor, m: Optional[int] = None) -> Tensor:
        """U(x) (eq. 7) over the m classes of highest q(y | x) (default: all); a lower bound on log p(x)."""
        unlabelled = torch.full((len(x),), UNLABELLED, device=x.device)
        return self.semi_supervised_terms(x, unlabelled, m or self.num_classes)[0]

    def semi_supervised_terms(self, x: Tensor, y: Tensor, m: Optional[int] = None):
        """The bounds of a batch, L(x, y) of its labelled examples then U(x) of the others (over their
        `semi_classes` most likely classes), in one decoder pass over the (example, class) pairs; and
        log q(y | x) of the labelled examples."""
        labelled = y != UNLABELLED
        logits = self.classifier(x)
        classes, log_q = top_classes(logits[~labelled], m or self.config.semi_classes)
        rows = torch.cat([labelled.nonzero()[:, 0], (~labelled).nonzero()[:, 0].repeat_interleave(classes.shape[1])])
        bounds = self.labelled_bound(x[rows], torch.cat([y[labelled], classes.flatten()]), self.encoder[:-1](x)[rows])
        n_l = int(labelled.sum())
        u = sum_over_classes(log_q, bounds[n_l:].view(classes.shape))
        log_q_y = torch.log_softmax(logits[labelled], 1).gather(1, y[labelled, None])[:, 0]
        return torch.cat([bounds[:n_l], u]), log_q_y

    # --- training -------------------------------------------------------------------------------------
    def labels_of(self, batch) -> Optional[Tensor]:
        """The batch's labels when the model is conditional, else None."""
        return batch[1] if self.conditional else None

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if self.classifier is not None:
            return self.semi_supervised_step(x, batch[1])
        if self.conditional and bool((batch[1] == UNLABELLED).any()):
            raise ValueError("hidden training labels (UNLABELLED): hand the labels to set_class_prior or "
                             "provide_init_data first, or set semi_supervised: true")
        rec, kl = self.elbo_terms(x, self.labels_of(batch))
        loss = -(rec - self.config.beta * kl).mean()
        self.log("train/loss", loss, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        self.log("train/kl", kl.mean(), on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
        return loss

    def semi_supervised_step(self, x: Tensor, y: Tensor) -> Tensor:
        """-J^alpha / N (eq. 9): the bounds averaged over the batch, and alpha times the mean log q(y | x)
        of its labelled examples and of `labelled_draws` more from the training set (the expectation over
        the labelled data that eq. 9 asks for, with less noise than the batch's few labels alone)."""
        bounds, log_q_y = self.semi_supervised_terms(x, y)
        extra = self.labelled_draw(x.device)
        if extra is not None:
            log_q_y = torch.cat([log_q_y, self.classifier_log_probs(extra[0]).gather(1, extra[1][:, None])[:, 0]])
        classification = log_q_y.mean() if len(log_q_y) else log_q_y.sum()
        loss = -bounds.mean() - self.config.alpha * classification
        self.log("train/loss", loss, on_epoch=True, on_step=False, sync_dist=True, batch_size=len(x))
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
