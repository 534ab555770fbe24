"""One-hot label units joined to the hidden layer: the classification RBM of Larochelle & Bengio (2008,
"Classification using discriminative restricted Boltzmann machines", sec. 2).

    E(v, h, y) = E(v, h) - d_y - h'U_y,     U: (K, H) label weights,  d: (K,) label bias.

For a fixed class y this is an ordinary RBM whose hidden bias is c + U_y (`clamp`), hence
    F(v, y) = E_vis(v) - d_y - sum_j softplus(c_j + (v/sigma)'W_j + U_yj)        (their eq. 3),
    p(y | v) = softmax_y(-F(v, y))        exact: the hidden layer sums out in closed form (their eq. 2),
    p(y | h) = softmax_y(d_y + h'U_y)     the label units' Gibbs conditional,
    Z_y = e^{d_y} Z(RBM with hidden bias c + U_y),   Z = sum_y Z_y,   p(y) = Z_y / Z.

Each class also has its own base model (independent visibles fitted to that class's training data): the start
of its AIS path and of its sampling chains, so that a clamped chain starts among the class's own modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.rbm.energy import RBMEnergy
from lightning_modules.rbm.units import sample_bernoulli


@dataclass
class LabelUnits:
    U: Tensor  # (K, H)
    d: Tensor  # (K,)
    base: Tensor  # (K, D) visible bias of each class's base model

    def detached(self, dtype: torch.dtype = torch.float64) -> "LabelUnits":
        return LabelUnits(*(t.detach().to(dtype) for t in (self.U, self.d, self.base)))

    def clamp(self, energy: RBMEnergy, y) -> RBMEnergy:
        """The RBM over (v, h) with the label units clamped to y, with the class's base model: a scalar class,
        or one class per row (hidden bias and base are then (N, H) and (N, D), one row per chain)."""
        return replace(energy, c=energy.c + self.U[y], base=self.base[y])

    def free_energies(self, energy: RBMEnergy, v: Tensor) -> Tensor:
        """F(v, y) for every class, (B, K): one hidden input shared by all classes."""
        hidden = energy.hidden_input(v)[:, None, :] + self.U  # (B, K, H)
        return energy.visible_energy(v)[:, None] - self.d - F.softplus(hidden).sum(-1)

    @staticmethod
    def marginal_free_energy(free_energies: Tensor) -> Tensor:
        """F(v) = -log sum_y e^{-F(v, y)} from the per-class free energies (B, K): the free energy of v with the
        label summed out as a latent, whose gradient is the posterior-weighted sum_y p(y | v) dF(v, y)/dtheta
        (the positive phase of -log p(x) for an unlabelled example, Larochelle & Bengio 2008 sec. 4)."""
        return -torch.logsumexp(-free_energies, -1)

    def free_energy(self, energy: RBMEnergy, v: Tensor, y: Tensor) -> Tensor:
        """F(v, y) for one class per row, (B,)."""
        return self.clamp(energy, y).free_energy(v) - self.d[y]

    def gibbs(self, energy: RBMEnergy, v: Tensor, y: Tensor,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """One block-Gibbs sweep of the joint chain (v, y) -> h -> (v', y'): v' and y' are independent given h."""
        h = sample_bernoulli(self.clamp(energy, y).h_given_v(v), generator)
        v = energy.units.sample(energy.visible_input(h), energy.sigma, generator)
        y = torch.multinomial(torch.softmax(self.d + h @ self.U.T, -1), 1, generator=generator)[:, 0]
        return v, y

    # --- the partition function, one term per class ----------------------------------------------------
    def class_log_z(self, energy: RBMEnergy, exact: bool, n_chains: int = 100, n_steps: int = 10000,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """(log Z_y for every class, (K,) float64; the AIS log weights, (K, n_chains), or None when exact):
        exact enumeration of each clamped RBM, or AIS with `n_chains` chains per class, all classes annealed
        together as one batch of chains."""
        k = len(self.d)
        log_w = None
        if exact:
            log_z = torch.tensor([self.clamp(energy, c).log_z_enumerate() for c in range(k)], dtype=torch.float64)
        else:
            clamped = self.clamp(energy, torch.arange(k, device=self.d.device).repeat_interleave(n_chains))
            log_w = clamped.log_z_ais(k * n_chains, n_steps, generator, log_z_base=0.0).log_weights.view(k, n_chains).cpu()
            log_z_base = torch.tensor([self.clamp(energy, c).log_z_base() for c in range(k)], dtype=torch.float64)
            log_z = log_z_base + torch.logsumexp(log_w, 1) - math.log(n_chains)
        return log_z + self.d.detach().double().cpu(), log_w
