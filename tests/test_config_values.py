"""Every config value is validated before any work starts: each key of every section (the fixed ones and each
family's Config), given a bad value, is refused by `load_config` with one line naming the key; values that must
fit the prepared data (a class to hold out, mixture components per training example) are refused by the train
stage before its MLflow run opens. The CLI tests run the real console script on the failures that used to end
in a traceback or in silence: exit code 2, one line, no MLflow run left RUNNING."""
from __future__ import annotations

import sqlite3

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from test_cli_errors import assert_clean_failure

from pipeline.config import load_config, schema_class
from pipeline.errors import GenzooError

# One bad value per key (an override's right-hand side). A key added to a section without an entry here, or
# to ANY_VALUE, fails `test_every_key_has_a_bad_value`.
BAD = {
    "families": "[gmm,nosuchfamily]",
    "family": "nosuchfamily",
    "resume": "maybe",
    # data
    "data.dataset": "nosuchdata",
    "data.seed": -1,
    "data.val_fraction": 0.5,
    "data.test_fraction": 0,
    "data.toy_samples": 0,
    "data.holdout_class": -1,  # a class the dataset lacks: test_holdout_class_must_be_a_class_of_the_data
    "data.labels_per_class": 0,
    "data.image_size": 0,
    "data.channels": 2,
    "data.label_column": "''",  # a name, or null for no labels
    "data.batch_size": 0,
    "data.num_workers": -1,
    # trainer
    "trainer.accelerator": "banana",
    "trainer.devices": 0,
    "trainer.strategy": "banana",
    "trainer.num_nodes": 0,
    "trainer.precision": "15-mixed",
    "trainer.max_epochs": 0,
    "trainer.seed": 2**32,
    "trainer.deterministic": "maybe",
    "trainer.compile": "maybe",
    "trainer.log_every_n_steps": 0,
    # featnet
    "featnet.max_epochs": 0,
    "featnet.lr": 0,
    "featnet.feature_dim": 0,
    "featnet.batch_size": 0,
    # eval
    "eval.n_samples": 0,
    "eval.batch_size": 0,
    "eval.seed": -1,
    "eval.kid_subset_size": 1,
    "eval.kid_subsets": 0,
    "eval.grid_size": 0,
    "eval.device": "tpu",  # auto | cpu | cuda | cuda:<index> | mps (a GPU that is absent: test_eval_device)
    "eval.fid.features": "pixels",
    "tracking.log_model": "maybe",
    "tracking.register": "maybe",
    "tracking.champion_metric": "nll",  # a metric's MLflow name: test/nll
    "tracking.champion_mode": "lowest",
    # gmm
    "gmm.n_components": 0,
    "gmm.covariance_type": "banana",
    "gmm.reg_covar": -1e-3,
    "gmm.semi_reg_covar": -1e-3,
    "gmm.max_epochs": 0,
    "gmm.tol": -1,
    "gmm.init_subsample": 0,
    "gmm.kmeans_iters": -1,
    "gmm.seed": -1,
    "gmm.conditional": "maybe",
    "gmm.class_components": 0,
    "gmm.precision": "float16",
    # hmm
    "hmm.n_states": 0,
    "hmm.emission": "poisson",
    "hmm.init": "trigram",
    "hmm.states_per_token": 0,
    "hmm.covariance_type": "banana",
    "hmm.reg_covar": -1e-4,
    "hmm.semi_reg_covar": -1e-4,
    "hmm.pseudocount": -1,
    "hmm.transition_pseudocount": -1,
    "hmm.max_epochs": 0,
    "hmm.token_max_epochs": 0,
    "hmm.tol": -1,
    "hmm.init_subsample": 0,
    "hmm.kmeans_iters": -1,
    "hmm.seed": -1,
    "hmm.conditional": "maybe",
    "hmm.topology": "circular",
    "hmm.precision": "float16",
    # rbm
    "rbm.visible": "poisson",
    "rbm.n_hidden": 0,
    "rbm.learn_sigma": "maybe",
    "rbm.cd_k": 0,
    "rbm.persistent": "maybe",
    "rbm.n_chains": 0,
    "rbm.lr": 0,
    "rbm.momentum": 1,
    "rbm.weight_decay": -1,
    "rbm.init_std": 0,
    "rbm.max_epochs": 0,
    "rbm.sample_steps": -1,
    "rbm.ais_chains": 0,
    "rbm.ais_steps": 0,
    "rbm.exact_max_hidden": -1,
    "rbm.seed": -1,
    "rbm.conditional": "maybe",
    "rbm.discriminative_weight": -1,
    "rbm.unlabelled_weight": -1,
    "rbm.max_label_boost": 0.5,
    # vae
    "vae.max_epochs": 0,
    "vae.seed": -1,
    "vae.latent_dim": -1,
    "vae.hidden": 0,
    "vae.channels": 0,
    "vae.arch": "transformer",
    "vae.likelihood": "poisson",
    "vae.obs_scale": "global",
    "vae.min_log_scale": "nan",
    "vae.beta": -1,
    "vae.lr": 0,
    "vae.iwae_k": 0,
    "vae.conditional": "maybe",
    "vae.semi_supervised": "maybe",
    "vae.alpha": -1,
    "vae.semi_classes": 0,
    "vae.labelled_draws": -1,
    # gan
    "gan.max_epochs": 0,
    "gan.seed": -1,
    "gan.loss": "wasserstein",
    "gan.latent_dim": 0,
    "gan.width": 0,
    "gan.mlp_layers": 0,
    "gan.spectral_norm": "maybe",
    "gan.lr_g": 0,
    "gan.lr_d": -1e-4,
    "gan.beta1_g": -0.5,
    "gan.beta2_g": 1,
    "gan.beta1_d": 1.5,
    "gan.beta2_d": 1,
    "gan.n_critic": 0,
    "gan.ema_decay": 1,
    "gan.fid_every_n_epochs": 0,
    "gan.conditional": "maybe",
    "gan.objective": "wasserstein",
    "gan.g_class_fm": -1,
    "gan.g_class_weight": -1,
    "gan.collapse_epochs": -1,
    "gan.collapse_d_loss": -1,
    "gan.collapse_std": -1,
    # flow
    "flow.max_epochs": 0,
    "flow.seed": -1,
    "flow.lr": 0,
    "flow.weight_decay": -1,
    "flow.cosine_lr": "maybe",
    "flow.arch": "vector",
    "flow.scales": 0,
    "flow.steps_per_scale": 0,
    "flow.hidden_channels": 0,
    "flow.logit_alpha": 0.5,
    "flow.vector_layer": "glow",
    "flow.spline_steps": 0,
    "flow.spline_hidden": 0,
    "flow.spline_bins": 1,
    "flow.spline_bound": 0,
    "flow.vector_steps": 0,
    "flow.vector_mixing": "shuffle",
    "flow.hidden_features": 0,
    "flow.hidden_layers": 0,
    "flow.conditional": "maybe",
    "flow.labelled_weight": 0,
    "flow.semi_learn_base": "maybe",
    # diffusion
    "diffusion.max_epochs": 0,
    "diffusion.seed": -1,
    "diffusion.lr": 0,
    "diffusion.warmup_steps": -1,
    "diffusion.ema_decay": 1,
    "diffusion.channels": 0,
    "diffusion.width": 0,
    "diffusion.blocks": 0,
    "diffusion.dropout": 1,
    "diffusion.loss_weighting": "l1",
    "diffusion.log_snr_max": -20,
    "diffusion.log_snr_min": "-inf",
    "diffusion.label_dropout": -0.1,
    "diffusion.guidance": -2,
    "diffusion.guidance_sweep": "[0,-2]",
    "diffusion.sampler": "euler",
    "diffusion.sample_steps": 0,
    "diffusion.encode_log_snr": "inf",
    "diffusion.latent_steps": 0,
    "diffusion.bound_samples": 0,
    "diffusion.classifier_weight": -1,
    "diffusion.conditional": "maybe",
}

