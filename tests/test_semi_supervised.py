"""Semi-supervised splits (`data.labels_per_class`): the labelled subset, hidden labels served as UNLABELLED
to training only, and — for every family, through the real train stage — hidden labels that never reach the
model: replacing them with garbage leaves the trained weights bit-identical."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.contract import UNLABELLED
from lightning_modules.registry import FAMILIES, family_class
from pipeline.data.labelled import hide_labels, select_labelled

from conftest import PARAMS, TINY


def test_select_labelled_keeps_per_class_seeded_examples():
    y = np.repeat(np.arange(4), [30, 5, 12, 40])
    np.random.default_rng(3).shuffle(y)
    idx = select_labelled(y, 10, 4, seed=0)
    assert np.all(np.diff(idx) > 0), "sorted, no repeats"
    assert np.bincount(y[idx], minlength=4).tolist() == [10, 5, 10, 10]  # class 1 has only 5: all of them
    assert np.array_equal(idx, select_labelled(y, 10, 4, seed=0))
    assert not np.array_equal(idx, select_labelled(y, 10, 4, seed=1))
    visible = hide_labels(y, idx)
    assert np.array_equal(visible[idx], y[idx]) and np.all(np.delete(visible, idx) == UNLABELLED)


def _fetch(root: Path, overrides=()) -> Path:
    from pipeline.config import load_config
    from pipeline.data.sources import load_source
    from pipeline.data.store import write_prepared
    from pipeline.paths import prepared_dir

    cfg = load_config([f"data.root={root}", *overrides], params_file=str(PARAMS))
    write_prepared(load_source(cfg.data), prepared_dir(cfg.data), cfg.data.dataset, cfg.data.seed)
    return prepared_dir(cfg.data)


@pytest.fixture(scope="module")
def semi_digits(tmp_path_factory) -> Path:
    """A prepared digits folder fetched with 10 labels per class, and a one-epoch featnet beside it (the GAN
    keeps its best-FID checkpoint in the featnet's feature space)."""
    from pipeline.config import load_config
    from pipeline.stages.featnet import run_featnet

    root = tmp_path_factory.mktemp("semi")
    folder = _fetch(root, ["data.labels_per_class=10"])
    here = os.getcwd()
    os.chdir(root)
    try:
        run_featnet(load_config([*TINY, f"data.root={root}", "data.labels_per_class=10"], params_file=str(PARAMS)))
    finally:
        os.chdir(here)
    return folder


def test_fetch_stores_the_labelled_subset_and_only_training_hides_the_rest(semi_digits):
    from pipeline.data.datamodule import PreparedDataModule

    manifest = json.loads((semi_digits / "manifest.json").read_text())
    assert manifest["labels_per_class"] == 10 and "train_labelled.npy" in manifest["files"]
    full = PreparedDataModule(semi_digits).labels("train")
    hidden = PreparedDataModule(semi_digits, hide_unlabelled=True)
    y = hidden.labels("train")
    assert torch.equal(y, hidden.raw("train")[1])
    labelled = y != UNLABELLED
    assert torch.bincount(y[labelled], minlength=10).tolist() == [10] * 10
    assert torch.equal(y[labelled], full[labelled])
    for split in ("val", "test"):  # scoring keeps every label
        assert bool((hidden.labels(split) >= 0).all())


def test_a_store_fetched_with_other_labels_is_refused(semi_digits):
    from pipeline.config import load_config
    from pipeline.errors import GenzooError
    from pipeline.runtime import datamodule_for

    root = semi_digits.parents[1]
    for value in ("5", "null"):
        cfg = load_config([f"data.root={root}", f"data.labels_per_class={value}"], params_file=str(PARAMS))
        with pytest.raises(GenzooError, match="labels_per_class"):
            datamodule_for(cfg)


@pytest.mark.parametrize("value", ["0", "-3", "ten", "2.5", "true"])
def test_bad_labels_per_class_names_the_key(value):
    from pipeline.config import load_config
    from pipeline.errors import GenzooError

    with pytest.raises(GenzooError, match="data.labels_per_class"):
        load_config([f"data.labels_per_class={value}"], params_file=str(PARAMS))


def test_bad_labels_per_class_is_one_line_exit_2(project_dir, genzoo):
    r = genzoo(["fetch", "data.labels_per_class=0"], cwd=project_dir)
    assert r.returncode == 2, r.stderr
    assert "labels_per_class" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# Epochs for each family: enough to beat chance on 100 labels, few enough for the fast suite.
EPOCHS = {"gmm": 3, "hmm": 3, "rbm": 3, "vae": 15, "gan": 3, "flow": 3, "diffusion": 3}


def _train(project: Path, family: str) -> dict:
    from pipeline.config import load_config
    from pipeline.stages.train import train

    cfg = load_config([*TINY, "data.labels_per_class=10", f"trainer.max_epochs={EPOCHS[family]}", f"family={family}",
                       f"tracking.uri=sqlite:///{project / 'mlflow.db'}"], params_file=str(project / "params.yaml"))
    train(cfg)
    return torch.load(project / "data/models" / family / "model.ckpt", weights_only=True, map_location="cpu")


def _garbage_hidden_labels(folder: Path) -> None:
    """Every hidden training label replaced by a random class (the labelled ones stay), the manifest updated."""
    from pipeline.data.store import sha256

    manifest = json.loads((folder / "manifest.json").read_text())
    y = np.load(folder / "train_y.npy")
    hidden = np.setdiff1d(np.arange(len(y)), np.load(folder / "train_labelled.npy"))
    garbage = y.copy()
    garbage[hidden] = np.random.default_rng(0).integers(0, 10, len(hidden))
    assert (garbage[hidden] != y[hidden]).mean() > 0.8
    np.save(folder / "train_y.npy", garbage.astype(y.dtype), allow_pickle=False)
    manifest["files"]["train_y.npy"] = sha256(folder / "train_y.npy")
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_labels_never_reach_the_model_and_it_beats_chance(tmp_path, monkeypatch, semi_digits, family):
    projects = []
    for name in ("true", "garbage"):
        project = tmp_path / name
        shutil.copytree(semi_digits, project / "data" / "prepared" / "digits")
        shutil.copytree(semi_digits.parents[1] / "featnet", project / "data" / "featnet")
        shutil.copy(PARAMS, project / "params.yaml")
        projects.append(project)
    _garbage_hidden_labels(projects[1] / "data" / "prepared" / "digits")
    states = []
    for project in projects:
        monkeypatch.chdir(project)
        states.append(_train(project, family))
    a, b = (s["state_dict"] for s in states)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{family}: {k} depends on the hidden labels"

    from pipeline.checkpoints import load_model
    from pipeline.data.datamodule import PreparedDataModule

    model = load_model(projects[1] / "data/models" / family / "model.ckpt", family_class(family))
    assert model.conditional and model.can_classify()
    x, y = PreparedDataModule(projects[1] / "data" / "prepared" / "digits").split("test")
    with torch.no_grad():
        accuracy = (model.classify(x).argmax(1) == y).float().mean().item()
    # chance is 0.1; 0.2 is 6 standard errors above it on the 360 test digits
    assert accuracy > 0.2, f"{family}: {accuracy:.3f} after {EPOCHS[family]} epochs on 10 labels per class"
