"""Hidden Markov model trained by Baum-Welch (Baum et al. 1970; Rabiner 1989) as an EM family.

The data are viewed as sequences of frames (`to_sequences`): an image (C, H, W) as H rows of C*W
features, a vector (D,) as D one-dimensional steps, float sequences (T, D) as they are (rows that
contain NaN are padding), token sequences (T,) int64 as they are (-1 is padding). Float frames get
Gaussian emissions, tokens categorical ones. One training epoch is one exact Baum-Welch step: the
E-step statistics (expected start, transition and emission counts) are summed over batches and ranks
by `EMModel`, then `m_step` sets the maximum-likelihood parameters (categorical: the MAP ones under
Dirichlet priors, `pseudocount` on the emissions and `transition_pseudocount` on the start and transition
rows). Parameters and statistics are float64; `precision` sets the E-step's forward-backward arithmetic
(auto: float32 for tokens, float64 for float frames); log_prob, Viterbi and the rest run in float64.

Token data start from the bigram (`init: bigram`, Jurafsky & Martin ch. 3 for the n-gram; the HMM as its
generalisation is Rabiner's discrete HMM): `states_per_token` states for every vocabulary entry, each
emitting (almost only) its own token, with the training split's bigram counts as transition counts and
the first tokens' counts as start counts, smoothed by `transition_pseudocount` (one state per token and
no emission pseudocount: exactly the add-k bigram, k = transition_pseudocount). Baum-Welch then only
raises the training likelihood from the bigram's; with two or more states per token (their rows jittered
apart) the states of a token learn to tell its contexts apart, which a bigram cannot. `text`, 2 states per
token (194), transition_pseudocount 0.03: test perplexity 10.8 for the add-k bigram, 10.9 at the start (the
jitter), 9.6 after 3 Baum-Welch steps and 7.9 after 12 (validation perplexity after 12 steps 9.93; with
`BIGRAM_JITTER` 0.5, transition_pseudocount 0.03, 0.1 and 0.3 gave 10.10, 10.16 and 10.25). A random start
with 16 states is at 15.5 after 10 steps and 11.7 after 100 (`_random_transitions`).

Conditional (P(X, Y)): one HMM of `n_states` states per class (Rabiner 1989 sec. VI, the isolated-word
recogniser), held as one HMM of K * N states in block layout (`common.class_blocks`): the transition
matrix is block-diagonal and the start probabilities sum to 1 within each block. A labelled sequence
runs in its class's HMM alone (its block's start, transitions and emission columns, so forward-backward
costs what one N-state HMM costs), and its posteriors go back into that block: one Baum-Welch step over
all sequences is exactly K per-class steps. log p(x | y = c) for every c is one forward pass over the K
HMMs side by side. Gaussian `tied` emissions share one covariance across the states of all classes.
Semi-supervised (UNLABELLED training labels, `common.semi_supervised`): an unlabelled sequence runs in
every class's HMM, and each run's posteriors count with the weight p(class | x).

Topology: ergodic (every transition allowed; the P(X) model) or left-to-right, the class models of the
isolated-word recogniser (Rabiner 1989 sec. VI, eq. 46): each class's N states are split evenly over
G = min(N, T) segments of the sequence, the chain starts in the first segment and moves only to the same
or the next one (Baum-Welch keeps the other transitions at zero), and each segment's states start from
k-means of the frames at that relative position. An ergodic HMM cannot tell a blank top row from a
blank bottom row, so its digit samples lose the row order; the left-to-right one keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_modules.common import class_blocks, semi_supervised
from lightning_modules.common.em import DTYPE, PRECISION_DTYPES, EMModel, Stats
from lightning_modules.common.gaussian import CovarianceType
from lightning_modules.contract import Conditional, ConfigError, TrainingSet, require_range
from lightning_modules.hmm import forward_backward as fb
from lightning_modules.hmm.emissions import CategoricalEmission, GaussianEmission
from lightning_modules.hmm.sequences import from_sequences, sequence_layout, to_sequences


# Dirichlet concentration of the random transition rows that start a categorical HMM (`HMM._random_transitions`)
TRANSITION_CONCENTRATION = 0.3
# The bigram start with several states per token: each transition weight times a seeded U(1 - j, 1 + j) draw, so
# that the states of a token start apart (identical states would stay identical under Baum-Welch). `text`, 2
# states per token, transition_pseudocount 0.03: validation perplexity after 12 steps 9.93 with 0.9, 10.10 with
# 0.5 (the start 13.87 and 13.50; the add-k bigram 13.34)
BIGRAM_JITTER = 0.9
# `init: auto` takes the bigram start up to this many states (a Baum-Welch step costs T x states^2 per sequence);
# a larger vocabulary starts from `n_states` random states instead
BIGRAM_AUTO_MAX_STATES = 512


class HMM(EMModel):
    family = "hmm"
    log_prob_kind = "exact"
    models_tokens = True  # categorical emissions

    @dataclass
    class Config:
        n_states: int = 16  # states of the HMM (conditional: of each class's); the bigram start sets its own
        emission: Literal["auto", "gaussian", "categorical"] = "auto"  # auto: categorical for tokens
        # the start: random = k-means of the frames (gaussian) or seeded random rows (categorical); bigram =
        # token data in an ergodic HMM, `states_per_token` states per vocabulary entry started from the training
        # split's smoothed bigram (`HMM._bigram_start`); auto: bigram for token data in an ergodic HMM (up to
        # `BIGRAM_AUTO_MAX_STATES` states)
        init: Literal["auto", "random", "bigram"] = "auto"
        states_per_token: int = 2  # the bigram start: vocabulary size * this many states (1: the bigram itself)
        covariance_type: CovarianceType = "full"  # gaussian emissions
        reg_covar: float = 1e-4  # added to every variance in the M-step (scikit-learn's reg_covar)
        # reg_covar when some training labels are UNLABELLED (semi-supervised EM and its initial guesses;
        # null: reg_covar). The unlabelled sequences' class posteriors then decide the fit; under the fine
        # default floor they hinge on near-constant pixels (digits, 10 labels per class, 3 seeds: test
        # accuracy 0.877 with null, 0.951 with 3e-2)
        semi_reg_covar: Optional[float] = 3e-2
        pseudocount: float = 1e-2  # categorical: added to every expected emission count
        # categorical: added to every expected start and transition count the topology allows (a Dirichlet prior,
        # MAP, hmmlearn's startprob_prior = transmat_prior = 1 + this); gaussian: not used (maximum likelihood)
        transition_pseudocount: float = 0.03
        max_epochs: int = 100  # Baum-Welch iterations
        token_max_epochs: int = 12  # token data: at most this many Baum-Welch iterations (and max_epochs)
        tol: float = 1e-3  # stop when the mean train log-likelihood per sequence changes less
        init_subsample: int = 10_000  # sequences used for the k-means / unigram initialisation
        kmeans_iters: int = 10  # gaussian: Lloyd steps after k-means++ seeding of the state means
        seed: int = 0
        conditional: Conditional = "auto"  # model P(X, Y) when the data have labels (auto), or P(X) alone
        # auto: left_to_right for the per-class HMMs of a conditional model, ergodic for P(X) alone
        topology: Literal["auto", "ergodic", "left_to_right"] = "auto"
        # the E-step's forward-backward arithmetic (float32: log p(x) within ~1e-6 relative of float64's, about
        # twice as fast); auto: float32 for token data, float64 for float frames
        precision: Literal["auto", "float64", "float32"] = "auto"

        def __post_init__(self):
            require_range(self, "n_states", "init_subsample", "states_per_token", "token_max_epochs", low=1)
            require_range(self, "kmeans_iters", low=0)  # 0: the k-means++ seeds alone
            require_range(self, "reg_covar", "pseudocount", "transition_pseudocount", "tol", low=0)
            require_range(self, "semi_reg_covar", low=0, optional=True)

        def fits_data(self, data: TrainingSet) -> None:
            """Gaussian emissions: k-means starts the states (conditional: each class's) from distinct frames
            of the training sequences, at least one per state."""
            if self.emission == "categorical" or (self.emission == "auto" and data.info.vocab_size):
                return  # categorical: started from the bigram or seeded random rows, whatever the data's size
            steps = sequence_layout(data.info)[0]
            if data.class_counts is None:
                frames = data.n_examples * steps
                if self.n_states > frames:
                    raise ConfigError("n_states", f"must be <= {frames} (the frames of the {data.n_examples} training "
                                                  f"sequences), not {self.n_states}")
                if self.n_states > self.init_subsample * steps:
                    raise ConfigError("init_subsample", f"must be >= {-(-self.n_states // steps)} (k-means starts each "
                                      f"of the {self.n_states} states from one frame of these sequences), "
                                      f"not {self.init_subsample}")
            elif not data.n_unlabelled:  # semi-supervised: the unlabelled sequences' guessed classes count too
                fewest = min(range(len(data.class_counts)), key=data.class_counts.__getitem__)
                frames = data.class_counts[fewest] * steps
                if self.n_states > frames:
                    raise ConfigError("n_states", f"must be <= {frames} (the frames of the training sequences of "
                                                  f"class {fewest}, the fewest), not {self.n_states}")

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        c = self.config
        steps, dim = sequence_layout(self.info)
        emission = c.emission if c.emission != "auto" else ("categorical" if self.info.vocab_size else "gaussian")
        if (emission == "categorical") != (self.info.vocab_size is not None):
            raise ConfigError("emission", f"{emission} does not fit {self.info.kind} data "
                              f"({'tokens' if self.info.vocab_size else 'floats'})")
        # K blocks (classes; 1 when unconditional) of `n_states` states, each split over `segments`
        self.n_blocks = self.num_classes or 1
        left_to_right = c.topology == "left_to_right" or (c.topology == "auto" and self.conditional)
        self.init_kind = c.init if c.init != "auto" else (
            "bigram" if emission == "categorical" and not left_to_right
            and c.states_per_token * dim <= BIGRAM_AUTO_MAX_STATES else "random")
        if self.init_kind == "bigram" and emission != "categorical":
            raise ConfigError("init", f"bigram needs token data (categorical emissions), not {self.info.kind} floats")
        if self.init_kind == "bigram" and left_to_right:
            raise ConfigError("init", "bigram needs an ergodic HMM (topology: ergodic), not a left-to-right one")
        # states per block: one class's HMM (conditional), or the HMM
        self.n_states = c.states_per_token * dim if self.init_kind == "bigram" else c.n_states
        self.segments = min(self.n_states, steps) if left_to_right else 1
        n = self.n_blocks * self.n_states
        self.estep_dtype = (PRECISION_DTYPES[c.precision] if c.precision != "auto"
                            else torch.float32 if emission == "categorical" else DTYPE)
        start, trans = (allowed.to(DTYPE) for allowed in self._topology())
        self.register_buffer("startprob", (start / start.sum()).repeat(self.n_blocks))
        self.register_buffer("transmat", torch.block_diag(*[trans / trans.sum(1, keepdim=True)] * self.n_blocks))
        if emission == "categorical":
            self.emission = CategoricalEmission(n, dim, c.pseudocount)
        else:
            self.emission = GaussianEmission(n, dim, c.covariance_type, c.reg_covar, c.kmeans_iters)
        self.steps = steps

    # --- the HMM itself ---------------------------------------------------------------------------
    def _state_segments(self) -> Tensor:
        """Each state's segment of the sequence, (N,) (one class's block; all 0 when ergodic)."""
        n = self.n_states
        return torch.arange(n) * self.segments // n

    def _topology(self):
        """(start (N,), transitions (N, N)) allowed in one class's HMM: from the first segment, to the
        same or the next segment (ergodic: one segment, everything allowed)."""
        seg = self._state_segments()
        return seg == 0, (seg[None, :] >= seg[:, None]) & (seg[None, :] <= seg[:, None] + 1)

    def _allowed(self):
        """(start (K * N,), transitions (K * N, K * N)) the topology allows in every class's block, as 0/1
        float64."""
        start, trans = (allowed.to(DTYPE) for allowed in self._topology())
        return start.repeat(self.n_blocks), torch.block_diag(*[trans] * self.n_blocks)

    def set_parameters(self, startprob: Tensor, transmat: Tensor) -> None:
        """Conditional: K * N states class by class, startprob summing to 1 within each class's block,
        transmat block-diagonal."""
        self.startprob.copy_(startprob)
        self.transmat.copy_(transmat)

    def _log_emit(self, seq: Tensor, dtype: torch.dtype = DTYPE) -> Tensor:
        """log p(x_t | z_t = n), (B, T, N), in dtype (categorical: the table rounded to it, then gathered)."""
        if isinstance(self.emission, CategoricalEmission):
            return self.emission.probs.log().to(dtype).T[seq]
        b, t = seq.shape[:2]
        return self.emission.log_prob(seq.reshape(b * t, *seq.shape[2:])).view(b, t, -1).to(dtype)

    @staticmethod
    def _forward_backward(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor, dtype) -> fb.Posteriors:
        """`fb.forward_backward` in `dtype` (the parameters and emission log-probabilities rounded to it), the
        posteriors and log-likelihoods returned in float64."""
        post = fb.forward_backward(start.to(dtype), trans.to(dtype), log_emit.to(dtype), mask)
        return fb.Posteriors(*(t.to(DTYPE) for t in post))

    def posteriors(self, x: Tensor, dtype: torch.dtype = DTYPE):
        seq, mask = to_sequences(x, self.info)
        return seq, mask, self._forward_backward(self.startprob, self.transmat, self._log_emit(seq, dtype), mask, dtype)

    # --- one HMM per class (conditional) ------------------------------------------------------------
    def _class_hmms(self, log_emit: Tensor):
        """Each class's HMM: start (K, N), transitions (K, N, N) (the diagonal blocks) and log_emit
        (B, T, K * N) -> (B, T, K, N)."""
        k, n = self.n_blocks, self.n_states
        trans = self.transmat.view(k, n, k, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return self.startprob.view(k, n), trans, log_emit.unflatten(-1, (k, n))

    def _in_class(self, log_emit: Tensor, y: Tensor):
        """Each sequence in its class's HMM only: start (B, N), transitions (B, N, N), log_emit (B, T, N)."""
        start, trans, log_emit = self._class_hmms(log_emit)
        y = y.to(log_emit.device)
        return start[y], trans[y], log_emit[torch.arange(len(y), device=y.device), :, y]

    def _class_posteriors(self, log_emit: Tensor, mask: Tensor, y: Tensor, dtype: torch.dtype = DTYPE):
        """Forward-backward of each labelled sequence in its class's HMM and of each UNLABELLED one in every
        class's (`semi_supervised.class_pairs`), the posteriors weighted by p(class | x) (1 for a known class)
        and put back in the class's block: gamma (B, T, K * N), transition counts (K * N, K * N),
        block-diagonal, and the `semi_supervised.PairPosterior`."""
        y = y.to(log_emit.device)
        rows, classes = semi_supervised.class_pairs(y, self.n_blocks)
        post = self._forward_backward(*self._in_class(log_emit[rows], classes), mask[rows], dtype)
        pairs = semi_supervised.pair_posteriors(post.loglik, rows, classes, y, self.label_log_prior)
        b, (t, n) = len(y), post.gamma.shape[1:]
        gamma = post.gamma.new_zeros(b, self.n_blocks, t, n)
        w = pairs.weights[:, None, None]
        # a pair of weight 0 may be an impossible class (log p(x | c) = -inf, NaN posteriors): it adds nothing
        gamma.index_put_((rows, classes), torch.where(w > 0, post.gamma * w, 0.0), accumulate=True)
        weighted = torch.where(w > 0, post.trans_counts * w, 0.0)
        counts = post.trans_counts.new_zeros(self.n_blocks, n, n).index_add_(0, classes, weighted)
        return gamma.transpose(1, 2).flatten(2), torch.block_diag(*counts), pairs

    @torch.no_grad()
    def viterbi(self, x: Tensor) -> Tensor:
        """Most probable hidden state path (B, T), -1 on padding (conditional: over all classes' states,
        from the joint start p(y) p(z_1 | y))."""
        seq, mask = to_sequences(x, self.info)
        start = self.startprob
        if self.conditional:
            start = start * class_blocks.repeat_per_block(self.class_log_prior().exp(), self.n_states).to(start)
        return fb.viterbi(start, self.transmat, self._log_emit(seq), mask)[0]

    # --- EM ---------------------------------------------------------------------------------------
    def label_features(self, x: Tensor) -> Tensor:
        """For guessing hidden labels at initialisation: the frames with padding zeroed, flattened (tokens:
        each sequence's token frequencies)."""
        seq, mask = to_sequences(x, self.info)
        if self.info.vocab_size is None:
            return seq.flatten(1)
        onehot = torch.nn.functional.one_hot(seq, self.info.vocab_size).to(DTYPE) * mask[..., None]
        return onehot.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)

    def initialize(self, x: Tensor, y: Optional[Tensor] = None, semi: bool = False) -> None:
        """The bigram start (`_bigram_start`), or emissions from the data (Gaussian: k-means) or seeded random
        rows (categorical), and with categorical emissions seeded random transitions too (`_random_transitions`)."""
        self._set_variance_floor(semi)
        seq, mask = to_sequences(x, self.info)
        if self.init_kind == "bigram":
            self._bigram_start(seq, mask, y)
            return
        if self.n_blocks * self.segments == 1:
            self.emission.initialize(seq[mask], self.config.seed)
        else:
            self.emission.initialize(seq[mask], self.config.seed, *self._init_groups(mask, y))
        if isinstance(self.emission, CategoricalEmission):
            self._random_transitions(self.config.seed)

    def _random_transitions(self, seed: int) -> None:
        """Sparse random rows, Dirichlet(0.3) over each state's allowed successors (its topology's, in its
        class's block), seeded (the stream [seed, 1]; the categorical emissions draw from [seed, 0]).
        Uniform transitions with emission rows that differ only by noise start next to the saddle of the
        i.i.d. unigram model, where Baum-Welch barely moves: `text`, 16 states, test perplexity 27.4 (the
        unigram's) after 10 steps and 12.7 after 100; from these rows 17.7 and 13.3 with Dirichlet(1),
        15.5 and 11.7 with Dirichlet(0.3) (seeds 0-4 after 10 steps: 14.4-17.0 against 16.9-19.3)."""
        _, allowed = self._topology()
        allowed = torch.block_diag(*[allowed.to(DTYPE)] * self.n_blocks)
        rng = np.random.default_rng([seed, 1])
        weights = torch.from_numpy(rng.standard_gamma(TRANSITION_CONCENTRATION, tuple(allowed.shape))) * allowed
        self.transmat.copy_(weights / weights.sum(1, keepdim=True))

    def _bigram_start(self, seq: Tensor, mask: Tensor, y: Optional[Tensor]) -> None:
        """States s * V + v (copy s of token v, s < `states_per_token` = S) in every class's block, set as the MAP
        M-step (`maximize`) sets them from counts that put each token in its own token's states, split evenly
        over them: transition weights c(a, b) / S^2 + transition_pseudocount between each copy of a and each of
        b, c(a, b) the times b follows a in the class's training sequences (times a seeded U(0.1, 1.9) jitter
        when S > 1, `BIGRAM_JITTER`, so that the copies start apart); start weights c(v first) / S +
        transition_pseudocount; emission counts c(v) / S + 1 on the state's own token, plus `pseudocount` on
        every token. With S = 1 and pseudocount 0 the HMM is the add-k bigram with k = transition_pseudocount,
        the start row that of the first token (`pipeline.evaluation.token_baselines`); with S > 1 and no jitter
        the add-(S^2 k) bigram, the start the add-(S k) one."""
        vocab, copies, k = self.info.vocab_size, self.config.states_per_token, self.n_blocks
        seq, mask = seq.cpu(), mask.cpu()
        block = y.cpu() if self.conditional else torch.zeros(len(seq), dtype=torch.long)
        block = block[:, None].expand(seq.shape)

        def counts(index: Tensor, size: int) -> Tensor:
            return torch.bincount(index, minlength=size).to(DTYPE)

        # padding is a suffix: a real token's successor is real where the successor's step is
        pairs = counts(((block[:, 1:] * vocab + seq[:, :-1]) * vocab + seq[:, 1:])[mask[:, 1:]], k * vocab * vocab)
        first = counts((block[:, 0] * vocab + seq[:, 0])[mask[:, 0]], k * vocab).view(k, vocab)
        tokens = counts((block * vocab + seq)[mask], k * vocab).view(k, vocab)
        alpha = self.config.transition_pseudocount
        start_allowed, allowed = self._allowed()
        weights = torch.block_diag(*[p.repeat(copies, copies) for p in pairs.view(k, vocab, vocab)]) / copies ** 2
        weights = weights + alpha * allowed
        if copies > 1:
            rng = np.random.default_rng([self.config.seed, 2])
            jitter = rng.uniform(1 - BIGRAM_JITTER, 1 + BIGRAM_JITTER, tuple(weights.shape))
            weights = weights * torch.from_numpy(jitter)
        rows = weights.sum(1, keepdim=True)  # 0: a token never followed in its class, and no pseudocount
        transmat = torch.where(rows > 0, weights / rows.clamp_min(torch.finfo(DTYPE).tiny), self.transmat.cpu())
        start = (first.repeat(1, copies) / copies + alpha).flatten() * start_allowed
        blocks = start.view(k, -1).sum(1, keepdim=True)  # 0: a class without sequences, and no pseudocount
        start = torch.where(blocks > 0, start.view(k, -1) / blocks.clamp_min(torch.finfo(DTYPE).tiny),
                            self.startprob.cpu().view(k, -1)).flatten()
        self.set_parameters(start.to(self.startprob), transmat.to(self.transmat))
        states = torch.arange(k * self.n_states)
        own = torch.zeros(len(states), vocab, dtype=DTYPE)
        own[states, states % vocab] = tokens.repeat(1, copies).flatten() / copies + 1.0
        self.emission.m_step({"counts": own.to(self.emission.probs)})

    def _init_groups(self, mask: Tensor, y: Optional[Tensor]):
        """Each real frame's group, class * G + its segment (relative position t * G // length), and each
        group's states: the emission initialisation of a conditional or left-to-right HMM."""
        g = self.segments
        steps = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
        segment = steps * g // mask.sum(1, keepdim=True).clamp_min(1)
        label = y.to(mask.device) if self.conditional else torch.zeros(len(mask), dtype=torch.long, device=mask.device)
        groups = (label[:, None] * g + segment)[mask]
        seg, n = self._state_segments(), self.n_states
        states = [c * n + (seg == s).nonzero().squeeze(1) for c in range(self.n_blocks) for s in range(g)]
        return groups, states

    def _few_threads(self, x: Tensor):
        """`fb.few_threads` for a batch x: one CPU thread while its time steps are small."""
        return fb.few_threads(len(x) * self.n_blocks * self.n_states ** 2, x.device)

    @torch.no_grad()
    def e_step(self, x: Tensor, y: Optional[Tensor] = None) -> Stats:
        with self._few_threads(x):
            return self._e_step(x, y)

    def _e_step(self, x: Tensor, y: Optional[Tensor]) -> Stats:
        stats = {}
        if self.conditional:
            seq, mask = to_sequences(x, self.info)
            gamma, trans_counts, pairs = self._class_posteriors(self._log_emit(seq, self.estep_dtype), mask, y,
                                                                self.estep_dtype)
            loglik = pairs.loglik
            stats.update(semi_supervised.class_statistics(pairs.class_resp, y.to(loglik.device), self.label_log_prior))
        else:
            seq, mask, post = self.posteriors(x, self.estep_dtype)
            loglik, gamma, trans_counts = post
        stats.update({"loglik": loglik.sum(), "count": loglik.new_tensor(float(len(x))),
                      "start": gamma[:, 0].sum(0), "trans": trans_counts})
        stats.update({f"emission.{k}": v for k, v in self.emission.statistics(seq[mask], gamma[mask]).items()})
        return stats

    @torch.no_grad()
    def maximize(self, stats: Stats, semi: bool) -> None:
        """Rabiner 1989, eqs. 40a-b (start and transition probabilities; categorical: plus
        `transition_pseudocount` on every count the topology allows, the MAP estimate); emissions in
        `hmm_emissions`."""
        trans, start = stats["trans"], stats["start"]
        if isinstance(self.emission, CategoricalEmission) and self.config.transition_pseudocount > 0:
            allowed_start, allowed_trans = (a.to(trans.device) for a in self._allowed())
            trans = trans + self.config.transition_pseudocount * allowed_trans
            start = start + self.config.transition_pseudocount * allowed_start
        rows = trans.sum(1, keepdim=True)
        transmat = torch.where(rows > 0, trans / rows.clamp_min(torch.finfo(DTYPE).tiny), self.transmat)
        # conditional: start counts normalised per class (off-block transition counts are exactly 0)
        start = class_blocks.normalize_blocks(start, self.n_blocks) if self.conditional else start / start.sum()
        self.set_parameters(start, transmat)
        self._set_variance_floor(semi)
        self.emission.m_step({k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("emission.")})

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.info.vocab_size is not None and self.current_epoch + 1 >= self.config.token_max_epochs:
            self.trainer.should_stop = True

    def _set_variance_floor(self, semi: bool) -> None:
        if isinstance(self.emission, GaussianEmission):
            self.emission.reg_covar = self.variance_floor(semi)

    def n_parameters(self) -> int:
        """Free start, transition (those the topology allows) and emission parameters of every class's HMM,
        and K - 1 for the class prior."""
        start, trans = self._topology()
        per_class = int(start.sum()) - 1 + int((trans.sum(1) - 1).sum())
        return (self.n_blocks - 1) + self.n_blocks * per_class + self.emission.n_parameters()

    # --- the contract -----------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """log p(x) by the forward algorithm; conditional: log p(x | y) (start in y's block), or the
        marginal over classes when y is None."""
        self.no_labels_unless_conditional(y)
        if self.conditional and y is None:
            return self.marginal_log_prob(x)
        seq, mask = to_sequences(x, self.info)
        with self._few_threads(x):
            if self.conditional:
                return fb.loglik(*self._in_class(self._log_emit(seq), y), mask)
            return fb.loglik(self.startprob, self.transmat, self._log_emit(seq), mask)

    @torch.no_grad()
    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """log p(x | y = c) for every class, (B, K): one forward pass over the K class HMMs side by side."""
        self._require_conditional()
        seq, mask = to_sequences(x, self.info)
        return fb.loglik(*self._class_hmms(self._log_emit(seq)), mask)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior state occupancy: mean over the real time steps of p(z_t = n | x), shape (B, N)
        (conditional: of the K * N states of all classes, p(y = c | x) p(z_t = n | x, c))."""
        if not self.conditional:
            _, mask, post = self.posteriors(x)
            return (post.gamma.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).float()
        seq, mask = to_sequences(x, self.info)
        *_, class_ll, gamma = fb.state_posteriors(*self._class_hmms(self._log_emit(seq)), mask)  # (B, T, K, N)
        posterior = torch.softmax(class_ll + self.class_log_prior().to(class_ll), 1)
        occupancy = gamma.sum(1) / mask.sum(1).clamp_min(1)[:, None, None]
        return (posterior[..., None] * occupancy).flatten(1).float()

    @torch.no_grad()
    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        """Ancestral samples (conditional: of classes y, or y ~ p(y); the path stays in its class's block)."""
        self.no_labels_unless_conditional(y)
        states = torch.empty(n, self.steps, dtype=torch.long, device=self.startprob.device)
        if self.conditional:
            states[:, 0] = class_blocks.sample_in_blocks(self.startprob, self.sample_labels(n, y), self.n_blocks)
        else:
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