# Keys that take any value of their type, so no value is bad:
ANY_VALUE = {
    "data.root",  # any folder (created by fetch)
    "eval.fid.inception_weights",  # a path; it must be set only with eval.fid.features=inception (checked)
    "tracking.uri",  # any MLflow store URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
    "tracking.experiment",  # any experiment name (null: genzoo-<dataset>)
}


def schema_keys():
    """Every leaf key of the full schema, dotted: the fixed sections and each registered family's Config."""
    def walk(node, prefix):
        for k in node.keys():
            v = node[k]
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"]

    return list(walk(OmegaConf.structured(schema_class()), ""))


@pytest.fixture(scope="module")
def params(tmp_path_factory, repo_root):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text((repo_root / "params.yaml").read_text())
    return str(path)


def test_every_key_has_a_bad_value():
    keys = set(schema_keys())
    assert not BAD.keys() & ANY_VALUE
    assert keys - BAD.keys() - ANY_VALUE == set(), "keys without a bad value in BAD (or a reason in ANY_VALUE)"
    assert BAD.keys() - keys == set(), "BAD names keys the schema does not have"
    assert ANY_VALUE - keys == set()


def test_the_defaults_validate(params):
    load_config([], params_file=params)


@pytest.mark.parametrize("key", list(BAD))
def test_a_bad_value_is_refused_naming_the_key(params, key):
    bad = BAD[key]
    with pytest.raises(GenzooError) as e:
        load_config([f"{key}={bad}"], params_file=params)
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg, msg
    shown = str(bad).strip("[]").split(",")[-1].lstrip("-")  # the value (a list's bad element) is named too
    assert shown in msg, msg


