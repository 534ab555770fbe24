"""An RBM's energy function, its Gibbs sampler, its free energy and its partition function (exact by
enumeration over the hidden layer, or by annealed importance sampling)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.common.ais import AISResult, ais_log_z, beta_schedule
from lightning_modules.rbm.units import BernoulliUnits, sample_bernoulli


@dataclass
class RBMEnergy:
    """An RBM's parameters with the math on them. `beta` walks the AIS path of Salakhutdinov & Murray (2008,
    eq. 13) from a base RBM with zero weights: the joint energy at beta is
        (1 - beta) E_vis(v; base) + beta E(v, h),
    so beta = 0 is independent visibles with bias `base` (times 2^H uniform hidden states) and beta = 1 the RBM.
    """

    W: Tensor  # (D, H)
    b: Tensor  # (D,) visible bias
    c: Tensor  # (H,) hidden bias, or (N, H): one RBM per row of a batch of chains (label units clamped per chain)
    base: Tensor  # (D,) visible bias of the base model (which shares sigma), or (N, D) likewise
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
        h = sample_bernoulli(self.h_given_v(v, beta), generator)
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
        n_hidden = self.c.shape[-1]
        return float(self.units.log_partition(self.base, self.base, self.sigma)) + n_hidden * math.log(2.0)

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

    def anneal_step(self, v: Tensor, beta_prev: float, beta: float, fast: "RBMEnergy",
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """One AIS step from v: (log f_beta(v) - log f_beta_prev(v), one Gibbs sweep at beta), with f_beta =
        exp(-F(v, beta)) and one hidden input a(v) shared by both:
            -F(v, beta) = -(1 - beta) E_vis(v; base) - beta E_vis(v; b) + sum_j softplus(beta a_j(v)).
        The weight is computed in this energy's dtype; the visible draw runs on `fast` (a float32 copy)."""
        a = self.hidden_input(v)
        visible = self.units.energy(v, self.b, self.sigma) - self.units.energy(v, self.base, self.sigma)
        log_ratio = (beta_prev - beta) * visible + (F.softplus(beta * a) - F.softplus(beta_prev * a)).sum(-1)
        h = sample_bernoulli(torch.sigmoid(beta * a).to(fast.W.dtype), generator)
        v_next = fast.units.sample(fast.visible_input(h, beta), fast.sigma, generator).to(v.dtype)
        return log_ratio, v_next

    def log_z_ais(self, n_chains: int, n_steps: int, generator: Optional[torch.Generator] = None,
                  log_z_base: Optional[float] = None, transition_dtype: torch.dtype = torch.float32) -> AISResult:
        """AIS along the beta path with one Gibbs sweep per intermediate distribution. A batch of RBMs with one
        row of `c` and `base` per chain passes `log_z_base=0.0` and adds each row's own base log Z. The weights
        are accumulated in this energy's dtype; the visible draws run in `transition_dtype` (float32 by
        default: rounding the sampler's probabilities changes nothing measurable, and halves the cost)."""
        fast = self.detached(transition_dtype)
        return ais_log_z(
            step=lambda v, beta_prev, beta: self.anneal_step(v, beta_prev, beta, fast, generator),
            sample_base=lambda n: self.units.sample(self.base.expand(n, -1), self.sigma, generator),
            log_z_base=self.log_z_base() if log_z_base is None else log_z_base,
            betas=beta_schedule(n_steps),
            n_chains=n_chains,
        )
