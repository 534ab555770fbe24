"""The normalizing-flow family: exact log-likelihood, one-pass sampling, z as representation.

Images: logit pre-processing (RealNVP §4.1), then a multi-scale Glow (Kingma & Dhariwal 2018): at every
scale squeeze, K steps of [actnorm, invertible 1x1 conv, affine coupling] - the couplings alternate
checkerboard and channel masks - and factor out half the channels (RealNVP §3.6); or, for small images
(`arch: auto`: at most 256 values, such as 8x8 digits), the image flattened through K steps of [actnorm,
feature reversal, rational-quadratic spline MAF] (Neural Spline Flows, Durkan et al. 2019). Vectors: K steps
of [actnorm, invertible linear map or reversal, layer], the layer an affine MAF, an affine coupling, or their
spline versions. The base is a standard normal over the flat latent; with labels, one diagonal Gaussian per
class (Glow's class-conditional prior), so p(x | y) for every class comes from one pass and p(y | x) is exact
by Bayes' rule.

Semi-supervised (labels UNLABELLED where hidden): FlowGMM (Izmailov, Kirichenko, Finzi & Wilson 2020, §3),
that base as a Gaussian mixture with one component per class: labelled examples train on -log p(x, y),
unlabelled ones on the exact marginal -log p(x) = -log sum_y p(x | y) p(y). The components are placed at the
labelled examples' latents (`_place_base`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.contract import UNLABELLED, Conditional, GenerativeModel, require_range
from lightning_modules.flow.transforms import (
    ActNorm, AffineCoupling, ClassConditionalNormal, Flatten, InvertibleConv1x1, Logit, MaskedAffineAutoregressive,
    MaskedSplineAutoregressive, NormalizingFlow, Reverse, Sequential, Split, SplineCoupling, Squeeze, StandardNormal,
    Transform, channel_mask, checkerboard_mask,
)
from lightning_modules.flow.transforms.nets import conv_net, mlp


def glow_step(shape, index: int, hidden: int) -> Transform:
    mask = (checkerboard_mask if index % 2 == 0 else channel_mask)(shape, parity=(index // 2) % 2)
    c = shape[0]
    return Sequential([ActNorm(c), InvertibleConv1x1(c), AffineCoupling(mask, conv_net(c, hidden))])


AUTO_SPLINE_MAX_DIM = 256  # `arch: auto` flattens images of at most this many values (see Flow.Config)
# Adam's (lr, weight_decay) where the config leaves them null, by architecture: the spline stack learns its
# bin shapes at 1/sqrt(hidden) of the conditioner's output (`spline.py`), so it takes larger steps
ADAM_DEFAULTS = {"spline": (1.5e-2, 1e-2), "glow": (2e-3, 0.0), "vector": (2e-3, 0.0)}


def check_scales(shape, scales: int) -> None:
    """An image (C, H, W) can be squeezed `scales` times when H and W stay even until the last squeeze."""
    _, h, w = shape
    for left in range(scales, 0, -1):
        if h % 2 or w % 2:
            raise ValueError(f"flow: image of {h}x{w} cannot be squeezed {left} more time(s); lower flow.scales")
        h, w = h // 2, w // 2


def multiscale_glow(shape, scales: int, steps: int, hidden: int) -> Transform:
    """(C, H, W) -> flat latent of C*H*W features."""
    c, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"flow: image of {h}x{w} cannot be squeezed {scales} more time(s); lower flow.scales")
    shape = (4 * c, h // 2, w // 2)
    layers = [Squeeze(), *(glow_step(shape, i, hidden) for i in range(steps))]
    if scales == 1:
        layers.append(Flatten(shape))
    else:
        kept = (shape[0] - shape[0] // 2, *shape[1:])
        layers.append(Split(shape, multiscale_glow(kept, scales - 1, steps, hidden)))
    return Sequential(layers)


def vector_step(features: int, index: int, kind: str, hidden: int, depth: int = 2, bins: int = 8,
                bound: float = 3.0, mixing: str = "linear") -> Transform:
    """[actnorm, mixing, layer] over (B, features). Mixing: an invertible linear map (linear) or the features
    reversed (reverse: an autoregressive layer's order alternates from step to step, as in MAF and NSF). A
    coupling fixes alternate features in turns (linear), or the first half (reverse: the reversal before it
    moves there the features the previous step transformed)."""
    mask = checkerboard_mask((features,), parity=index % 2) if mixing == "linear" else channel_mask((features,))
    if kind == "maf":
        last = MaskedAffineAutoregressive(features, hidden, depth)
    elif kind == "coupling":
        last = AffineCoupling(mask, mlp(features, hidden, depth))
    elif kind == "spline":
        last = MaskedSplineAutoregressive(features, hidden, depth, bins, bound)
    else:  # spline_coupling
        last = SplineCoupling(mask, hidden, depth, bins, bound)
    mix = InvertibleConv1x1(features) if mixing == "linear" else Reverse()
    return Sequential([ActNorm(features), mix, last])


def vector_stack(features: int, c) -> Transform:
    """`c.vector_steps` steps of [actnorm, `c.vector_mixing`, `c.vector_layer`] over (B, features)."""
    return Sequential([vector_step(features, i, c.vector_layer, c.hidden_features, c.hidden_layers, c.spline_bins,
                                   c.spline_bound, c.vector_mixing) for i in range(c.vector_steps)])


def spline_stack(shape, c) -> Transform:
    """The `spline` arch of images: the image flattened, then `c.spline_steps` steps of [actnorm, reversal,
    spline MAF whose MADE has one hidden layer of `c.spline_hidden` units] (Durkan et al. 2019's
    autoregressive NSF, with a data-initialised actnorm before each layer)."""
    d = math.prod(shape)
    return Sequential([Flatten(shape), *(vector_step(d, i, "spline", c.spline_hidden, 1, c.spline_bins, c.spline_bound,
                                                     "reverse") for i in range(c.spline_steps))])


@torch.no_grad()
def labelled_statistics(z: Tensor, y: Tensor, num_classes: int):
    """Per-class means of the latents `z` (N, D) of labelled examples `y` (N,) (zero for a class without
    any), and their pooled within-class standard deviation (D,) (one where no class has two examples)."""
    z = z.double()
    onehot = F.one_hot(y, num_classes).double()
    n = onehot.sum(0)
    mean = onehot.T @ z / n.clamp_min(1)[:, None]
    dof = (n - 1).clamp_min(0).sum()
    if dof == 0:
        return mean, torch.ones_like(z[0])
    return mean, (((z - mean[y]) ** 2).sum(0) / dof).sqrt().clamp_min(1e-2)


class Flow(GenerativeModel):
    family = "flow"
    supports_fsdp = True
    log_prob_kind = "exact"
    takes_temperature = True
    needs_init_data = True  # semi-supervised: the labelled examples place the class means (`provide_init_data`)
    semi_supervised_method = "FlowGMM: a Gaussian per class in the latent, exact p(x, y), p(x) (Izmailov et al. 2020)"

    @dataclass
    class Config:
        max_epochs: int = 60
        seed: int = 0
        # Adam's learning rate and L2 weight decay; null: by architecture (ADAM_DEFAULTS)
        lr: Optional[float] = None
        weight_decay: Optional[float] = None
        cosine_lr: bool = True  # anneal the learning rate to 0 over the run
        # images: logit pre-processing, then `arch`: the multiscale Glow (glow: `scales`, `steps_per_scale`,
        # `hidden_channels`), or the image flattened through a rational-quadratic spline MAF (spline, `spline_*`;
        # Durkan et al. 2019). auto: spline for images of at most 256 values (C x H x W, e.g. 8x8 digits: a MADE
        # sees every pixel, and there it beats the Glow by 11 nats of test NLL in the same training time; past
        # spline_hidden + 1 values widen the MADE, or its last pixels see only the first), glow for larger ones
        # (MNIST, CIFAR-10: the convolutions' locality pays). Semi-supervised training (hidden
        # labels) takes the Glow under auto, whatever the size: FlowGMM needs a latent where images of a class
        # stay together, which the convolutions give and a MADE on flat pixels does not (digits with 10 labels
        # per class: 0.92 against 0.40 accuracy). So `scales` must fit the image unless arch is spline.
        arch: Literal["auto", "glow", "spline"] = "auto"
        scales: int = 2
        steps_per_scale: int = 4
        hidden_channels: int = 64
        logit_alpha: float = 0.05
        # the spline arch: `spline_steps` x [actnorm, feature reversal, spline MAF]; each MADE has one hidden
        # layer of `spline_hidden` units, each spline `spline_bins` bins on [-spline_bound, spline_bound] (its
        # input standardised by the actnorm) and the identity outside. Tuned on digits for test NLL per second
        # of training on 2 CPU cores: deeper or wider MADEs, more bins or more epochs overfit the 1258 training
        # images (80 epochs: worse than 60); the vector layers below share the bins and the bound.
        spline_steps: int = 5
        spline_hidden: int = 96
        spline_bins: int = 8
        spline_bound: float = 4.0
        # vectors: `vector_steps` x [actnorm, mixing, layer]; the mixing is an invertible linear map (linear)
        # or a reversal of the features (reverse: autoregressive layers alternate their order); the layer an
        # affine MAF (maf), an affine coupling (coupling), a spline MAF (spline) or a spline coupling
        # (spline_coupling), its conditioner `hidden_layers` x `hidden_features` units
        vector_layer: Literal["maf", "coupling", "spline", "spline_coupling"] = "maf"
        vector_steps: int = 8
        vector_mixing: Literal["linear", "reverse"] = "linear"
        hidden_features: int = 64
        hidden_layers: int = 2
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone
        # semi-supervised training (FlowGMM, see `_semi_nll`): a labelled example's weight against an
        # unlabelled one's (1: the exact likelihood of the observed data), and whether the class means and
        # scales keep learning after their placement (false: FlowGMM's fixed base)
        labelled_weight: float = 1.0
        semi_learn_base: bool = True

        def __post_init__(self):
            require_range(self, "scales", "steps_per_scale", "hidden_channels", "spline_steps", "spline_hidden",
                          "vector_steps", "hidden_features", "hidden_layers", low=1)
            require_range(self, "spline_bins", low=2, high=256)
            require_range(self, "spline_bound", low=0, low_open=True)
            require_range(self, "lr", low=0, low_open=True, optional=True)
            require_range(self, "labelled_weight", low=0, low_open=True)
            require_range(self, "weight_decay", low=0, optional=True)
            require_range(self, "logit_alpha", low=0, high=0.5, high_open=True)  # x -> logit(alpha + (1 - 2 alpha) x)

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        if self.info.kind == "image":
            if c.arch != "spline":  # auto as well: it takes the Glow for semi-supervised training
                try:
                    check_scales(self.info.shape, c.scales)
                except ValueError as e:
                    raise ValueError(f"{e}{' (or set flow.arch=spline)' if c.arch == 'auto' else ''}") from None
            small = self.info.dim <= AUTO_SPLINE_MAX_DIM
            self._build(c.arch if c.arch != "auto" else ("spline" if small else "glow"))
        elif self.info.kind == "vector":
            self._build("vector")
        else:
            raise ValueError(f"flow: no architecture for {self.info.kind} data")

    def _build(self, arch: str) -> None:
        """The flow of architecture `arch` (glow, spline or vector), seeded by `seed` without touching the
        global random stream, and the Adam settings that go with it."""
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            if arch == "vector":
                transform = vector_stack(self.info.dim, c)
            elif arch == "glow":
                glow = multiscale_glow(self.info.shape, c.scales, c.steps_per_scale, c.hidden_channels)
                transform = Sequential([Logit(c.logit_alpha), glow])
            else:  # spline
                transform = Sequential([Logit(c.logit_alpha), spline_stack(self.info.shape, c)])
        d = self.info.dim
        base = ClassConditionalNormal(d, self.num_classes) if self.conditional else StandardNormal(d)
        self.flow = NormalizingFlow(transform, base)
        self.arch = arch
        lr, weight_decay = ADAM_DEFAULTS[arch]
        self.lr = lr if c.lr is None else c.lr
        self.weight_decay = weight_decay if c.weight_decay is None else c.weight_decay

    # --- the contract ---------------------------------------------------------------------------
    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.no_labels_unless_conditional(y)
        if self.conditional and y is None:
            return self.marginal_log_prob(x)
        return self.flow.log_prob(x, y)

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        self._require_conditional()
        return self.flow.class_log_probs(x)

    def encode(self, x: Tensor) -> Tensor:
        return self.flow.encode(x)

    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
        """n samples; a conditional model draws z from the base of the requested classes (None: y ~ p(y))."""
        self.no_labels_unless_conditional(y)
        y = self.sample_labels(n, y) if self.conditional else None
        return self.to_data_space(self.flow.sample(n, temperature, y).reshape(n, *self.info.shape))

    @torch.no_grad()
    def set_class_prior(self, y: Tensor) -> None:
        """log p(y) from the labelled examples; hidden labels make the model semi-supervised, and an image
        model of `arch: auto` then a Glow (see Flow.Config; its checkpoint's config says glow from then on)."""
        super().set_class_prior(y)
        if self.semi_supervised and self.config.arch == "auto" and self.arch != "glow" and self.info.kind == "image":
            device = self.label_log_prior.device
            self.config.arch = "glow"
            self.hparams["cfg"]["arch"] = "glow"
            self._build("glow")
            self.flow.to(device)
        if self.semi_supervised and not self.config.semi_learn_base:
            self.flow.base.freeze()

    # --- semi-supervised: FlowGMM (Izmailov, Kirichenko, Finzi & Wilson 2020) ----------------------
    @torch.no_grad()
    def _place_base(self, x: Tensor) -> None:
        """Places the mixture base once, at the first semi-supervised step: each class's mean at the mean
        latent of its labelled examples, every scale at their pooled within-class spread. FlowGMM fixes
        random well-separated means instead; with a small flow and few steps T cannot carry the classes
        there, and they collapse onto the nearest mean."""
        self.flow.transform(x)  # ActNorm's data-dependent initialisation from this batch, as any first step
        xl, yl = self.init_data().to(x), self.init_labels().to(x.device)
        z = torch.cat([self.flow.encode(chunk) for chunk in xl.split(256)])
        self.flow.base.place(*labelled_statistics(z, yl, self.num_classes))

    def provide_init_data(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """Keeps the labelled examples of a split with hidden labels (they place the base, `_place_base`);
        a fully labelled or unlabelled training set is not needed, so it is not held."""
        if y is not None and bool((y == UNLABELLED).any()):
            keep = y != UNLABELLED
            super().provide_init_data(x[keep], y[keep])

    def _semi_nll(self, x: Tensor, y: Tensor) -> Tensor:
        """FlowGMM's objective (§3): a labelled example costs -log p(x, y) = -log p(x | y) - log p(y), an
        unlabelled one -log p(x) = -log sum_y p(x | y) p(y), both exact; labelled terms weigh
        `labelled_weight`, and the sum is divided by the batch size."""
        joint = self.class_log_joint(x)  # log p(x, y = c), (B, K), from one pass through T
        labelled = y != UNLABELLED
        lab = joint[labelled].gather(1, y[labelled, None]).squeeze(1)
        unlab = torch.logsumexp(joint[~labelled], 1)
        return -(self.config.labelled_weight * lab.sum() + unlab.sum()) / len(x)

    # --- training -------------------------------------------------------------------------------
    def _loss(self, batch) -> Tensor:
        """The training loss: `_semi_nll` when labels are hidden (`set_class_prior` saw UNLABELLED, or the
        batch holds one), else `_nll`."""
        if not (self.semi_supervised or (self.conditional and bool((batch[1] == UNLABELLED).any()))):
            return self._nll(batch)
        if not bool(self.flow.base.initialized):
            self._place_base(batch[0])
        return self._semi_nll(batch[0], batch[1])

    def _nll(self, batch) -> Tensor:
        """-log p(x) per example, or -log p(x | y) for a conditional model: the model of p(y) is the
        training frequencies, so maximising log p(x | y) maximises the joint likelihood."""
        return -self.log_prob(batch[0], batch[1] if self.conditional else None).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._nll(batch), on_step=False, on_epoch=True, sync_dist=True)

    def optimizer_and_schedule(self, total_steps: float):
        """Adam, with the learning rate annealed to 0 over `total_steps` when `cosine_lr` is on (and the
        run has a known length)."""
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.config.cosine_lr or math.isinf(total_steps):
            return opt, None
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))

    def configure_optimizers(self):
        opt, sched = self.optimizer_and_schedule(self.trainer.estimated_stepping_batches)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
