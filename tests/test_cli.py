"""The command line's shape: one subcommand per stage or tool, each with its own options only; a foreign
option is a one-line usage error (exit 2); `--version`; `genzoo config` prints the resolved config.
In-process (`pipeline.cli.main`), so no process start per case; the real console script is exercised by
test_cli_errors.py and the end-to-end tests."""
from __future__ import annotations

import pytest
import yaml

from pipeline import cli

OWN_OPTIONS = {"train": {"--multirun"}, "sample": {"--model", "--output", "--temperature"},
               "compare": {"--runs", "--experiment", "--sweep", "--all"}, "report": {"--sweep"}, "ui": {"--port"}}
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


# --- -q / -v (issue 13) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, verbosity", [
    (["train", "family=gmm"], cli.DEFAULT),
    (["-q", "train", "family=gmm"], cli.QUIET), (["train", "-q", "family=gmm"], cli.QUIET),
    (["train", "family=gmm", "--quiet"], cli.QUIET),
    (["-v", "evaluate", "family=gmm"], cli.VERBOSE), (["evaluate", "family=gmm", "-v"], cli.VERBOSE),
    (["--verbose", "train", "-m", "a=1,2"], cli.VERBOSE),
])
def test_quiet_and_verbose_go_before_or_after_the_command(argv, verbosity):
    args = cli.parse(argv)
    assert args.verbosity == verbosity and args.command == argv[[a.startswith("-") for a in argv].index(False)]
    assert [o for o in args.overrides if "=" in o] == [a for a in argv if "=" in a]


@pytest.mark.parametrize("argv", [["-q", "-v", "train"], ["train", "-q", "--verbose"], ["-q", "train", "-v"]])
def test_quiet_and_verbose_exclude_each_other(argv, capsys):
    code, _, err = call(argv, capsys)
    assert code == 2 and "not allowed with argument" in err and err.count("\n") == 1


LEAFSPEC = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.")


def _shown(verbosity) -> list:
    """The messages that reach the user after `configure_output(verbosity)`: a user's own UserWarning, and the
    LeafSpec deprecation as Lightning's pytree helper raises it (its module and message)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # as a fresh process: no warning registry hides a repeat
        cli.configure_output(verbosity)
        warnings.warn("mine", UserWarning)
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "pytorch_lightning/utilities/_pytree.py", 21,
                               module="pytorch_lightning.utilities._pytree")
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "my_code.py", 1, module="my_code")  # only Lightning's
    return [str(w.message) for w in seen]


def test_default_output_filters_only_the_known_third_party_noise(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    try:
        assert _shown(cli.DEFAULT) == ["mine", LEAFSPEC]  # the user's and my_code's; not Lightning's
        assert _shown(cli.VERBOSE) == ["mine", LEAFSPEC, LEAFSPEC]  # -v: nothing filtered
        assert _shown(cli.QUIET) == []  # -q: errors only
    finally:
        cli.configure_output(cli.DEFAULT)


def test_verbose_gives_info_of_genzoo_and_lightning():
    import logging

    from pipeline.runtime import quiet_lightning

    try:
        cli.configure_output(cli.VERBOSE)
        quiet_lightning()  # what build_trainer runs after Lightning's import reset its level
        assert logging.getLogger("pipeline.stages.evaluate").isEnabledFor(logging.INFO)
        assert logging.getLogger("pytorch_lightning").level == logging.INFO
        cli.configure_output(cli.QUIET)
        assert not logging.getLogger("pytorch_lightning").isEnabledFor(logging.WARNING)
        assert logging.getLogger("pytorch_lightning").isEnabledFor(logging.ERROR)
    finally:
        cli.configure_output(cli.DEFAULT)
    quiet_lightning()
    assert logging.getLogger("pytorch_lightning").level == logging.WARNING
    assert not logging.getLogger("pipeline").isEnabledFor(logging.INFO) and not logging.getLogger("pipeline").handlers


USER_CODE = ("import sys, warnings; from pipeline.cli import main; main(sys.argv[1:]); "
             "warnings.warn('mine: a user warning', UserWarning); "
             f"warnings.warn_explicit({LEAFSPEC!r}, FutureWarning, 'pytorch_lightning/utilities/_pytree.py', 21, "
             "module='pytorch_lightning.utilities._pytree')")


@pytest.mark.parametrize("flag, mine, leafspec", [([], True, False), (["-q"], False, False), (["-v"], True, True)])
def test_a_users_warning_reaches_them_in_a_real_process(project_dir, flag, mine, leafspec):
    """A real process, no PYTHONWARNINGS: genzoo's CLI runs, then the user's code warns in the same process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-c", USER_CODE, *flag, "config", "family=gmm"], cwd=project_dir, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "family: gmm" in r.stdout  # the result goes to stdout whatever the level
    assert ("mine: a user warning" in r.stderr) == mine, r.stderr
    assert ("LeafSpec" in r.stderr) == leafspec, r.stderr
