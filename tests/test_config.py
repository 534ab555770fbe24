"""pipeline.config.load_config: params.yaml merged into the schema, overrides applied, bad input refused
with one GenzooError line that names the offending key or value."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from lightning_modules.registry import FAMILIES, family_class
from pipeline.config import flatten, load_config
from pipeline.errors import GenzooError


@pytest.fixture
def params(tmp_path, repo_root):
    path = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", path)
    return path


def test_params_yaml_loads_and_overrides_apply(params):
    base = load_config([], params_file=str(params))
    raw = yaml.safe_load(params.read_text())
    assert base.vae.latent_dim == raw["vae"]["latent_dim"]
    assert list(base.families) == raw["families"]
    cfg = load_config(["vae.latent_dim=8", "family=vae", "data.dataset=toy2d:moons", "eval.fid.features=featnet"],
                      params_file=str(params))
    assert cfg.vae.latent_dim == 8 and isinstance(cfg.vae.latent_dim, int)
    assert cfg.family == "vae"
    assert cfg.data.dataset == "toy2d:moons"
    assert cfg.vae.hidden == base.vae.hidden  # untouched keys keep the params.yaml value
    assert flatten(cfg)["vae.latent_dim"] == 8


@pytest.mark.parametrize("override, named", [
    ("vae.latent_dim=abc", "vae.latent_dim"),
    ("data.val_fraction=0.7", "data.val_fraction"),
    ("trainer.deterministic=maybe", "trainer.deterministic"),
    ("vae.nosuchkey=1", "vae.nosuchkey"),
    ("nosuchsection.x=1", "nosuchsection.x"),
    ("family=nosuchfamily", "nosuchfamily"),
    ("data.dataset=nosuchdata", "nosuchdata"),
])
def test_bad_overrides_are_rejected_naming_the_key(params, override, named):
    with pytest.raises(GenzooError) as e:
        load_config([override], params_file=str(params))
    msg = str(e.value)
    assert named in msg and "\n" not in msg


def test_unknown_section_in_params_yaml_is_rejected(params):
    params.write_text(params.read_text() + "\nnosuchsection:\n  a: 1\n")
    with pytest.raises(GenzooError, match="nosuchsection"):
        load_config([], params_file=str(params))


def test_unknown_nested_key_and_bad_type_in_params_yaml_are_rejected(params):
    raw = yaml.safe_load(params.read_text())
    raw["vae"]["typo_latent_dim"] = 3
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(GenzooError, match="vae.typo_latent_dim"):
        load_config([], params_file=str(params))
    del raw["vae"]["typo_latent_dim"]
    raw["gmm"]["n_components"] = "ten"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(GenzooError, match="gmm.n_components"):
        load_config([], params_file=str(params))


def test_missing_or_invalid_params_file(tmp_path):
    with pytest.raises(GenzooError, match="not found"):
        load_config([], params_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(GenzooError, match="not valid YAML"):
        load_config([], params_file=str(bad))


def test_sweep_override_outside_multirun_is_refused(params):
    with pytest.raises(GenzooError, match="sweep"):
        load_config(["vae.beta=0.5,1"], params_file=str(params))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_params_yaml_agrees_with_the_family_config_defaults(repo_root, family):
    """One source of truth: each family's Config owns its defaults and params.yaml states exactly them,
    key for key and value for value, so a run from Python and a run from the pipeline train the same model."""
    section = yaml.safe_load((repo_root / "params.yaml").read_text())[family]
    defaults = dataclasses.asdict(family_class(family).Config())
    assert list(section) == list(defaults), "same keys, in the Config's order"
    assert section == defaults


def test_a_bad_choice_or_range_in_a_family_section_is_one_line(params):
    for override, named in (("gmm.covariance_type=banded", "gmm.covariance_type"), ("gan.n_critic=0", "gan.n_critic"),
                            ("hmm.emission=poisson", "hmm.emission")):
        with pytest.raises(GenzooError, match=named) as e:
            load_config([override], params_file=str(params))
        assert "\n" not in str(e.value)