@pytest.mark.parametrize("override", ["trainer.devices=auto", "trainer.devices=-1", "trainer.devices=[0,1]",
                                      "trainer.devices='0,1'", "trainer.precision=16", "trainer.precision=bf16-mixed",
                                      "trainer.strategy=ddp", "data.holdout_class=0", "rbm.lr=null",
                                      "data.dataset=toy2d:moons", "diffusion.guidance=-1",
                                      "tracking.champion_metric=test/fid", "tracking.champion_mode=max",
                                      "tracking.champion_metric=perf/train_seconds", "tracking.register=true",
                                      "eval.device=cpu", "eval.device=cuda", "eval.device=cuda:1", "eval.device=mps"])
def test_good_values_pass(params, override):
    load_config([override], params_file=params)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "''"])
def test_eval_device_names_a_torch_device(params, bad):
    with pytest.raises(GenzooError, match="'eval.device': must be auto, cpu, cuda, cuda:<index> or mps"):
        load_config([f"eval.device={bad}"], params_file=params)


def test_registering_needs_the_logged_model(params):
    with pytest.raises(GenzooError, match="'tracking.register'.*tracking.log_model=true"):
        load_config(["tracking.register=true", "tracking.log_model=false"], params_file=params)


@pytest.mark.parametrize("override", ["data.dataset=csv:data/user/wine.csv", "data.dataset=imagefolder:/abs/pets",
                                      "data.dataset=npz:x.npz", "data.dataset=text:book.txt", "data.image_size=32",
                                      "data.channels=3", "data.label_column=null", "data.label_column=target"])
def test_good_data_values_pass(params, override):
    """A user source's file is checked by the fetch stage (tests/test_user_data.py), not by the config."""
    load_config([override], params_file=params)


def test_toy_samples_must_leave_every_split_an_example(params):
    with pytest.raises(GenzooError, match="data.toy_samples"):
        load_config(["data.dataset=toy2d:moons", "data.toy_samples=4"], params_file=params)
    load_config(["data.toy_samples=4"], params_file=params)  # digits: toy_samples is not read


