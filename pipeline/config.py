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
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.contract import SEED_RANGE, ConfigError, build_config, literal_choices, out_of_range
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
    image_size: Optional[int] = None  # imagefolder: resize to image_size x image_size (None: keep; one size for all)
    channels: Optional[int] = None  # imagefolder: 1 (grayscale) or 3 (RGB); None: 1 when every image is grayscale
    label_column: Optional[str] = "label"  # csv: the label column (None: no labels; a missing `label`: no labels)
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
    device: str = "auto"  # auto (the trainer's accelerator) | cpu | cuda | cuda:<index> | mps
    fid: FidConfig = field(default_factory=FidConfig)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: Optional[str] = None  # None: genzoo-<dataset slug>
    log_model: bool = True
    register: bool = False  # evaluate registers the logged model as genzoo-<dataset slug>-<family>
    champion_metric: str = "test/nll"  # the alias `champion` goes to the registered version best by this metric
    champion_mode: str = "min"  # min: lower is better (test/nll, test/fid); max: higher (test/probe_acc)


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


def bad_value(key: str, message: str) -> GenzooError:
    """The one error line of a bad config value: the key, what is allowed and the value."""
    return GenzooError(f"bad value for config key '{key}': {message}")


# The numeric keys of the fixed sections and their ranges (`contract.out_of_range`'s keywords). A key of a
# fixed section is checked here, by a choice in `validate`, or by its type alone (booleans, free strings):
# tests/test_config_values.py gives every key a bad value and expects it refused.
RANGES = {
    "data.seed": SEED_RANGE,
    "data.val_fraction": dict(low=0, high=0.5, low_open=True, high_open=True),
    "data.test_fraction": dict(low=0, high=0.5, low_open=True, high_open=True),
    "data.toy_samples": dict(low=3),  # one example each for train, val and test at the least
    "data.holdout_class": dict(low=0, optional=True),  # and a class of the dataset: `runtime.check_data_settings`
    "data.labels_per_class": dict(low=1, optional=True),
    "data.image_size": dict(low=1, optional=True),
    "data.batch_size": dict(low=1),
    "data.num_workers": dict(low=0),
    "trainer.num_nodes": dict(low=1),
    "trainer.max_epochs": dict(low=1, optional=True),
    "trainer.seed": SEED_RANGE,
    "trainer.log_every_n_steps": dict(low=1),
    "featnet.max_epochs": dict(low=1),
    "featnet.lr": dict(low=0, low_open=True),
    "featnet.feature_dim": dict(low=1),
    "featnet.batch_size": dict(low=1),
    "eval.n_samples": dict(low=4),  # k-NN precision and recall: each sample's 3 nearest neighbours
    "eval.batch_size": dict(low=1),
    "eval.seed": SEED_RANGE,
    "eval.kid_subset_size": dict(low=2),  # KID's unbiased estimate compares pairs within a subset
    "eval.kid_subsets": dict(low=1),
    "eval.grid_size": dict(low=1),
}


def _trainer_choices() -> dict:
    """What Lightning's Trainer accepts for accelerator, strategy and precision (its registries and its
    `precision` annotation), so that a typo is refused before any work instead of mid-stage."""
    import inspect

    from pytorch_lightning import Trainer
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    def literals(annotation):
        if typing.get_origin(annotation) is typing.Literal:
            return [str(a) for a in typing.get_args(annotation)]
        return [v for a in typing.get_args(annotation) for v in literals(a)]

    precision = inspect.signature(Trainer.__init__).parameters["precision"].annotation
    return {
        "accelerator": ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())],
        "strategy": ["auto", *StrategyRegistry.available_strategies()],
        "precision": list(dict.fromkeys(literals(precision))),
    }


