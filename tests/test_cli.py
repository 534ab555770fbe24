"""The command line's shape: one subcommand per stage or tool, each with its own options only; a foreign
option is a one-line usage error (exit 2); `--version`; `genzoo config` prints the resolved config.
In-process (`pipeline.cli.main`), so no process start per case; the real console script is exercised by
test_cli_errors.py and the end-to-end tests."""
from __future__ import annotations

import pytest
import yaml

from pipeline import cli

OWN_OPTIONS = {"train": {"--multirun"}, "sample": {"--model", "--output", "--temperature"},
               "compare": {"--runs", "--experiment", "--sweep", "--all"}, "ui": {"--port"}}
ALL_OPTIONS = set().union(*OWN_OPTIONS.values())


def call(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_offers_only_its_own_options(command, capsys):
    code, out, _ = call([command, "--help"], capsys)
    assert code == 0 and f"usage: genzoo {command}" in out
    own = OWN_OPTIONS.get(command, set())
    assert all(o in out for o in own), out
    assert not any(o in out for o in ALL_OPTIONS - own), out


@pytest.mark.parametrize("argv, foreign", [
    (["train", "--port", "5001", "family=gmm"], "--port"),
    (["evaluate", "--model", "x.ckpt", "family=gmm"], "--model"),
    (["fetch", "-m", "data.seed=1,2"], "-m"),
    (["ui", "--runs", "a"], "--runs"),
])
def test_a_foreign_option_is_a_one_line_usage_error(argv, foreign, capsys, project_dir):
    code, out, err = call(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and foreign in err and f"genzoo {argv[0]}: error:" in err
    assert not (project_dir / "data").exists()


def test_unknown_command_and_no_command(capsys):
    code, _, err = call(["trian"], capsys)
    assert code == 2 and "trian" in err and "train" in err and err.count("\n") == 1
    code, _, err = call([], capsys)
    assert code == 2 and "<command>" in err


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = call(["--version"], capsys)
    assert code == 0 and out.strip() == f"genzoo {version('genzoo')}"


def test_config_prints_the_resolved_config(project_dir, capsys):
    cli.main(["config", "family=gmm", "gmm.n_components=3", "data.batch_size=64"])
    printed = yaml.safe_load(capsys.readouterr().out)
    params = yaml.safe_load((project_dir / "params.yaml").read_text())
    assert printed["family"] == "gmm" and printed["gmm"]["n_components"] == 3 and printed["data"]["batch_size"] == 64
    assert printed["vae"] == params["vae"] and set(printed) >= set(params)


def test_config_refuses_a_bad_choice_naming_the_key(project_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["config", "vae.arch=transformer"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "vae.arch" in err and "conv" in err and err.count("\n") == 1


def test_options_and_overrides_mix_in_any_order():
    args = cli.parse(["train", "a.b=1,2", "-m", "c.d=3"])
    assert args.multirun and args.overrides == ["a.b=1,2", "c.d=3"] and args.handler is cli.cmd_train
    args = cli.parse(["sample", "--model", "m.ckpt", "-n", "4"])
    assert (args.model, args.n, args.multirun) == ("m.ckpt", 4, False)
