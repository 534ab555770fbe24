"""The one contract every family keeps (see DESIGN.md), so evaluation and report never branch on family.

Data space: images are float tensors in [0, 1] of shape (C, H, W); vectors are (D,); sequences are
(T, D) floats or (T,) integer tokens padded with -1. Discrete image data is *dequantised* (uniform noise
within each of `levels` bins), so every density is a density on the continuous data space and the
discrete-data NLL bound is `-log p(y) + D log(levels)` (Theis et al. 2016, "A note on the evaluation of
generative models").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

import pytorch_lightning as pl
from torch import Tensor

LOG_PROB_KINDS = ("exact", "lower_bound", "estimate")


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


class GenerativeModel(pl.LightningModule):
    """Base of every family. Subclasses set the class attributes and implement `sample`.

    `log_prob(x)` returns the natural-log density of each example in data space; `log_prob_kind`
    says whether it is exact, a lower bound or a stochastic estimate (None: the family has none).
    """

    family: ClassVar[str] = ""
    log_prob_kind: ClassVar[Optional[str]] = None
    # EM-style families need every rank to see a disjoint shard of the data with no padding, so that
    # summed sufficient statistics equal the single-device ones exactly.
    exact_sharding: ClassVar[bool] = False
    # Parameter sharding (FSDP) makes sense for big gradient-trained nets with automatic optimisation;
    # EM families keep buffers, the RBM and the GAN step their optimisers by hand.
    supports_fsdp: ClassVar[bool] = False

    def __init__(self, cfg: dict, info: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": dict(cfg), "info": dict(info)}, logger=False)  # the train stage logs the whole config
        self.cfg = dict(cfg)
        self.info = DataInfo.from_dict(info)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["genzoo_family"] = self.family  # lets `genzoo sample` load a bare checkpoint

    # --- the contract -------------------------------------------------------------------------
    def sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.family} has no likelihood")

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.family} has no encoder")

    def n_parameters(self) -> int:
        """Free parameters of the fitted model (the cost table's count). Default: every trainable weight;
        EM families, whose parameters are buffers, count their free parameters themselves."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def token_count(self, x: Tensor) -> Optional[Tensor]:
        """Real tokens per example for models of token sequences (perplexity is per token); None otherwise."""
        return None

    def anomaly_score(self, x: Tensor) -> Tensor:
        """Higher = more anomalous. Default: the negative log-likelihood."""
        return -self.log_prob(x)

    def forward(self, x: Tensor) -> Tensor:
        """Served through MLflow's pyfunc, a generative model scores data: its anomaly score."""
        return self.anomaly_score(x)

    @classmethod
    def has_log_prob(cls) -> bool:
        return cls.log_prob_kind is not None

    @classmethod
    def has_encoder(cls) -> bool:
        return cls.encode is not GenerativeModel.encode
