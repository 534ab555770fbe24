"""Hidden Markov model trained by Baum-Welch (Baum et al. 1970; Rabiner 1989) as an EM family.

The data are viewed as sequences of frames (`to_sequences`): an image (C, H, W) as H rows of C*W
features, a vector (D,) as D one-dimensional steps, float sequences (T, D) as they are (rows that
contain NaN are padding), token sequences (T,) int64 as they are (-1 is padding). Float frames get
Gaussian emissions, tokens categorical ones. One training epoch is one exact Baum-Welch step: the
E-step statistics (expected start, transition and emission counts) are summed over batches and ranks
by `EMModel`, then `m_step` sets the maximum-likelihood parameters. Everything runs in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_modules.common.em import DTYPE, EMModel, Stats
from lightning_modules.common.gaussian import CovarianceType
from lightning_modules.contract import Conditional, ConfigError
from lightning_modules.hmm import forward_backward as fb
from lightning_modules.hmm.emissions import CategoricalEmission, GaussianEmission
from lightning_modules.hmm.sequences import from_sequences, sequence_layout, to_sequences


class HMM(EMModel):
    family = "hmm"
    log_prob_kind = "exact"

    @dataclass
    class Config:
        n_states: int = 16
        emission: Literal["auto", "gaussian", "categorical"] = "auto"  # auto: categorical for tokens
        covariance_type: CovarianceType = "full"  # gaussian emissions
        reg_covar: float = 1e-4  # added to every variance in the M-step (scikit-learn's reg_covar)
        pseudocount: float = 1e-2  # categorical: added to every expected emission count
        max_epochs: int = 100  # Baum-Welch iterations
        tol: float = 1e-3  # stop when the mean train log-likelihood per sequence changes less
        init_subsample: int = 10_000  # sequences used for the k-means / unigram initialisation
        kmeans_iters: int = 10  # gaussian: Lloyd steps after k-means++ seeding of the state means
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        steps, dim = sequence_layout(self.info)
        emission = c.emission if c.emission != "auto" else ("categorical" if self.info.vocab_size else "gaussian")
        if (emission == "categorical") != (self.info.vocab_size is not None):
            raise ConfigError("emission", f"{emission} does not fit {self.info.kind} data "
                              f"({'tokens' if self.info.vocab_size else 'floats'})")
        n = c.n_states
        self.register_buffer("startprob", torch.full((n,), 1.0 / n, dtype=DTYPE))
        self.register_buffer("transmat", torch.full((n, n), 1.0 / n, dtype=DTYPE))
        if emission == "categorical":
            self.emission = CategoricalEmission(n, dim, c.pseudocount)
        else:
            self.emission = GaussianEmission(n, dim, c.covariance_type, c.reg_covar, c.kmeans_iters)
        self.steps = steps

    # --- the HMM itself ---------------------------------------------------------------------------
    def set_parameters(self, startprob: Tensor, transmat: Tensor) -> None:
        self.startprob.copy_(startprob)
        self.transmat.copy_(transmat)

    def _log_emit(self, seq: Tensor) -> Tensor:
        b, t = seq.shape[:2]
        return self.emission.log_prob(seq.reshape(b * t, *seq.shape[2:])).view(b, t, -1)

    def posteriors(self, x: Tensor):
        seq, mask = to_sequences(x, self.info)
        return seq, mask, fb.forward_backward(self.startprob, self.transmat, self._log_emit(seq), mask)

    @torch.no_grad()
    def viterbi(self, x: Tensor) -> Tensor:
        """Most probable hidden state path (B, T), -1 on padding."""
        seq, mask = to_sequences(x, self.info)
        return fb.viterbi(self.startprob, self.transmat, self._log_emit(seq), mask)[0]

    # --- EM ---------------------------------------------------------------------------------------
    def initialize(self, x: Tensor) -> None:
        seq, mask = to_sequences(x, self.info)
        self.emission.initialize(seq[mask], self.config.seed)

    @torch.no_grad()
    def e_step(self, x: Tensor) -> Stats:
        seq, mask, post = self.posteriors(x)
        frames, gamma = seq[mask], post.gamma[mask]
        stats = {"loglik": post.loglik.sum(), "count": post.loglik.new_tensor(float(len(x))),
                 "start": post.gamma[:, 0].sum(0), "trans": post.trans_counts}
        stats.update({f"emission.{k}": v for k, v in self.emission.statistics(frames, gamma).items()})
        return stats

    @torch.no_grad()
    def m_step(self, stats: Stats) -> None:
        """Rabiner 1989, eqs. 40a-b (start and transition probabilities); emissions in `hmm_emissions`."""
        trans = stats["trans"]
        rows = trans.sum(1, keepdim=True)
        transmat = torch.where(rows > 0, trans / rows.clamp_min(torch.finfo(DTYPE).tiny), self.transmat)
        self.set_parameters(stats["start"] / stats["start"].sum(), transmat)
        self.emission.m_step({k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("emission.")})

    def n_parameters(self) -> int:
        n = self.startprob.numel()
        return (n - 1) + n * (n - 1) + self.emission.n_parameters()

    # --- the contract -----------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        seq, mask = to_sequences(x, self.info)
        return fb.loglik(self.startprob, self.transmat, self._log_emit(seq), mask)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior state occupancy: mean over the real time steps of p(z_t = n | x), shape (B, N)."""
        _, mask, post = self.posteriors(x)
        return (post.gamma.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).float()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        states = torch.empty(n, self.steps, dtype=torch.long, device=self.startprob.device)
        states[:, 0] = torch.multinomial(self.startprob, n, replacement=True)
        for t in range(1, self.steps):
            states[:, t] = torch.multinomial(self.transmat[states[:, t - 1]], 1).squeeze(1)
        frames = self.emission.sample(states.reshape(-1))
        return from_sequences(frames.reshape(n, self.steps, *frames.shape[1:]), self.info)

    def token_count(self, x: Tensor) -> Optional[Tensor]:
        """Real (non-padding) tokens per sequence, for perplexity = exp(sum NLL / sum tokens)."""
        if self.info.vocab_size is None:
            return None  # real-valued frames: no tokens, no perplexity
        return (x >= 0).sum(-1)
