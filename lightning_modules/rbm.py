"""Restricted Boltzmann machine: binary hidden units over Bernoulli or unit-variance Gaussian visible units,
trained by contrastive divergence CD-k (Hinton 2002) or persistent CD (Tieleman 2008), with log Z by exact
enumeration over the hidden layer or by annealed importance sampling (Salakhutdinov & Murray 2008).

Energy  E(v, h) = E_vis(v; b) - c.h - (v/sigma)'Wh,  with  E_vis(v; b) = -b.v  and sigma = 1   (Bernoulli)
                                                            E_vis(v; b) = sum_i (v_i - b_i)^2 / 2 sigma_i^2  (Gaussian)
Free energy  F(v) = -log sum_h exp(-E(v, h)) = E_vis(v; b) - sum_j softplus(c_j + (v/sigma)'W_j),  p(v) = e^-F(v) / Z.

Data space (so NLLs compare across families):
- Bernoulli: b = (x > 0.5); the density on [0, 1]^D is P_RBM(b(x)) 2^D, uniform within each half-cube, and a
  sample is (b + u) / 2 with u ~ U[0, 1).
- Gaussian (Krizhevsky 2009, "Learning multiple layers of features from tiny images", sec. 1.4.1; Cho et al.
  2011 learn log sigma the same way): the RBM models z = (x - shift) / scale, standardised with training-data
  statistics, with learned per-visible sigma (1 at the start); the Jacobian adds -sum(log scale).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.ais import AISResult, ais_log_z, beta_schedule
from lightning_modules.contract import DataInfo, GenerativeModel

Statistics = Tuple[Tensor, Tensor, Tensor]  # shift, scale, base visible bias


# --- visible units: the only place the two RBM kinds differ -------------------------------------------
class BernoulliUnits:
    """Binary visibles: E_vis(v; b) = -b.v, p(v_i = 1 | h) = sigmoid(b_i + W_i.h)."""

    name = "bernoulli"  # sigma is always 1 and ignored
    default_lr, default_init_std = 0.05, 0.01

    @staticmethod
    def over_sigma(v: Tensor, sigma: Tensor) -> Tensor:
        return v

    @staticmethod
    def times_sigma(a: Tensor, sigma: Tensor) -> Tensor:
        return a

    @staticmethod
    def energy(v: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        return -(v * bias).sum(-1)

    @staticmethod
    def sample(pre: Tensor, sigma: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(pre), generator=generator)

    @staticmethod
    def log_likelihood(v: Tensor, pre: Tensor, sigma: Tensor) -> Tensor:
        """log p(v | h) given the visible input pre = b + Wh."""
        return (v * pre - F.softplus(pre)).sum(-1)

    @staticmethod
    def log_partition(pre: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        """log sum_v exp(-E_vis(v; bias) + v.(pre - bias)) = sum_i softplus(pre_i)."""
        return F.softplus(pre).sum(-1)

    @staticmethod
    def statistics(x: Tensor) -> Statistics:
        """Base bias = logit of the Laplace-smoothed pixel marginals (Salakhutdinov & Murray 2008's base
        model; also Hinton 2010 guide sec. 8's initial visible bias)."""
        p = ((x > 0.5).sum(0).double() + 1) / (len(x) + 2)
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1]), torch.logit(p).float()

    @staticmethod
    def to_model(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return (x > 0.5).to(shift.dtype)

    @staticmethod
    def to_data(v: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return (v + torch.rand_like(v)) / 2

    @staticmethod
    def log_jacobian(scale: Tensor) -> float:
        """log of the data-space density per unit of P(b): each half-cube has volume 2^-D."""
        return scale.numel() * math.log(2.0)


class GaussianUnits:
    """Gaussian visibles: E_vis(v; b) = sum_i (v_i - b_i)^2 / 2 sigma_i^2, p(v | h) = N(b + sigma * Wh, sigma^2)."""

    name = "gaussian"
    default_lr, default_init_std = 0.003, 0.5
    min_scale = 1e-3  # a constant input dimension would have an infinite density

    @staticmethod
    def over_sigma(v: Tensor, sigma: Tensor) -> Tensor:
        return v / sigma

    @staticmethod
    def times_sigma(a: Tensor, sigma: Tensor) -> Tensor:
        return a * sigma

    @staticmethod
    def energy(v: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        return 0.5 * ((v - bias) / sigma).square().sum(-1)

    @staticmethod
    def sample(pre: Tensor, sigma: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return pre + sigma * torch.randn(pre.shape, generator=generator, device=pre.device, dtype=pre.dtype)

    @staticmethod
    def log_likelihood(v: Tensor, pre: Tensor, sigma: Tensor) -> Tensor:
        return (-0.5 * ((v - pre) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def log_partition(pre: Tensor, bias: Tensor, sigma: Tensor) -> Tensor:
        """log int exp(-sum (v - bias)^2 / 2 sigma^2 + v.(pre - bias) / sigma^2) dv, by completing the square."""
        per_dim = (pre.square() - bias.square()) / (2 * sigma.square()) + sigma.log() + 0.5 * math.log(2 * math.pi)
        return per_dim.sum(-1)

    @classmethod
    def statistics(cls, x: Tensor) -> Statistics:
        x = x.double()
        scale = x.std(0).clamp_min(cls.min_scale)
        return x.mean(0).float(), scale.float(), torch.zeros(x.shape[1])

    @staticmethod
    def to_model(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return (x - shift) / scale

    @staticmethod
    def to_data(v: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return v * scale + shift

    @staticmethod
    def log_jacobian(scale: Tensor) -> Tensor:
        return -scale.log().sum()


UNITS = {u.name: u for u in (BernoulliUnits, GaussianUnits)}


def visible_units(visible: str, info: DataInfo):
    """`auto`: Bernoulli for images (binarised), Gaussian for real vectors."""
    if visible == "auto":
        visible = "bernoulli" if info.kind == "image" else "gaussian"
    if visible not in UNITS:
        raise ValueError(f"rbm.visible must be auto, bernoulli or gaussian, not '{visible}'")
    return UNITS[visible]


# --- the energy function and its annealing path -----------------------------------------------------
@dataclass
class RBMEnergy:
    """An RBM's parameters with the math on them. `beta` walks the AIS path of Salakhutdinov & Murray (2008,
    eq. 13) from a base RBM with zero weights: the joint energy at beta is
        (1 - beta) E_vis(v; base) + beta E(v, h),
    so beta = 0 is independent visibles with bias `base` (times 2^H uniform hidden states) and beta = 1 the RBM.
    """

    W: Tensor  # (D, H)
    b: Tensor  # (D,) visible bias
    c: Tensor  # (H,) hidden bias
    base: Tensor  # (D,) visible bias of the base model (which shares sigma)
    sigma: Tensor  # (D,) visible standard deviations (Gaussian units; ignored by Bernoulli units)
    units: type

    def detached(self, dtype: torch.dtype = torch.float64) -> "RBMEnergy":
        t = lambda p: p.detach().to(dtype)  # noqa: E731
        return RBMEnergy(t(self.W), t(self.b), t(self.c), t(self.base), t(self.sigma), self.units)

    def hidden_input(self, v: Tensor, beta: float = 1.0) -> Tensor:
        return beta * (self.units.over_sigma(v, self.sigma) @ self.W + self.c)

    def visible_input(self, h: Tensor, beta: float = 1.0) -> Tensor:
        """The visible units' conditional parameter: logits (Bernoulli) or mean (Gaussian)."""
        pre = self.b + self.units.times_sigma(h @ self.W.T, self.sigma)
        return pre if beta == 1.0 else (1 - beta) * self.base + beta * pre

    def visible_energy(self, v: Tensor, beta: float = 1.0) -> Tensor:
        e = self.units.energy(v, self.b, self.sigma)
        return e if beta == 1.0 else (1 - beta) * self.units.energy(v, self.base, self.sigma) + beta * e

    def free_energy(self, v: Tensor, beta: float = 1.0) -> Tensor:
        return self.visible_energy(v, beta) - F.softplus(self.hidden_input(v, beta)).sum(-1)

    def h_given_v(self, v: Tensor, beta: float = 1.0) -> Tensor:
        """p(h_j = 1 | v) = sigmoid(beta (c_j + v'W_j))."""
        return torch.sigmoid(self.hidden_input(v, beta))

    def gibbs(self, v: Tensor, beta: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """One block-Gibbs sweep v -> h -> v' at inverse temperature beta."""
        h = torch.bernoulli(self.h_given_v(v, beta), generator=generator)
        return self.units.sample(self.visible_input(h, beta), self.sigma, generator)

    def reconstruction_log_likelihood(self, v: Tensor) -> Tensor:
        """log p(v | h = E[h | v]): the mean-field reconstruction (Hinton 2010 guide sec. 5), a training monitor."""
        return self.units.log_likelihood(v, self.visible_input(self.h_given_v(v)), self.sigma)

    def pseudo_log_likelihood(self, v: Tensor) -> Tensor:
        """sum_i log p(v_i | v_-i) = sum_i log sigmoid(F(v with bit i flipped) - F(v)) (Besag 1975), binary v only.
        Flipping bit i changes the hidden input by s_i W_i and the visible energy by -b_i s_i, s_i = 1 - 2 v_i."""
        if self.units is not BernoulliUnits:
            raise ValueError("pseudo-likelihood needs binary visibles")
        a = v @ self.W + self.c
        s = 1 - 2 * v
        hidden_change = F.softplus(a[:, None, :] + s[:, :, None] * self.W).sum(-1) - F.softplus(a).sum(-1)[:, None]
        delta_f = -self.b * s - hidden_change  # F(v_flip) - F(v), shape (B, D)
        return F.logsigmoid(delta_f).sum(-1)

    # --- the partition function ------------------------------------------------------------------------
    def log_z_base(self) -> float:
        return float(self.units.log_partition(self.base, self.base, self.sigma)) + self.c.numel() * math.log(2.0)

    def log_z_enumerate(self, chunk: int = 1 << 14) -> float:
        """Exact log Z = log sum_h exp(c.h) int/sum_v exp(-E_vis(v; b) + (v/sigma)'Wh): 2^H terms, each closed-form
        in v (the visible input is pre = b + sigma Wh)."""
        n_hidden = self.c.numel()
        bits = torch.arange(n_hidden, device=self.W.device)
        parts = []
        for start in range(0, 1 << n_hidden, chunk):
            idx = torch.arange(start, min(start + chunk, 1 << n_hidden), device=self.W.device)
            h = ((idx[:, None] >> bits) & 1).to(self.W.dtype)
            log_v = self.units.log_partition(self.visible_input(h), self.b, self.sigma)
            parts.append(torch.logsumexp(h @ self.c + log_v, 0))
        return float(torch.logsumexp(torch.stack(parts), 0))

    def log_z_ais(self, n_chains: int, n_steps: int, generator: Optional[torch.Generator] = None) -> AISResult:
        """AIS along the beta path with one Gibbs sweep per intermediate distribution."""
        return ais_log_z(
            log_f=lambda v, beta: -self.free_energy(v, beta),
            transition=lambda v, beta: self.gibbs(v, beta, generator),
            sample_base=lambda n: self.units.sample(self.base.expand(n, -1), self.sigma, generator),
            log_z_base=self.log_z_base(),
            betas=beta_schedule(n_steps),
            n_chains=n_chains,
        )


# --- the family ---------------------------------------------------------------------------------------
class RBM(GenerativeModel):
    """RBM family. `train/loss` and `val/loss` are the mean-field reconstruction NLL (comparable between the
    two; CD has no objective whose value tracks the likelihood); `train/cd_objective` is the surrogate that
    is minimised. log Z is computed once when training ends and kept in the `log_z` buffer (checkpointed)."""

    family = "rbm"
    log_prob_kind = "estimate"  # AIS; exact (given the visible marginal) when n_hidden <= exact_max_hidden

    @dataclass
    class Config:
        visible: str = "auto"  # auto | bernoulli | gaussian (auto: Bernoulli for images, else Gaussian)
        n_hidden: int = 64
        learn_sigma: bool = True  # Gaussian visibles: learn log sigma_i (else sigma = 1 on standardised data)
        cd_k: int = 1  # Gibbs sweeps per negative phase
        persistent: bool = False  # PCD (Tieleman 2008) instead of CD-k from the data (Hinton 2002)
        n_chains: int = 128  # persistent chains
        lr: Optional[float] = None  # None: 0.05 (Bernoulli) or 0.003 (Gaussian: Hinton 2010 guide sec. 13.2)
        momentum: float = 0.9
        weight_decay: float = 1e-4  # L2 on the weights only (Hinton 2010 guide sec. 10)
        # None: 0.01 (Bernoulli, Hinton 2010 guide sec. 8) or 0.5 (Gaussian: on standardised data, small weights
        # sit at a saddle where the data and the model have the same covariance and the gradient vanishes)
        init_std: Optional[float] = None
        max_epochs: int = 60
        sample_steps: int = 1000  # Gibbs sweeps per `sample` call, from the base model
        ais_chains: int = 100
        ais_steps: int = 5000  # length of the beta schedule
        exact_max_hidden: int = 20  # enumerate the 2^H hidden states up to this size instead of AIS
        seed: int = 0

    def __init__(self, cfg: dict, info: dict):
        config = self.Config(**cfg)  # fills defaults, rejects unknown keys
        super().__init__(asdict(config), info)
        self.config = config
        self.units = visible_units(config.visible, self.info)
        d, h = self.info.dim, config.n_hidden
        g = torch.Generator().manual_seed(config.seed)
        init_std = self.units.default_init_std if config.init_std is None else config.init_std
        self.lr = self.units.default_lr if config.lr is None else config.lr
        self.W = nn.Parameter(torch.randn(d, h, generator=g) * init_std)
        self.b = nn.Parameter(torch.zeros(d))
        self.c = nn.Parameter(torch.zeros(h))
        if self.units is GaussianUnits and config.learn_sigma:
            self.log_sigma = nn.Parameter(torch.zeros(d))
        else:
            self.register_buffer("log_sigma", torch.zeros(d))
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        self.register_buffer("base", torch.zeros(d))
        self.register_buffer("chains", torch.zeros(config.n_chains if config.persistent else 0, d))
        self.register_buffer("data_ready", torch.tensor(False))
        self.register_buffer("log_z", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("log_z_exact", torch.tensor(False))

    def energy(self) -> RBMEnergy:
        return RBMEnergy(self.W, self.b, self.c, self.base, self.log_sigma.exp(), self.units)

    def to_model(self, x: Tensor) -> Tensor:
        return self.units.to_model(x.flatten(1), self.shift, self.scale)

    # --- data statistics, set once before the first update ----------------------------------------------
    @torch.no_grad()
    def set_statistics(self, stats: Statistics) -> None:
        shift, scale, base = (t.to(self.device) for t in stats)
        self.shift.copy_(shift)
        self.scale.copy_(scale)
        self.base.copy_(base)
        self.b.copy_(base)  # start at the independent-visibles model
        if self.config.persistent:
            self.chains.copy_(self.units.sample(base.expand(len(self.chains), -1), self.log_sigma.exp()))
        self.data_ready.fill_(True)

    def _training_statistics(self) -> Statistics:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "split"):
            x = dm.split("train")[0]
        else:
            x = torch.cat([batch[0] for batch in self.trainer.train_dataloader])
        # rank 0's statistics everywhere: parameters initialised from them must agree across DDP ranks
        return self.trainer.strategy.broadcast(self.units.statistics(x.flatten(1).cpu()), src=0)

    # --- training -----------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.log_z.fill_(float("nan"))
        self.log_z_exact.fill_(False)
        if not bool(self.data_ready):
            self.set_statistics(self._training_statistics())

    @torch.no_grad()
    def negative_phase(self, energy: RBMEnergy, v: Tensor) -> Tensor:
        """k Gibbs sweeps from the data (CD-k) or from the persistent chains (PCD), which then move on."""
        chain = self.chains if self.config.persistent else v
        for _ in range(self.config.cd_k):
            chain = energy.gibbs(chain)
        if self.config.persistent:
            self.chains.copy_(chain)
        return chain

    def cd_step(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(CD objective to minimise, reconstruction NLL to monitor) on a batch; advances PCD chains."""
        v = self.to_model(x)
        energy = self.energy()
        negative = self.negative_phase(energy, v)
        # Its gradient is dF/dtheta at the data minus at the (detached) model samples: the CD estimate of
        # -d log p / dtheta (Hinton 2002), so DDP gradient averaging and SGD with momentum apply unchanged.
        cd_objective = energy.free_energy(v).mean() - energy.free_energy(negative).mean()
        with torch.no_grad():
            recon = -energy.reconstruction_log_likelihood(v).mean()
        return cd_objective, recon

    def training_step(self, batch, batch_idx):
        cd_objective, recon = self.cd_step(batch[0])
        n = len(batch[0])
        self.log("train/loss", recon, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/cd_objective", cd_objective.detach(), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=n)
        return cd_objective

    def validation_step(self, batch, batch_idx):
        v = self.to_model(batch[0])
        recon = -self.energy().reconstruction_log_likelihood(v).mean()
        self.log("val/loss", recon, on_epoch=True, sync_dist=True, batch_size=len(v))

    def configure_optimizers(self):
        biases = [p for p in (self.b, self.c, self.log_sigma) if isinstance(p, nn.Parameter)]
        groups = [{"params": [self.W], "weight_decay": self.config.weight_decay},
                  {"params": biases, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.config.momentum)

    def on_train_end(self) -> None:
        self.refresh_log_z()

    # --- log Z ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_log_z(self) -> None:
        """Exact by enumeration when the hidden layer is small, else AIS (seeded: the same on every rank)."""
        energy = self.energy().detached(torch.float64)
        exact = self.config.n_hidden <= self.config.exact_max_hidden
        if exact:
            log_z = energy.log_z_enumerate()
        else:
            g = torch.Generator(device=self.device).manual_seed(self.config.seed)
            log_z = energy.log_z_ais(self.config.ais_chains, self.config.ais_steps, g).log_z
        self.log_z.fill_(log_z)
        self.log_z_exact.fill_(exact)

    # --- the contract --------------------------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        if torch.isnan(self.log_z):
            self.refresh_log_z()
        v = self.to_model(x)
        return -self.energy().free_energy(v) - self.log_z.to(v.dtype) + self.units.log_jacobian(self.scale)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """`sample_steps` Gibbs sweeps from draws of the base (independent-visibles) model."""
        energy = self.energy()
        v = self.units.sample(self.base.expand(n, -1), energy.sigma)
        for _ in range(self.config.sample_steps):
            v = energy.gibbs(v)
        return self.units.to_data(v, self.shift, self.scale).reshape(n, *self.info.shape)

    def encode(self, x: Tensor) -> Tensor:
        """Hidden-unit probabilities p(h = 1 | v)."""
        return self.energy().h_given_v(self.to_model(x))