def _devices_ok(devices) -> bool:
    """Lightning's `devices`: a count (-1: all), "auto", a list of device indices, or those as a string
    ("2", "0,1", "0,")."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            indices = [d.strip() for d in text.split(",") if d.strip()]
            return bool(indices) and all(d.isdigit() for d in indices)
        return text in ("auto", "-1") or (text.isdigit() and int(text) >= 1)
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return isinstance(devices, int) and not isinstance(devices, bool) and (devices == -1 or devices >= 1)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise bad_value(key, f"must be one of {', '.join(map(str, choices))}, not {value!r}")


def validate(cfg: DictConfig) -> None:
    """Every value before any work starts: choices, ranges, and the settings that depend on one another.
    What must fit the prepared data (a class to hold out, mixture components per training example) is
    checked where the data are read: `runtime.check_data_settings`, `GenerativeModel.check_fits_data`."""
    for fam in cfg.families:
        _check_choice("families", fam, FAMILIES)
    if not cfg.families or len(set(cfg.families)) < len(cfg.families):
        raise bad_value("families", f"must list families without repeats, not {list(cfg.families)}")
    if cfg.family is not None:
        _check_choice("family", cfg.family, FAMILIES)
    for fam in FAMILIES:  # choices and ranges, checked by the family's own Config
        try:
            build_config(family_config(fam), family_section(cfg, fam))
        except ConfigError as e:
            raise bad_value(f"{fam}.{e.key}", e.message) from None
    validate_dataset_name(cfg.data.dataset)
    if cfg.data.channels is not None:
        _check_choice("data.channels", cfg.data.channels, (1, 3))
    if cfg.data.label_column is not None and not cfg.data.label_column.strip():
        raise bad_value("data.label_column", "must name a CSV column, or be null (no labels), not ''")
    for key, bounds in RANGES.items():
        problem = out_of_range(OmegaConf.select(cfg, key), **bounds)
        if problem is not None:
            raise bad_value(key, problem)
    d = cfg.data
    n_val, n_test = round(d.toy_samples * d.val_fraction), round(d.toy_samples * d.test_fraction)
    if d.dataset.startswith("toy2d:") and min(n_val, n_test, d.toy_samples - n_val - n_test) < 1:
        raise bad_value("data.toy_samples", f"must leave at least one example for each of train, val and test "
                                            f"(with val_fraction {d.val_fraction}, test_fraction {d.test_fraction}), "
                                            f"not {d.toy_samples}")
    choices = _trainer_choices()
    for key in ("accelerator", "strategy", "precision"):
        _check_choice(f"trainer.{key}", cfg.trainer[key], choices[key])
    devices = cfg.trainer.devices
    if not _devices_ok(devices):
        shown = OmegaConf.to_container(devices) if isinstance(devices, ListConfig) else devices
        raise bad_value("trainer.devices", f"must be a count >= 1, -1 (all), auto, or a list of device indices, not {shown!r}")
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(cfg.eval.device)):
        raise bad_value("eval.device", f"must be auto, cpu, cuda, cuda:<index> or mps, not {cfg.eval.device!r}")
    _check_choice("eval.fid.features", cfg.eval.fid.features, ("featnet", "inception"))
    if cfg.eval.fid.features == "inception" and not cfg.eval.fid.inception_weights:
        raise bad_value("eval.fid.inception_weights", "must name a local InceptionV3 weights file when "
                                                      "eval.fid.features=inception, not null")
    _check_tracking(cfg.tracking)


def _check_tracking(t) -> None:
    import re

    if not re.fullmatch(r"(test|perf)/[A-Za-z0-9_.]+", t.champion_metric):
        raise bad_value("tracking.champion_metric", f"must name an evaluation metric as test/<name> or perf/<name> "
                                                    f"(test/nll, test/fid, ...), not {t.champion_metric!r}")
    _check_choice("tracking.champion_mode", t.champion_mode, ("min", "max"))
    if t.register and not t.log_model:
        raise bad_value("tracking.register", "true needs tracking.log_model=true (the registered model is the logged "
                                             "one), not tracking.log_model=false")


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
