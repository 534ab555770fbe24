"""Loading and validating params.yaml, the single config DVC tracks.

params.yaml is merged into a structured schema (dataclasses; each family contributes its own `Config`),
then command-line overrides in Hydra's grammar (`vae.latent_dim=8`, `family=vae`) are applied. Any
unknown key, family or dataset stops the run before work starts, with one line naming it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.contract import ConfigError, build_config, literal_choices
from lightning_modules.registry import FAMILIES, family_config
from pipeline.data.sources import validate_dataset_name
from pipeline.errors import GenzooError

PARAMS_FILE = "params.yaml"


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str = "data"  # raw downloads under <root>/raw, prepared splits under <root>/prepared
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    toy_samples: int = 20000  # toy2d only: examples in train+val+test
    holdout_class: Optional[int] = None  # a class left out of training, used as anomalies
    labels_per_class: Optional[int] = None  # semi-supervised: keep this many seeded training labels per class
    batch_size: int = 128
    num_workers: int = 0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: Optional[int] = None  # None: each family's own max_epochs
    seed: int = 0
    deterministic: bool = True
    compile: bool = False
    log_every_n_steps: int = 10


@dataclass
class FeatnetConfig:
    max_epochs: int = 60
    lr: float = 2e-3
    feature_dim: int = 64
    batch_size: int = 128


@dataclass
class FidConfig:
    features: str = "featnet"  # featnet | inception
    inception_weights: Optional[str] = None  # local InceptionV3 weights (torch-fidelity's FID weights file)


@dataclass
class EvalConfig:
    n_samples: int = 1000
    batch_size: int = 256
    seed: int = 0
    kid_subset_size: int = 100
    kid_subsets: int = 50
    grid_size: int = 64
    fid: FidConfig = field(default_factory=FidConfig)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: Optional[str] = None  # None: genzoo-<dataset>
    log_model: bool = True


def _plain_type(annotation):
    """OmegaConf has no `Literal`: a choice field is stored as its values' type, and `build_config`
    checks the choice."""
    choices = literal_choices(annotation)
    if choices is None:
        return annotation
    types = {type(c) for c in choices if c is not None}
    if len(types) > 1:  # e.g. `conditional`: auto | true | false
        return Any
    value_type = types.pop()
    return Optional[value_type] if None in choices else value_type


def omegaconf_schema(config_cls: type) -> type:
    """A family's Config as a dataclass OmegaConf can hold: same fields and defaults, plain types."""
    hints = typing.get_type_hints(config_cls)
    fields = [(f.name, _plain_type(hints[f.name]),
               field(default=f.default) if f.default_factory is dataclasses.MISSING else field(default_factory=f.default_factory))
              for f in dataclasses.fields(config_cls)]
    return dataclasses.make_dataclass(config_cls.__qualname__.replace(".", ""), fields)


def schema_class():
    """The full schema: the fixed sections plus one section per registered family."""
    fields = [
        ("families", List[str], field(default_factory=lambda: list(FAMILIES))),
        ("family", Optional[str], None),
        ("resume", bool, False),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
        ("featnet", FeatnetConfig, field(default_factory=FeatnetConfig)),
        ("eval", EvalConfig, field(default_factory=EvalConfig)),
        ("tracking", TrackingConfig, field(default_factory=TrackingConfig)),
    ]
    for name in FAMILIES:
        cls = omegaconf_schema(family_config(name))
        fields.append((name, cls, field(default_factory=cls)))
    return dataclasses.make_dataclass("GenzooConfig", fields)


def _valid_keys(node) -> str:
    return ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else "-"


def _unknown_key_error(cfg: DictConfig, dotted: str) -> GenzooError:
    parts = dotted.split(".")
    node, path = cfg, []
    for p in parts:
        if not isinstance(node, DictConfig) or p not in node:
            where = ".".join(path) or "top level"
            return GenzooError(f"unknown config key '{dotted}' (valid keys at {where}: {_valid_keys(node)})")
        node, path = node[p], path + [p]
    return GenzooError(f"bad value for config key '{dotted}'")


def parse_overrides(overrides: List[str]):
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's grammar errors are multi-line
        raise GenzooError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def load_config(overrides: Optional[List[str]] = None, params_file: str = PARAMS_FILE) -> DictConfig:
    path = Path(params_file)
    if not path.is_file():
        raise GenzooError(f"{params_file} not found (run genzoo from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise GenzooError(f"{params_file} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise GenzooError(f"{params_file} must hold a mapping of sections")

    cfg = OmegaConf.structured(schema_class())
    for section, value in raw.items():  # key by key, so an error names the exact key
        _merge_checked(cfg, section, value)
    for ov in parse_overrides(overrides or []):
        if ov.is_sweep_override():
            raise GenzooError(f"'{ov.input_line}' is a sweep: use `genzoo train -m ...` for multirun")
        key = ov.key_or_group
        value = ov.value()
        _merge_checked(cfg, key, value)
    validate(cfg)
    return cfg


def _merge_checked(cfg: DictConfig, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, DictConfig) or p not in node:
            raise _unknown_key_error(cfg, dotted)
        if i < len(parts) - 1:
            node = node[p]
    try:
        if isinstance(value, dict):
            for k, v in value.items():
                _merge_checked(cfg, f"{dotted}.{k}", v)
        else:
            OmegaConf.update(cfg, dotted, value, merge=True)
    except OmegaConfBaseException as e:
        raise GenzooError(f"bad value {value!r} for config key '{dotted}': {str(e).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    for fam in list(cfg.families) + ([cfg.family] if cfg.family else []):
        if fam not in FAMILIES:
            raise GenzooError(f"unknown family '{fam}' (choices: {', '.join(FAMILIES)})")
    for fam in FAMILIES:  # choices and ranges, checked by the family's own Config
        try:
            build_config(family_config(fam), family_section(cfg, fam))
        except ConfigError as e:
            raise GenzooError(f"bad value for config key '{fam}.{e.key}': {e.message}") from None
    validate_dataset_name(cfg.data.dataset)
    if cfg.eval.fid.features not in ("featnet", "inception"):
        raise GenzooError(f"eval.fid.features must be featnet or inception, not '{cfg.eval.fid.features}'")
    if cfg.eval.fid.features == "inception" and not cfg.eval.fid.inception_weights:
        raise GenzooError("eval.fid.features=inception needs eval.fid.inception_weights (a local weights file)")
    for key in ("val_fraction", "test_fraction"):
        v = cfg.data[key]
        if not 0 < v < 0.5:
            raise GenzooError(f"data.{key} must be in (0, 0.5), got {v}")
    per_class = cfg.data.labels_per_class
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise GenzooError(f"data.labels_per_class must be a positive integer or null, got {per_class!r}")


def require_family(cfg: DictConfig) -> str:
    if not cfg.family:
        raise GenzooError(f"say which family: family=<{'|'.join(FAMILIES)}>")
    return cfg.family


def family_section(cfg: DictConfig, family: str) -> dict:
    return OmegaConf.to_container(cfg[family], resolve=True)


def flatten(cfg: DictConfig) -> dict:
    """Dotted-key view of the resolved config, for MLflow params."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
