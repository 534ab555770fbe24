"""The shared shape of EM-style families (GMM, HMM) inside Lightning, and the same loop without one.

`training_step` runs the E-step on a batch and adds its sufficient statistics to accumulators; the
epoch end all-reduces (sums) them across ranks and runs the M-step. With `exact_sharding` each rank sees
a disjoint shard, so one epoch is one exact EM step whatever the number of devices (Dempster, Laird &
Rubin 1977; the distributed form is the "sum the statistics" map-reduce EM of Chu et al. 2006).
`fit_em` runs the same `start_em` / `e_step` / `m_step` on in-memory data (tests).

A conditional model (P(X, Y), `lightning_modules.common.class_blocks`) gets the labels too: `initialize(x, y)`
and `e_step(x, y)`; an unconditional one is called with x alone, as before. Labels may be UNLABELLED
(semi-supervised EM, `common.semi_supervised`): the E-step then treats the class as latent, the M-step
re-estimates the class prior (`reestimate_class_prior`) and uses `semi_reg_covar`, and `start_em`
initialises on guessed labels (an initialisation subsample that holds every labelled example first).

An EM family's Config has `seed`, `init_subsample`, `tol`, `reg_covar` and `semi_reg_covar` fields.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_modules.common import semi_supervised
from lightning_modules.contract import UNLABELLED, GenerativeModel

Stats = Dict[str, Tensor]
DTYPE = torch.float64  # EM parameters and statistics
Precision = Literal["float64", "float32"]  # a `precision` option: the dtype of the E-step's arithmetic
PRECISION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class EMModel(GenerativeModel):
    log_prob_kind = "exact"
    exact_sharding = True
    needs_init_data = True
    semi_supervised_method = ("semi-supervised EM: the class latent for unlabelled examples, p(y) re-estimated "
                              "(Miller & Uyar 1997; Nigam et al. 2000)")

    def __init__(self, cfg: dict, info: dict):
        super().__init__(cfg, info)
        self.automatic_optimization = False
        self.register_buffer("initialized", torch.tensor(False))
        # last epoch's mean log-likelihood, for the tolerance stop; a buffer so a resumed run stops where
        # an uninterrupted one would
        self.register_buffer("previous_loglik", torch.tensor(float("nan"), dtype=DTYPE))
        # DistributedDataParallel refuses a module with no trainable parameter, and EM keeps its parameters
        # in buffers: this empty one lets Lightning's DDP wrap the module. It never receives a gradient.
        self.ddp_anchor = nn.Parameter(torch.zeros(0))
        self._stats: Stats = {}

    # --- what a family implements -----------------------------------------------------------------
    def initialize(self, x: Tensor, y: Optional[Tensor] = None, semi: bool = False) -> None:
        """Set initial parameters from a seeded subsample of the training data (same on every rank);
        `y`: its labels, for a conditional model (`semi`: some were UNLABELLED and are guesses)."""
        raise NotImplementedError

    def e_step(self, x: Tensor, y: Optional[Tensor] = None) -> Stats:
        """Sufficient statistics of a batch, summed over its examples. Must include `loglik` (sum of
        per-example log-likelihoods under the current parameters: log p(x | y) for a conditional model,
        log p(x) for an UNLABELLED example) and `count`; a conditional model's also hold
        `semi_supervised.class_statistics`."""
        raise NotImplementedError

    def maximize(self, stats: Stats, semi: bool) -> None:
        """Set the parameters from summed statistics (`semi`: they hold UNLABELLED examples); the class
        prior is `m_step`'s."""
        raise NotImplementedError

    def m_step(self, stats: Stats) -> None:
        self.maximize(stats, self._saw_unlabelled(stats))
        self.reestimate_class_prior(stats)

    def label_features(self, x: Tensor) -> Tensor:
        """Vectors (N, F) of the examples on which hidden labels are guessed at initialisation
        (`semi_supervised.impute_labels`). Default: x flattened."""
        return x.reshape(len(x), -1).to(DTYPE)

    # --- shared steps -----------------------------------------------------------------------------
    def start_em(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """`initialize`; conditional with UNLABELLED labels: on the labels guessed by
        `semi_supervised.impute_labels`, then `PSEUDO_LABEL_STEPS` EM steps with the guesses taken as
        known, so that semi-supervised EM starts from per-class models fitted to them rather than from
        their k-means start (its unlabelled posteriors then revise every guess)."""
        if not self.conditional:
            self.initialize(x)
        elif not bool((y == UNLABELLED).any()):
            self.initialize(x, y)
        else:
            guessed = semi_supervised.impute_labels(self.label_features(x), y, self.num_classes,
                                                    self.variance_floor(semi=True), self.config.seed)
            self.initialize(x, guessed, semi=True)
            for _ in range(semi_supervised.PSEUDO_LABEL_STEPS):
                self.maximize(self.e_step(x, guessed), semi=True)

    def variance_floor(self, semi: bool) -> float:
        """The `reg_covar` added to every variance in an M-step: `semi_reg_covar` (where set) when some
        training labels are UNLABELLED."""
        semi_reg = self.config.semi_reg_covar
        return semi_reg if semi and semi_reg is not None else self.config.reg_covar

    def reestimate_class_prior(self, stats: Stats) -> None:
        """The M-step of p(y) when UNLABELLED examples were seen (labelled counts + expected counts of the
        rest); with every label known it stays the training labels' frequencies (`set_class_prior`)."""
        if self._saw_unlabelled(stats):
            self.label_log_prior.copy_(semi_supervised.reestimated_log_prior(stats))

    @staticmethod
    def _saw_unlabelled(stats: Stats) -> bool:
        """Whether these statistics hold UNLABELLED examples (conditional models count them)."""
        return "unlabelled" in stats and stats["unlabelled"].item() > 0

    def _init_subsample(self, n_total: int) -> Tensor:
        """Seeded indices of at most `init_subsample` training examples; with UNLABELLED labels the labelled
        examples come first (so every labelled example seeds the initialisation)."""
        g = torch.Generator().manual_seed(self.config.seed)
        n = min(n_total, self.config.init_subsample)
        order = torch.randperm(n_total, generator=g)
        if self.conditional:
            hidden = (self.init_labels()[order] == UNLABELLED).cpu()
            if bool(hidden.any()):
                order = torch.cat([order[~hidden], order[hidden]])
        return order[:n]

    # --- Lightning plumbing -------------------------------------------------------------------------
    def configure_optimizers(self):
        return None

    def on_train_epoch_start(self) -> None:
        if not bool(self.initialized):
            x = self.init_data()
            idx = self._init_subsample(len(x))
            if self.conditional:
                self.start_em(x[idx].to(self.device), self.init_labels()[idx].to(self.device))
            else:
                self.start_em(x[idx].to(self.device))
            self.initialized.fill_(True)
        self._stats = {}

    def training_step(self, batch, batch_idx):
        stats = self.e_step(batch[0], batch[1]) if self.conditional else self.e_step(batch[0])
        for k, v in stats.items():
            self._stats[k] = self._stats[k] + v if k in self._stats else v.detach().clone()

    def on_train_epoch_end(self) -> None:
        stats = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._stats.items())}
        loglik = (stats["loglik"] / stats["count"]).item()
        self.m_step(stats)
        self.log("train/loglik", loglik, on_epoch=True, rank_zero_only=True)
        self.log("train/loss", -loglik, on_epoch=True, rank_zero_only=True)
        if abs(loglik - self.previous_loglik.item()) < self.config.tol:  # False while previous is NaN
            self.trainer.should_stop = True
        self.previous_loglik.fill_(loglik)

    def validation_step(self, batch, batch_idx):
        nll = -self.log_prob(batch[0]).mean()
        self.log("val/loss", nll, on_epoch=True, sync_dist=True, batch_size=len(batch[0]))


def sum_stats(parts: List[Stats]) -> Stats:
    """The statistics of several blocks of examples as one: every entry is a sum over examples."""
    return {k: sum((p[k] for p in parts[1:]), parts[0][k]) for k in parts[0]}


def fit_em(model: EMModel, x: Tensor, max_iter: int, tol: float = 0.0, y: Optional[Tensor] = None) -> List[float]:
    """Runs up to `max_iter` EM steps on all of x (with its labels y for a conditional model); returns the
    mean log-likelihood per example seen by each E-step (under the parameters before its M-step). Stops
    when it changes by less than `tol`."""
    model.no_labels_unless_conditional(y)
    if model.conditional and y is None:
        raise ValueError(f"this {model.family} model is conditional: fit it with the labels y")
    args = (x, y) if model.conditional else (x,)
    if not bool(model.initialized):
        model.start_em(*args)
        model.initialized.fill_(True)
    history: List[float] = []
    for _ in range(max_iter):
        stats = model.e_step(*args)
        history.append((stats["loglik"] / stats["count"]).item())
        model.m_step(stats)
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            break
    return history
