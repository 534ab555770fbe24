"""Restricted Boltzmann machine: binary hidden units over Bernoulli, categorical, ordinal or Gaussian visible units,
trained by contrastive divergence CD-k (Hinton 2002) or persistent CD (Tieleman 2008), with log Z by exact
enumeration over the hidden layer or by annealed importance sampling (Salakhutdinov & Murray 2008).

Energy  E(v, h) = E_vis(v; b) - c.h - (v/sigma)'Wh,  with  E_vis(v; b) = -b.v  and sigma = 1   (Bernoulli,
                                                                                 categorical, ordinal)
                                                            E_vis(v; b) = sum_i (v_i - b_i)^2 / 2 sigma_i^2  (Gaussian)
(v/sigma is `units.over_sigma(v)`: for ordinal units, each pixel's intensity l / (L - 1) in place of its one-hot.)
Free energy  F(v) = -log sum_h exp(-E(v, h)) = E_vis(v; b) - sum_j softplus(c_j + (v/sigma)'W_j),  p(v) = e^-F(v) / Z.

P(X, Y) (`conditional`): the classification RBM of Larochelle & Bengio (2008), one-hot label units joined to the
hidden layer (`labels.py`): p(y | x) is exact from the free energies F(x, y), a class is sampled by clamping its
units, and log Z sums the per-class log Z_y (the model's own label marginal is p(y) = Z_y / Z). It is trained by
CD on the joint (v, y), plus `discriminative_weight` times -log p(y | x) (the hybrid DRBM, their sec. 3). With hidden
labels (UNLABELLED) it is their semi-supervised DRBM (sec. 4): an unlabelled example is trained by CD on -log p(x)
with the label a latent variable (`semi_supervised_objective`), the discriminative term averaged over the labelled
rows (their boost capped by `max_label_boost`).

Data space (so NLLs compare across families):
- Bernoulli: b = (x > 0.5); the density on [0, 1]^D is P_RBM(b(x)) 2^D, uniform within each half-cube, and a
  sample is (b + u) / 2 with u ~ U[0, 1).
- categorical (Salakhutdinov, Mnih & Hinton 2007, softmax units): each pixel's level l = floor(x L) is a one-hot
  group of L visibles (D L in all); the density is P_RBM(levels) L^D, uniform within each level's bin (the
  dequantisation convention), and a sample is (l + u) / L.
- ordinal: the same one-hot levels and biases, but the weights meet the level's intensity l / (L - 1), one weight
  per pixel and hidden unit (`units.OrdinalUnits`). `auto` uses it for images with <= 32 levels: on digits its
  samples obey the requested class (cond_acc) where the softmax units' scatter over unrelated levels.
- Gaussian (Krizhevsky 2009, "Learning multiple layers of features from tiny images", sec. 1.4.1; Cho et al.
  2011 learn log sigma the same way): the RBM models z = (x - shift) / scale, standardised with training-data
  statistics, with learned per-visible sigma (1 at the start); the Jacobian adds -sum(log scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.common.ais import effective_sample_size, log_z_standard_error
from lightning_modules.contract import UNLABELLED, Conditional, GenerativeModel, require_range
from lightning_modules.rbm.energy import RBMEnergy
from lightning_modules.rbm.labels import LabelUnits
from lightning_modules.rbm.units import GaussianUnits, Statistics, visible_units


class RBM(GenerativeModel):
    """RBM family. `train/loss` and `val/loss` are the mean-field reconstruction NLL (comparable between the
    two; CD has no objective whose value tracks the likelihood); `train/cd_objective` is the surrogate that
    is minimised. log Z is computed once when training ends and kept in the `log_z` buffer (checkpointed)."""

    family = "rbm"
    log_prob_kind = "estimate"  # AIS; an instance with n_hidden <= exact_max_hidden is exact (`nll_kind`)
    needs_init_data = True  # standardisation statistics and the base model's visible bias
    semi_supervised_method = ("hybrid DRBM: CD on -log p(x, y), on -log p(x) with the class latent, and -log p(y | x) "
                              "(Larochelle & Bengio 2008)")

    @dataclass
    class Config:
        # auto: ordinal for images with <= 32 levels (digits), Bernoulli for images with more, else Gaussian
        visible: Literal["auto", "bernoulli", "categorical", "ordinal", "gaussian"] = "auto"
        n_hidden: int = 256
        learn_sigma: bool = True  # Gaussian visibles: learn log sigma_i (else sigma = 1 on standardised data)
        cd_k: int = 1  # Gibbs sweeps per negative phase
        persistent: bool = False  # PCD (Tieleman 2008) instead of CD-k from the data (Hinton 2002)
        n_chains: int = 128  # persistent chains
        # None: 0.05 (Bernoulli, categorical, ordinal) or 0.003 (Gaussian: Hinton 2010 guide sec. 13.2)
        lr: Optional[float] = None
        momentum: float = 0.9
        weight_decay: float = 1e-4  # L2 on the weights only (Hinton 2010 guide sec. 10)
        # None: 0.01 (Bernoulli, categorical, ordinal: Hinton 2010 guide sec. 8) or 0.5 (Gaussian: on standardised data,
        # small weights sit at a saddle where the data and the model have the same covariance and the gradient vanishes)
        init_std: Optional[float] = None
        # CD-1 on digits (ordinal, 256 hidden): 100 epochs give class samples the featnet labels right 93% of the
        # time over three seeds; at 250 it falls to 82%, as CD-1 leaves the modes it never visits unchecked
        max_epochs: int = 100
        # Gibbs sweeps per `sample` call, from the base model: 10x the burn-in seen on digits, where the class
        # samples' mean free energy and intensity are flat from 30 sweeps to 3000 (and cond_acc from 100 to 3000)
        sample_steps: int = 300
        ais_chains: int = 100  # in all: a conditional model splits them over the classes (its AIS costs the same)
        ais_steps: int = 10000  # length of the beta schedule
        exact_max_hidden: int = 20  # enumerate the 2^H hidden states up to this size instead of AIS
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone
        # conditional: the weight of -log p(y | x) beside the generative CD term (hybrid DRBM, Larochelle &
        # Bengio 2008 sec. 3; 0 = purely generative). CD-1 alone leaves the label units weak: on digits 3 takes
        # the Bayes classifier from 0.93 to 0.955 at the same test NLL, and on 8 Gaussians it keeps the samples
        # asked for a component within it (>= 0.97 per component, against 0.8 without)
        discriminative_weight: float = 3.0
        # semi-supervised training (hidden labels UNLABELLED): the weight of the unlabelled rows' generative term
        # -log p(x) beside the labelled rows' -log p(x, y) (beta in Larochelle & Bengio 2008 sec. 4); on digits with
        # 10 labels per class 0.3 and 2 classify no better than 1
        unlabelled_weight: float = 1.0
        # semi-supervised: -log p(y | x) is averaged over a batch's labelled rows, so that the few labels are not
        # drowned: a labelled row weighs B / n_labelled times a fully labelled batch's row, but at most this many
        # times. Uncapped, 1 label per class (about 1 labelled row in 128) saturates the hidden units and leaves the
        # classifier at chance for 50 epochs (0.47 at 100); 16 gives 0.68 +- 0.04 over five seeds (logistic
        # regression 0.63) and leaves 10 labels per class as it was (0.936 +- 0.009, where the cap rarely binds)
        max_label_boost: float = 16.0

        def __post_init__(self):
            require_range(self, "n_hidden", "cd_k", "n_chains", "ais_chains", "ais_steps", low=1)
            require_range(self, "sample_steps", "exact_max_hidden", low=0)  # 0 sweeps: the base model's draws
            require_range(self, "lr", "init_std", low=0, low_open=True, optional=True)  # null: by visible type
            require_range(self, "momentum", low=0, high=1, high_open=True)
            require_range(self, "weight_decay", "discriminative_weight", "unlabelled_weight", low=0)
            require_range(self, "max_label_boost", low=1)

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        config = self.config
        self.units = visible_units(config.visible, self.info)
        d, h = self.units.model_dim(self.info), config.n_hidden  # visible units (D L for levels)
        g = torch.Generator().manual_seed(config.seed)
        init_std = self.units.default_init_std if config.init_std is None else config.init_std
        self.lr = self.units.default_lr if config.lr is None else config.lr
        self.W = nn.Parameter(torch.randn(self.units.interaction_dim(self.info), h, generator=g) * init_std)
        self.b = nn.Parameter(torch.zeros(d))
        self.c = nn.Parameter(torch.zeros(h))
        if self.units is GaussianUnits and config.learn_sigma:
            self.log_sigma = nn.Parameter(torch.zeros(d))
        else:
            self.register_buffer("log_sigma", torch.zeros(d))
        self.register_buffer("shift", torch.zeros(self.info.dim))  # per data dimension
        self.register_buffer("scale", torch.ones(self.info.dim))
        self.register_buffer("base", torch.zeros(d))
        self.register_buffer("chains", torch.zeros(config.n_chains if config.persistent else 0, d))
        self.register_buffer("data_ready", torch.tensor(False))
        self.register_buffer("log_z", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("log_z_exact", torch.tensor(False))
        # AIS diagnostics of log_z (NaN when it is enumerated): the chains' effective sample size and the
        # standard error of log Z
        self.register_buffer("ais_ess", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("ais_log_z_se", torch.tensor(float("nan"), dtype=torch.float64))
        if self.conditional:  # created last, so an unconditional model is built exactly as before
            k = self.num_classes
            self.U = nn.Parameter(torch.randn(k, h, generator=g) * init_std)
            self.d = nn.Parameter(torch.zeros(k))
            self.register_buffer("class_base", torch.zeros(k, d))
            self.register_buffer("class_log_z", torch.full((k,), float("nan"), dtype=torch.float64))
            self.register_buffer("chain_labels", torch.zeros(len(self.chains), dtype=torch.long))

    def energy(self) -> RBMEnergy:
        return RBMEnergy(self.W, self.b, self.c, self.base, self.log_sigma.exp(), self.units)

    def labels(self) -> LabelUnits:
        return LabelUnits(self.U, self.d, self.class_base)

    def clamped_energy(self, y: Optional[Tensor]) -> RBMEnergy:
        """The RBM over (v, h) given classes y (None: the unconditional RBM)."""
        return self.energy() if y is None else self.labels().clamp(self.energy(), y)

    def to_model(self, x: Tensor) -> Tensor:
        return self.units.to_model(x.flatten(1), self.shift, self.scale)

    # --- data statistics, set once before the first update ----------------------------------------------
    @torch.no_grad()
    def set_statistics(self, stats: Statistics, class_base: Optional[Tensor] = None) -> None:
        """Standardisation and base model; a conditional model also takes each class's base visible bias
        (K, D) (None: the shared base for every class)."""
        shift, scale, base = (t.to(self.device) for t in stats)
        self.shift.copy_(shift)
        self.scale.copy_(scale)
        self.base.copy_(base)
        self.b.copy_(base)  # start at the independent-visibles model
        if self.config.persistent:
            self.chains.copy_(self.units.sample(base.expand(len(self.chains), -1), self.log_sigma.exp()))
            if self.conditional:
                self.chain_labels.copy_(torch.randint(self.num_classes, (len(self.chains),), device=self.device))
        if self.conditional:
            self.class_base.copy_(base.expand_as(self.class_base) if class_base is None else class_base)
        self.data_ready.fill_(True)

    def _training_statistics(self) -> Tuple[Statistics, Optional[Tensor]]:
        """The data statistics and, for a conditional model, each class's base bias (rank 0's everywhere:
        parameters initialised from them must agree across DDP ranks)."""
        x = self.init_data().flatten(1).cpu()
        stats = self.units.statistics(x)
        class_base = None
        if self.conditional:
            v, y = self.units.to_model(x, *stats[:2]), self.init_labels().cpu()
            # a class without training examples keeps the shared base
            class_base = torch.stack([self.units.base_bias(v[y == c]) if bool((y == c).any()) else stats[2]
                                      for c in range(self.num_classes)])
        return self.trainer.strategy.broadcast((stats, class_base), src=0)

    # --- training -----------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.log_z.fill_(float("nan"))
        if self.conditional:
            self.class_log_z.fill_(float("nan"))
        self.log_z_exact.fill_(False)
        if not bool(self.data_ready):
            self.set_statistics(*self._training_statistics())

    @torch.no_grad()
    def negative_phase(self, energy: RBMEnergy, v: Tensor) -> Tensor:
        """k Gibbs sweeps from the data (CD-k) or from the persistent chains (PCD), which then move on."""
        chain = self.chains if self.config.persistent else v
        for _ in range(self.config.cd_k):
            chain = energy.gibbs(chain)
        if self.config.persistent:
            self.chains.copy_(chain)
        return chain

    @torch.no_grad()
    def joint_negative_phase(self, energy: RBMEnergy, v: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """`negative_phase` on the joint chain (v, y): the label units are resampled with the visibles."""
        labels = self.labels()
        chain, chain_y = (self.chains, self.chain_labels) if self.config.persistent else (v, y)
        for _ in range(self.config.cd_k):
            chain, chain_y = labels.gibbs(energy, chain, chain_y)
        if self.config.persistent:
            self.chains.copy_(chain)
            self.chain_labels.copy_(chain_y)
        return chain, chain_y

    def cd_step(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(objective to minimise, reconstruction NLL to monitor) on a batch (with its classes when conditional);
        advances PCD chains."""
        v = self.to_model(x)
        energy = self.energy()
        # Its gradient is dF/dtheta at the data minus at the (detached) model samples: the CD estimate of
        # -d log p / dtheta (Hinton 2002), so DDP gradient averaging and SGD with momentum apply unchanged.
        if self.conditional and bool((y == UNLABELLED).any()):
            objective = self.semi_supervised_objective(energy, v, y)
        elif self.conditional:
            labels = self.labels()
            negative, negative_y = self.joint_negative_phase(energy, v, y)
            objective = (labels.free_energy(energy, v, y).mean()
                         - labels.free_energy(energy, negative, negative_y).mean())
            if self.config.discriminative_weight:
                objective = objective + self.config.discriminative_weight * F.cross_entropy(
                    -labels.free_energies(energy, v), y)
        else:
            negative = self.negative_phase(energy, v)
            objective = energy.free_energy(v).mean() - energy.free_energy(negative).mean()
        with torch.no_grad():
            recon = -self.clamped_energy(self.monitor_labels(v, y)).reconstruction_log_likelihood(v).mean()
        return objective, recon

    # --- semi-supervised training (labels UNLABELLED where hidden) ---------------------------------------------
    def semi_supervised_objective(self, energy: RBMEnergy, v: Tensor, y: Tensor) -> Tensor:
        """The semi-supervised hybrid DRBM (Larochelle & Bengio 2008 sec. 4): CD on -log p(x, y) for the labelled
        rows and on -log p(x), the label a latent, for the unlabelled ones (the latter weighted by
        `unlabelled_weight`), plus `discriminative_weight` times -log p(y | x) over the labelled rows alone
        (`labelled_cross_entropy`). A hidden label is never read: the unlabelled rows' chains start
        from y ~ p(y | x)."""
        labels, known = self.labels(), y != UNLABELLED
        free = labels.free_energies(energy, v)  # (B, K)
        positive = self.positive_free_energy(free, y, known)
        with torch.no_grad():
            start_y = self.complete_labels(free, y, known)
        negative, negative_y = self.joint_negative_phase(energy, v, start_y)
        weight = torch.where(known, 1.0, self.config.unlabelled_weight).to(v.dtype)
        negative_free = labels.free_energy(energy, negative, negative_y)
        if self.config.persistent:  # the chains are not the batch's rows: each row meets the chains' mean
            objective = (weight * positive).mean() - weight.mean() * negative_free.mean()
        else:  # CD-k: each row's chain starts at that row
            objective = (weight * (positive - negative_free)).mean()
        if self.config.discriminative_weight and bool(known.any()):
            objective = objective + self.config.discriminative_weight * self.labelled_cross_entropy(free, y, known)
        return objective

    def labelled_cross_entropy(self, free: Tensor, y: Tensor, known: Tensor) -> Tensor:
        """-log p(y | x) summed over the labelled rows, over max(n_labelled, B / max_label_boost): their mean, unless
        so few rows are labelled that the boost would pass the cap."""
        total = F.cross_entropy(-free[known], y[known], reduction="sum")
        return total / max(int(known.sum()), len(y) / self.config.max_label_boost)

    @staticmethod
    def positive_free_energy(free: Tensor, y: Tensor, known: Tensor) -> Tensor:
        """Each row's positive-phase free energy, (B,): F(x, y) where the label is known, else the marginal F(x)
        (its gradient is E_{p(y|x)}[dF(x, y)/dtheta], the label as a latent). Rows are split by `known` before
        any label is used as an index."""
        positive = LabelUnits.marginal_free_energy(free)
        labelled = free[known].gather(1, y[known][:, None])[:, 0]
        return positive.masked_scatter(known, labelled)

    @staticmethod
    def complete_labels(free: Tensor, y: Tensor, known: Tensor) -> Tensor:
        """The known labels, with a draw from p(y | x) = softmax(-F(x, .)) for every hidden one."""
        drawn = torch.multinomial(torch.softmax(-free[~known].detach(), -1), 1)[:, 0]
        return y.masked_scatter(~known, drawn)

    @torch.no_grad()
    def monitor_labels(self, v: Tensor, y: Optional[Tensor]) -> Optional[Tensor]:
        """The labels the reconstruction monitor clamps: a hidden label is replaced by the most probable class."""
        if y is None or not bool((y == UNLABELLED).any()):
            return y
        guess = (-self.labels().free_energies(self.energy(), v)).argmax(1)
        return torch.where(y == UNLABELLED, guess, y)

    def batch_labels(self, batch) -> Optional[Tensor]:
        return batch[1].long() if self.conditional else None

    def training_step(self, batch, batch_idx):
        cd_objective, recon = self.cd_step(batch[0], self.batch_labels(batch))
        n = len(batch[0])
        self.log("train/loss", recon, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/cd_objective", cd_objective.detach(), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=n)
        return cd_objective

    def validation_step(self, batch, batch_idx):
        v = self.to_model(batch[0])
        y = self.monitor_labels(v, self.batch_labels(batch))
        recon = -self.clamped_energy(y).reconstruction_log_likelihood(v).mean()
        self.log("val/loss", recon, on_epoch=True, sync_dist=True, batch_size=len(v))

    def configure_optimizers(self):
        label_bias = [self.d] if self.conditional else []
        biases = [p for p in (self.b, self.c, self.log_sigma) if isinstance(p, nn.Parameter)] + label_bias
        weights = [self.W, self.U] if self.conditional else [self.W]
        groups = [{"params": weights, "weight_decay": self.config.weight_decay},
                  {"params": biases, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.config.momentum)

    def on_train_end(self) -> None:
        self.refresh_log_z()
        if self.conditional:
            self.fit_label_bias()

    @torch.no_grad()
    def fit_label_bias(self) -> None:
        """The maximum-likelihood label bias given the other parameters, in closed form: d log p(x, y) / d d_y =
        [y] - p(y), so the optimum has the model's label marginal Z_y / Z equal to the training frequencies; Z_y is
        proportional to e^{d_y}, so d_y and log Z_y move by the same amount and no new AIS is needed. (CD-1 leaves
        p(y) far off: on digits from 0.01 to 0.27 per class; this also lowers the test NLL by 0.4 nats.) A class
        without training examples keeps its bias."""
        shift = self.label_log_prior - self.class_log_prior()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        old = self.d.detach().clone()
        self.d.add_(shift.to(self.d.dtype))
        self.class_log_z.add_(self.d.double() - old.double())  # the shift as stored (d may be float32)
        self.log_z.fill_(float(torch.logsumexp(self.class_log_z, 0)))

    # --- log Z ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_log_z(self) -> None:
        """Exact by enumeration when the hidden layer is small, else AIS (seeded: the same on every rank). A
        conditional model keeps log Z_y per class and their sum (AIS: `ais_chains` / K chains for each class, all
        annealed as one batch, so the cost is that of the unconditional model's AIS)."""
        energy = self.energy().detached(torch.float64)
        exact = self.enumerates_log_z()
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        ess = se = float("nan")
        if self.conditional:
            chains = -(-self.config.ais_chains // self.num_classes)
            class_log_z, log_w = self.labels().detached(torch.float64).class_log_z(
                energy, exact, chains, self.config.ais_steps, g)
            self.class_log_z.copy_(class_log_z)
            log_z = float(torch.logsumexp(class_log_z, 0))
            if log_w is not None:  # the worst class's ESS; Var log Z = sum_y (Z_y / Z)^2 Var log Z_y (delta method)
                ess = float(effective_sample_size(log_w).min())
                share = torch.softmax(class_log_z, 0)
                se = float(torch.sqrt((share**2 * log_z_standard_error(log_w) ** 2).sum()))
        elif exact:
            log_z = energy.log_z_enumerate()
        else:
            ais = energy.log_z_ais(self.config.ais_chains, self.config.ais_steps, g)
            log_z, ess, se = ais.log_z, ais.effective_sample_size(), ais.log_z_standard_error()
        self.log_z.fill_(log_z)
        self.log_z_exact.fill_(exact)
        self.ais_ess.fill_(ess)
        self.ais_log_z_se.fill_(se)

    def enumerates_log_z(self) -> bool:
        return self.config.n_hidden <= self.config.exact_max_hidden

    def nll_kind(self):
        """Exact when log Z is enumerated over the 2^H hidden states, else an AIS estimate."""
        return "exact" if self.enumerates_log_z() else "estimate"

    def ensure_log_z(self) -> None:
        if torch.isnan(self.log_z):
            self.refresh_log_z()

    def likelihood_diagnostics(self) -> Dict[str, float]:
        """With an AIS log Z: the effective sample size of its chains (out of `ais_chains`) and the standard
        error of log Z, which every NLL shares."""
        self.ensure_log_z()
        if bool(self.log_z_exact):
            return {}
        return {"ais_ess": float(self.ais_ess), "ais_log_z_se": float(self.ais_log_z_se)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        for name in ("ais_ess", "ais_log_z_se"):  # a checkpoint from before the AIS diagnostics
            checkpoint["state_dict"].setdefault(name, torch.tensor(float("nan"), dtype=torch.float64))

    # --- the contract --------------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.no_labels_unless_conditional(y)
        if self.conditional and y is None:
            return self.marginal_log_prob(x)
        self.ensure_log_z()
        v = self.to_model(x)
        if y is None:
            return -self.energy().free_energy(v) - self.log_z.to(v.dtype) + self.units.log_jacobian(self.scale)
        y = torch.as_tensor(y, dtype=torch.long, device=v.device)
        log_z_y = self.class_log_z.to(v.dtype)[y]
        return -self.labels().free_energy(self.energy(), v, y) - log_z_y + self.units.log_jacobian(self.scale)

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """log p(x | y) = -F(x, y) - log Z_y for all classes in one pass."""
        self._require_conditional()
        self.ensure_log_z()
        v = self.to_model(x)
        free = self.labels().free_energies(self.energy(), v)
        return -free - self.class_log_z.to(v.dtype) + self.units.log_jacobian(self.scale)

    def class_log_prior(self) -> Tensor:
        """The model's own label marginal log p(y) = log Z_y - log Z."""
        self._require_conditional()
        self.ensure_log_z()
        return self.class_log_z - self.log_z

    def classify(self, x: Tensor) -> Tensor:
        """log p(y | x) = log softmax_y(-F(x, y)): exact, log Z cancels."""
        self._require_conditional()
        return torch.log_softmax(-self.labels().free_energies(self.energy(), self.to_model(x)), 1)

    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        """`sample_steps` Gibbs sweeps from draws of the base (independent-visibles) model; a conditional model
        clamps the label units to the requested classes (None: y ~ p(y))."""
        self.no_labels_unless_conditional(y)
        energy = self.clamped_energy(self.sample_labels(n, y) if self.conditional else None)
        v = self.units.sample(energy.base.expand(n, -1), energy.sigma)
        for _ in range(self.config.sample_steps):
            v = energy.gibbs(v)
        return self.to_data_space(self.units.to_data(v, self.shift, self.scale).reshape(n, *self.info.shape))

    def encode(self, x: Tensor) -> Tensor:
        """Hidden-unit probabilities p(h = 1 | v)."""
        return self.energy().h_given_v(self.to_model(x))
