"""The one contract every family keeps (docs/ARCHITECTURE.md), so the pipeline and evaluation never
branch on a family's name nor probe it for attributes: everything they may ask is declared here, with
a default.

Data space: images are float tensors in [0, 1] of shape (C, H, W); vectors are (D,); sequences are
(T, D) floats or (T,) integer tokens padded with -1. Discrete image data is *dequantised* (uniform noise
within each of `levels` bins), so every density is a density on the continuous data space and the
discrete-data NLL bound is `-log p(y) + D log(levels)` (Theis et al. 2016, "A note on the evaluation of
generative models").

P(X, Y): with `conditional` on and labelled data (`DataInfo.num_classes`), a family models the joint
distribution p(x, y) = p(x | y) p(y). `log_prob(x)` stays the marginal log sum_y p(x | y) p(y),
`log_prob(x, y)` is the class-conditional, `class_log_joint(x)` gives log p(x, y) for every class,
`classify(x)` the posterior log p(y | x) (Bayes' rule) and `sample(n, y)` draws the requested classes
(y = None: y ~ p(y), then x ~ p(x | y)).

Config: each family declares a `Config` dataclass that owns its defaults (params.yaml agrees with them,
tests/test_config.py checks it). Enumerated choices are `Literal` types; `build_config` fills the
defaults, rejects unknown keys and checks every choice, in this one place; ranges are checked in the
Config's `__post_init__` (`require`, `require_range`), and settings that must fit the training set (no more
mixture components than examples) in its optional `fits_data(TrainingSet)`, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor

LogProbKind = Literal["exact", "lower_bound", "estimate"]
LOG_PROB_KINDS = typing.get_args(LogProbKind)
# Every family's `conditional` Config field: model P(X, Y) when the data have labels. The train stage
# resolves `auto` (true when every class has training examples) before it builds the model, so a
# checkpoint always holds a plain true / false.
Conditional = Literal["auto", True, False]
# Semi-supervised training (`data.labels_per_class`): a training batch's label is UNLABELLED where the
# example's label is hidden. A conditional family then trains its own semi-supervised objective (labelled
# examples by their class, the others with the class as a latent variable); `classify` is its p(y | x).
UNLABELLED = -1


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about the data to size itself."""

    shape: tuple  # one example, e.g. (1, 8, 8), (2,), (8, 8) for sequences of 8-d rows, (T,) for tokens
    kind: str  # "image" | "vector" | "sequence"
    levels: Optional[int] = None  # discrete intensity levels (17 for digits, 256 for MNIST); None = continuous
    num_classes: Optional[int] = None
    vocab_size: Optional[int] = None  # categorical sequences only

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        return cls(**{**d, "shape": tuple(d["shape"])})


# --- config ---------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A bad family config value; `key` names the field (the pipeline prefixes the family)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class TrainingDiverged(RuntimeError):
    """Raised by a family, identically on every rank, when its training has failed for good (a GAN whose
    discriminator won outright, or whose generator collapsed to one point): the train stage stops and ends
    the run FAILED with the message, as it does for a non-finite loss, and writes no finished model."""


def literal_choices(annotation) -> Optional[Tuple]:
    """The allowed values of a `Literal[...]` (or `Optional[Literal[...]]`) annotation, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        inner = [literal_choices(a) for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return inner[0] + (None,)
    return None


def build_config(config_cls: type, values: Mapping[str, Any]):
    """`config_cls` filled from `values` (defaults for the rest). Unknown keys and values outside a
    field's `Literal` choices raise ConfigError; a Config's `__post_init__` checks its ranges."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    for key in values:
        if key not in names:
            raise ConfigError(key, f"unknown key (valid: {', '.join(names)})")
    config = config_cls(**values)
    hints = typing.get_type_hints(config_cls)
    for name in names:
        choices = literal_choices(hints[name])
        value = getattr(config, name)
        if choices is not None and value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}, not {value!r}")
    # the fields every family has (`GenerativeModel.__init_subclass__`)
    require_range(config, "max_epochs", low=1)
    require_range(config, "seed", **SEED_RANGE)
    return config


def require(condition: bool, key: str, message: str) -> None:
    """A range check for a Config's `__post_init__`."""
    if not condition:
        raise ConfigError(key, message)


# numpy's generators and Lightning's `seed_everything` take unsigned 32-bit seeds (Lightning replaces one
# outside them by a random seed, with a warning)
SEED_RANGE = {"low": 0, "high": 2**32 - 1}


