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

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_modules.contract import Conditional, GenerativeModel
from lightning_modules.rbm.energy import RBMEnergy
from lightning_modules.rbm.units import GaussianUnits, Statistics, visible_units


class RBM(GenerativeModel):
    """RBM family. `train/loss` and `val/loss` are the mean-field reconstruction NLL (comparable between the
    two; CD has no objective whose value tracks the likelihood); `train/cd_objective` is the surrogate that
    is minimised. log Z is computed once when training ends and kept in the `log_z` buffer (checkpointed)."""

    family = "rbm"
    log_prob_kind = "estimate"  # AIS; exact (given the visible marginal) when n_hidden <= exact_max_hidden
    needs_init_data = True  # standardisation statistics and the base model's visible bias

    @dataclass
    class Config:
        visible: Literal["auto", "bernoulli", "gaussian"] = "auto"  # auto: Bernoulli for images, else Gaussian
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
        ais_steps: int = 10000  # length of the beta schedule
        exact_max_hidden: int = 20  # enumerate the 2^H hidden states up to this size instead of AIS
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        config = self.config
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
        x = self.init_data()
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
        return self.to_data_space(self.units.to_data(v, self.shift, self.scale).reshape(n, *self.info.shape))

    def encode(self, x: Tensor) -> Tensor:
        """Hidden-unit probabilities p(h = 1 | v)."""
        return self.energy().h_given_v(self.to_model(x))