# --- values that must fit the prepared data (in-process: the CLI's error path is the same) --------------------
def test_holdout_class_must_be_a_class_of_the_data(digits_project, params):
    from pipeline.runtime import datamodule_for

    for holdout, named in ((10, "0 to 9"), (3, "genzoo fetch")):  # not a class; a class the data still hold
        cfg = load_config([f"data.holdout_class={holdout}"], params_file=params)
        with pytest.raises(GenzooError, match="data.holdout_class") as e:
            datamodule_for(cfg)
        assert named in str(e.value)


@pytest.mark.parametrize("family, overrides, key, named, fits", [
    ("gmm", {"conditional": False, "n_components": 51}, "n_components", "<= 50", {"n_components": 50}),
    ("gmm", {"conditional": False, "n_components": 20, "init_subsample": 10}, "init_subsample", ">= 20",
     {"init_subsample": 20}),
    ("gmm", {"conditional": True, "class_components": 6}, "class_components", "<= 5", {"class_components": 5}),
    ("hmm", {"conditional": False, "n_states": 401}, "n_states", "<= 400", {"n_states": 400}),
    ("hmm", {"conditional": True, "n_states": 41}, "n_states", "<= 40", {"n_states": 40}),
])
def test_mixture_components_must_fit_the_training_set(family, overrides, key, named, fits):
    """50 training examples of 8 steps, 10 classes of 5: a mixture (or each class's) needs an example per
    component, and the k-means of an HMM's Gaussian states a frame (an image row) per state."""
    from lightning_modules.contract import DataInfo
    from lightning_modules.registry import family_class
    from pipeline.runtime import check_fits_data

    info = DataInfo(shape=(1, 8, 8), kind="image", levels=17, num_classes=10).to_dict()
    labels = torch.arange(10).repeat(5)
    with pytest.raises(GenzooError, match=f"'{family}.{key}': must be {named}"):
        check_fits_data(family_class(family)(overrides, info), labels)
    check_fits_data(family_class(family)({**overrides, **fits}, info), labels)  # the largest setting that fits


def test_semi_supervised_class_counts_are_not_the_limit():
    """With hidden labels every example gets a guessed class first: one label per class does not cap the
    components per class."""
    from lightning_modules.contract import UNLABELLED, DataInfo
    from lightning_modules.registry import family_class
    from pipeline.runtime import check_fits_data

    info = DataInfo(shape=(1, 8, 8), kind="image", levels=17, num_classes=10)
    labels = torch.cat([torch.arange(10), torch.full((40,), UNLABELLED)])
    check_fits_data(family_class("gmm")({"conditional": True, "class_components": 3}, info.to_dict()), labels)


# --- the console script ----------------------------------------------------------------------------------------
def running_runs(project_dir) -> int:
    db = project_dir / "mlflow.db"
    if not db.exists():
        return 0
    return sqlite3.connect(db).execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]


@pytest.mark.parametrize("args, named", [
    (["train", "family=gmm", "gmm.n_components=0"], ["gmm.n_components", ">= 1", "not 0"]),  # was ZeroDivisionError
    (["train", "family=vae", "vae.latent_dim=-1"], ["vae.latent_dim", ">= 1", "not -1"]),  # was a torch traceback
    (["evaluate", "family=vae", "eval.n_samples=0"], ["eval.n_samples", ">= 4", "not 0"]),  # was torch.cat([])
    (["train", "family=gmm", "gmm.covariance_type=banana"], ["gmm.covariance_type", "full", "'banana'"]),
    (["train", "family=gmm", "data.holdout_class=99"], ["data.holdout_class", "0 to 9", "not 99"]),  # trained silently
    (["train", "family=gmm", "gmm.conditional=false", "gmm.n_components=5000"], ["gmm.n_components", "<= 1258"]),
])  # each costs a process start (~5-10 s); the rest of the values: the in-process tests above
def test_bad_values_on_the_command_line_are_one_line_before_any_work(digits_project, genzoo, args, named):
    r = genzoo([*args, "trainer.accelerator=cpu"], cwd=digits_project)
    line = assert_clean_failure(r, *named)
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr
    assert running_runs(digits_project) == 0
    assert not (digits_project / "data" / "models").exists()  # refused before the train stage wrote anything