def out_of_range(value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 optional: bool = False) -> Optional[str]:
    """None where `value` is a finite number within the bounds (or None, where `optional`); else what is
    allowed, as "must be >= 1, not 0" (a Config's `require_range` and the pipeline's own sections share it)."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return None
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        allowed = f"{'<' if high_open else '<='} {high}"
    else:
        allowed = "a finite number"
    return f"must be {allowed}{' or null' if optional else ''}, not {value!r}"


def require_range(config, *keys: str, **bounds) -> None:
    """A range check of numeric fields for a Config's `__post_init__`: each of `keys` is a finite number
    within `bounds` (`out_of_range`'s keywords: low, high, low_open, high_open, optional)."""
    for key in keys:
        problem = out_of_range(getattr(config, key), **bounds)
        if problem is not None:
            raise ConfigError(key, problem)


def progress(items, description: str, total: Optional[int] = None):
    """`items` in a tqdm bar labelled `description` (gone once done) when stderr is a terminal, else `items`
    itself: the long evaluation steps (AIS, likelihood bounds, sampling, feature extraction) show progress to
    a person and print nothing into logs, CI or DVC's captured output."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


@dataclass(frozen=True)
class TrainingSet:
    """What a Config's optional `fits_data(training_set)` checks its settings against (through
    `GenerativeModel.check_fits_data`, which the train stage calls before any work starts)."""

    info: DataInfo
    n_examples: int  # training examples
    # a conditional model's training examples per class whose label is visible (else None), and the number
    # whose label is hidden (UNLABELLED: semi-supervised training)
    class_counts: Optional[Tuple[int, ...]] = None
    n_unlabelled: int = 0


# --- the base class -------------------------------------------------------------------------------
class GenerativeModel(pl.LightningModule):
    """Base of every family. A family sets the class attributes below, defines `Config` and implements
    `sample`; the rest of the contract has defaults.

    `log_prob(x)` returns the natural-log density of each example in data space; `log_prob_kind` says
    whether it is exact, a lower bound or a stochastic estimate (None: the family has none).
    """

    family: ClassVar[str] = ""
    Config: ClassVar[type]  # a dataclass with every default; it has at least `seed`, `max_epochs`, `conditional`
    log_prob_kind: ClassVar[Optional[LogProbKind]] = None
    # EM-style families need every rank to see a disjoint shard of the data with no padding, so that
    # summed sufficient statistics equal the single-device ones exactly (the data module then also keeps
    # the training set's dequantisation noise fixed).
    exact_sharding: ClassVar[bool] = False
    # Parameter sharding (FSDP) makes sense for big gradient-trained nets with automatic optimisation;
    # EM families keep buffers, the RBM and the GAN step their optimisers by hand.
    supports_fsdp: ClassVar[bool] = False
    # Families initialised from the training set (k-means, data statistics): the pipeline hands it over
    # with `provide_init_data` before fitting, identically on every rank.
    needs_init_data: ClassVar[bool] = False
    # Families with a discrete model of integer token sequences (`DataInfo.vocab_size`). The others model a
    # density on a continuous space: fitted to token ids, their NLL would sit in the same column as a true
    # discrete NLL without being one, so the pipeline refuses token data for them.
    models_tokens: ClassVar[bool] = False
    # Families whose `sample` takes a `temperature` keyword.
    takes_temperature: ClassVar[bool] = False
    # What a conditional family trains when some training labels are UNLABELLED, in a few words with its
    # reference (the report's semi-supervised table).
    semi_supervised_method: ClassVar[str] = "the class as a latent variable of the joint model"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.log_prob_kind is not None and cls.log_prob_kind not in LOG_PROB_KINDS:
            raise TypeError(f"{cls.__name__}.log_prob_kind must be one of {LOG_PROB_KINDS} or None")
        config = cls.__dict__.get("Config")
        if config is not None:  # the fields the pipeline reads from every family
            missing = {"seed", "max_epochs", "conditional"} - {f.name for f in dataclasses.fields(config)}
            if missing:
                raise TypeError(f"{cls.__name__}.Config needs the field(s) {sorted(missing)}")

    def __init__(self, cfg: Mapping[str, Any], info: Mapping[str, Any]):
        super().__init__()
        self.config = build_config(self.Config, cfg)
        self.info = DataInfo.from_dict(dict(info))
        # the full config, so a checkpoint rebuilds the model whatever the defaults become later;
        # the train stage logs the whole pipeline config itself
        self.save_hyperparameters({"cfg": asdict(self.config), "info": self.info.to_dict()}, logger=False)
        self._init_data: Optional[Tensor] = None
        self._init_labels: Optional[Tensor] = None
        conditional = self.config.conditional
        if conditional is True and not self.info.num_classes:
            raise ConfigError("conditional", "the data have no labels (use auto or false)")
        # the number of classes when the model is of P(X, Y), else None
        self.num_classes: Optional[int] = self.info.num_classes if conditional in (True, "auto") else None
        if self.num_classes:
            # log p(y), from the training labels' counts (`set_class_prior`); uniform until then
            self.register_buffer("label_log_prior", torch.full((self.num_classes,), -math.log(self.num_classes),
                                                               dtype=torch.float64))
            # the fraction of training examples whose label was visible (`set_class_prior`); below 1 the model
            # trained semi-supervised, which a family whose classifier then differs reads (`semi_supervised`)
            self.register_buffer("labelled_fraction", torch.ones((), dtype=torch.float64))
        # the prepared data this model was trained on, {"dataset", "data_hash"} (the manifest's content hash):
        # the train stage sets it, every checkpoint carries it, and a load for other data is refused
        self.trained_on: Optional[Dict[str, str]] = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["genzoo_family"] = self.family  # lets `genzoo sample` load a bare checkpoint
        checkpoint["genzoo_data"] = self.trained_on

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.trained_on = checkpoint.get("genzoo_data")

    # --- the contract -------------------------------------------------------------------------
    def sample(self, n: int, y: Optional[Tensor] = None) -> Tensor:
        """n samples in data space (images within [0, 1]: see `to_data_space`); for a conditional model
        `y` (n,) asks for classes (None: y ~ p(y), see `sample_labels`)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """log p(x), or log p(x | y) for labels `y` (B,) of a conditional model."""
        raise NotImplementedError(f"{self.family} has no likelihood")

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def can_classify(self) -> bool:
        """Whether `classify` gives p(y | x): a conditional model with a likelihood."""
        return self.conditional and self.has_log_prob()

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """log p(x | y = c) for every class, shape (B, K). Default: `log_prob(x, y)` once per class; a
        family that gets all classes in one pass overrides it."""
        self._require_conditional()
        return torch.stack([self.log_prob(x, torch.full((len(x),), c, dtype=torch.long, device=x.device))
                            for c in range(self.num_classes)], 1)

    def class_log_joint(self, x: Tensor) -> Tensor:
        """log p(x, y = c) = log p(x | c) + log p(c), shape (B, K)."""
        ll = self.class_log_likelihoods(x)
        return ll + self.class_log_prior().to(device=ll.device, dtype=ll.dtype)

    def classify(self, x: Tensor) -> Tensor:
        """log p(y | x) by Bayes' rule, shape (B, K)."""
        if not self.can_classify():
            raise NotImplementedError(f"{self.family} cannot classify (it is unconditional or has no likelihood)")
        return torch.log_softmax(self.class_log_joint(x), 1)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = log sum_y p(x | y) p(y), for a family's `log_prob(x)` when it is conditional."""
        return torch.logsumexp(self.class_log_joint(x), 1)

    def class_log_prior(self) -> Tensor:
        """log p(y), (K,). Default: the training labels' frequencies; a family whose joint model has its own
        label marginal (the classification RBM) overrides it."""
        self._require_conditional()
        return self.label_log_prior

    @torch.no_grad()
    def set_class_prior(self, y: Tensor) -> None:
        """log p(y) from the training labels (a class without examples gets probability 0); UNLABELLED
        entries are not counted, so with a few labels per class the prior is their (balanced) counts."""
        self._require_conditional()
        y = y.long().cpu()
        counts = torch.bincount(y[y != UNLABELLED], minlength=self.num_classes).double()
        self.label_log_prior.copy_((counts / counts.sum()).log())
        self.labelled_fraction.fill_(counts.sum().item() / max(len(y), 1))

    @property
    def semi_supervised(self) -> bool:
        """Whether this conditional model was trained with hidden labels (`data.labels_per_class`)."""
        return self.conditional and float(self.labelled_fraction) < 1.0

    def sample_labels(self, n: int, y=None) -> Tensor:
        """The classes to sample: `y` as a LongTensor (n,) (an int: n of it), or n draws from p(y)."""
        self._require_conditional()
        device = self.label_log_prior.device
        if y is None:
            return torch.multinomial(self.class_log_prior().exp().float(), n, replacement=True).to(device)
        y = torch.as_tensor(y, dtype=torch.long, device=device)
        y = y.expand(n).clone() if y.dim() == 0 else y
        if len(y) != n or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"labels must be {n} classes in 0..{self.num_classes - 1}")
        return y

    def _require_conditional(self) -> None:
        if not self.conditional:
            raise ValueError(f"this {self.family} model was trained without labels (conditional=false)")

    def no_labels_unless_conditional(self, y) -> None:
        """For a family's `log_prob` / `sample`: labels only make sense to a conditional model."""
        if y is not None:
            self._require_conditional()

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.family} has no encoder")

    def n_parameters(self) -> int:
        """Free parameters of the fitted model (the cost table's count). Default: every trainable weight;
        EM families, whose parameters are buffers, count their free parameters themselves."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def token_count(self, x: Tensor) -> Optional[Tensor]:
        """Real tokens per example for models of token sequences (perplexity is per token); None otherwise."""
        return None

    def likelihood_diagnostics(self) -> Dict[str, float]:
        """Diagnostics of an estimated likelihood, logged beside `test/nll` as `test/<name>` (the RBM's AIS:
        effective sample size and the standard error of log Z). Default: none."""
        return {}

    def anomaly_score(self, x: Tensor) -> Tensor:
        """Higher = more anomalous. Default: the negative log-likelihood."""
        return -self.log_prob(x)

    def forward(self, x: Tensor) -> Tensor:
        """Served through MLflow's pyfunc: p(y | x) (B, K) where the model classifies, else the anomaly score."""
        return self.classify(x).exp() if self.can_classify() else self.anomaly_score(x)

    def sample_quality_every_n_epochs(self) -> Optional[int]:
        """Keep the checkpoint with the best sample quality (validation FID), measured every this many
        epochs, instead of the last one; None (the default): the last checkpoint is the model."""
        return None

    def selects_on_sample_quality(self) -> bool:
        """Whether the best-FID checkpoint (see `sample_quality_every_n_epochs`) becomes the model; False
        keeps the FID curve but the last checkpoint, for a model whose purpose is not its samples alone."""
        return True

    def sample_sweep(self) -> Dict[str, Dict[str, Any]]:
        """Further settings of `sample` for the evaluate stage to score as well: {suffix: keyword arguments}
        (a diffusion model's guidance scales, {"w2": {"guidance": 2.0}}; {} names the default setting, whose
        samples are already scored); each setting's FID, KID, precision and recall are logged as
        `<metric>_<suffix>`. Default: none."""
        return {}

    def check_fits_data(self, train_labels: Tensor) -> None:
        """Raises ConfigError naming the key where a setting asks more of the training set than it holds (a
        mixture of more components than there are examples), so that the train stage, which calls this before
        any work starts (and before its MLflow run opens), refuses it in one line instead of failing mid-fit.
        `train_labels` (N,): the training labels as the model gets them (UNLABELLED where hidden). Default: the
        Config's `fits_data(TrainingSet)`, where it defines one (an optional method, like `__post_init__`)."""
        fits_data = getattr(self.config, "fits_data", None)
        if fits_data is None:
            return
        counts, hidden = None, 0
        if self.conditional:
            y = torch.as_tensor(train_labels).long().cpu()
            visible = y[y != UNLABELLED]
            counts = tuple(int(c) for c in torch.bincount(visible, minlength=self.num_classes))
            hidden = len(y) - len(visible)
        fits_data(TrainingSet(self.info, len(train_labels), counts, hidden))

    def nll_kind(self) -> Optional[LogProbKind]:
        """The kind of this instance's `log_prob`, as evaluation reports it: the family's `log_prob_kind`,
        unless a setting of the instance changes it (an RBM whose log Z is enumerated is exact)."""
        return self.log_prob_kind

    @classmethod
    def has_log_prob(cls) -> bool:
        return cls.log_prob_kind is not None

    @classmethod
    def has_encoder(cls) -> bool:
        return cls.encode is not GenerativeModel.encode

    # --- helpers for the families -------------------------------------------------------------
    def to_data_space(self, x: Tensor) -> Tensor:
        """Model output -> data space: images clipped to [0, 1], anything else unchanged."""
        return x.clamp(0, 1) if self.info.kind == "image" else x

    def provide_init_data(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """The training set in data space (and its labels), for a family with `needs_init_data` (kept by
        reference, not checkpointed: a resumed run restores the initialised parameters instead)."""
        self._init_data, self._init_labels = x, y

    def init_data(self) -> Tensor:
        if self._init_data is None:
            raise RuntimeError(f"{self.family} initialises from the training data: call "
                               "model.provide_init_data(x_train, y_train) before fitting")
        return self._init_data

    def init_labels(self) -> Tensor:
        """The training labels handed over with `provide_init_data` (a conditional family needs them)."""
        if self._init_labels is None:
            raise RuntimeError(f"{self.family} is conditional: call model.provide_init_data(x_train, y_train)")
        return self._init_labels
