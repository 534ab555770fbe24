"""`genzoo <command> [options] [key=value ...]`: the pipeline stages and tools behind one console script.

Every params.yaml key can be overridden in Hydra's grammar (`vae.latent_dim=8 trainer.devices=2`);
`family=<name>` picks the family. `genzoo train -m family=vae vae.beta=0.5,1,2` sweeps: each point is trained
into data/sweeps/<family>/<point>/ and evaluated, one MLflow run per point; `genzoo compare --sweep` shows
it. `genzoo config [key=value ...]` prints the resolved config. `genzoo <command> --help` lists a command's
options.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

from pipeline.errors import GenzooError


# --- output: -q / -v ------------------------------------------------------------------------------
QUIET, DEFAULT, VERBOSE = -1, 0, 1
GENZOO_LOGGERS = ("pipeline", "lightning_modules")  # genzoo's own (`logging.getLogger(__name__)`)

# Warnings third-party code raises on ordinary genzoo runs, about nothing the user can or should change: each
# silenced by default (not under -v) by its exact message and the module that raises it, so that every other
# warning (the user's own code, a family's warning about its config, a library's new one) still shows.
NOISY_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's own pytree helper still builds one on every training step
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"pytorch_lightning\.utilities\._pytree"),
    # the EM families (GMM, HMM) optimise manually: a fit without an optimizer is by design
    (r"`LightningModule\.configure_optimizers` returned `None`", r"pytorch_lightning\.core\.optimizer"),
    # the train stage writes state.json and the run file into the model folder before Lightning's last.ckpt
    (r"Checkpoint directory .* exists and is not empty", r"pytorch_lightning\.callbacks\.model_checkpoint"),
    # small data sets have fewer batches per epoch than trainer.log_every_n_steps; epoch metrics are logged anyway
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     r"pytorch_lightning\.loops\.fit_loop"),
    # the prepared data are in-memory tensors: data.num_workers=0 is the default on purpose
    (r"The '\w+' does not have many workers", r"pytorch_lightning\.trainer\.connectors\.data_connector"),
    # trainer.accelerator=cpu on a GPU machine is the user's explicit choice
    (r"GPU available but not used", r"pytorch_lightning\.trainer\.setup"),
    # KID keeps every feature of eval.n_samples samples in memory: bounded by that setting
    (r"Metric `Kernel Inception Distance` will save all extracted features", r"torchmetrics\."),
    # the train stage logs the prepared data as the run's dataset input: MLflow's registry finds its own source twice
    (r"The specified dataset source can be interpreted in multiple ways", r"mlflow\.data\."),
    # MLflow's sqlite store calls an API SQLAlchemy 2 deprecates (shown with -W default / PYTHONWARNINGS=default)
    (r"The ``noload`` loader strategy is deprecated", r"mlflow\.store\."),
)


def configure_output(verbosity: int = DEFAULT) -> None:
    """What a run prints besides its result lines (which always go to stdout). DEFAULT: warnings, minus
    NOISY_WARNINGS, and genzoo's one-line results; QUIET (-q): errors only (no warning, no log record below
    ERROR, from any library); VERBOSE (-v): INFO from genzoo's loggers and Lightning's (its device lines), and
    every warning unfiltered."""
    import logging
    import warnings

    from pipeline.tracking import quiet_telemetry

    quiet_telemetry()
    logging.disable(logging.NOTSET)
    if verbosity <= QUIET:
        warnings.simplefilter("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # processes a run starts (DDP ranks) stay quiet too
        logging.disable(logging.WARNING)  # Lightning and MLflow reset their loggers' levels: this holds anyway
        return
    level = logging.INFO if verbosity >= VERBOSE else logging.WARNING
    for name in GENZOO_LOGGERS:  # `runtime.quiet_lightning` gives Lightning's loggers the same level
        logger = logging.getLogger(name)
        logger.setLevel(level)
        ours = [h for h in logger.handlers if getattr(h, "genzoo_verbose", False)]
        if verbosity >= VERBOSE and not ours:
            handler = logging.StreamHandler()  # stderr, as Lightning's own INFO lines
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            handler.genzoo_verbose = True
            logger.addHandler(handler)
        elif verbosity < VERBOSE:
            for handler in ours:  # an earlier `main([-v ...])` in this process
                logger.removeHandler(handler)
    if verbosity < VERBOSE:
        for message, module in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)


# --- the commands ---------------------------------------------------------------------------------
def cmd_fetch(cfg, args):
    from pipeline.stages.fetch import fetch

    m = fetch(cfg)
    print(f"fetched {m['dataset']}: " + ", ".join(f"{k} {v['n']}" for k, v in m["splits"].items()))


def cmd_featnet(cfg, args):
    from pipeline.stages.featnet import run_featnet

    r = run_featnet(cfg)
    ngram = r.pop("ngram", {})
    print("featnet: " + ", ".join([f"{k}={v:.4g}" for k, v in r.items()] +
                                  [f"{name} perplexity={m['perplexity']:.4g}" for name, m in ngram.items()]))


def cmd_train(cfg, args):
    """A plain run trains only (dvc.yaml's evaluate stage follows); a sweep point is trained, then evaluated."""
    from pipeline.stages.train import train

    point = args.point
    if point is not None:
        from pipeline.stages.evaluate import preflight

        preflight(cfg)
    model_dir = train(cfg, point)
    print(f"trained {cfg.family}: {model_dir}")
    from pytorch_lightning.utilities import rank_zero_only

    if point is not None and rank_zero_only.rank == 0:  # under torchrun or srun, one evaluation per point
        from pipeline.stages.evaluate import evaluate

        _print_metrics(f"{cfg.family} {point.slug}", evaluate(cfg, point))


def cmd_evaluate(cfg, args):
    from pipeline.stages.evaluate import evaluate

    _print_metrics(cfg.family, evaluate(cfg))


def _print_metrics(name: str, result: dict) -> None:
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result["metrics"].items())))


def cmd_report(cfg, args):
    if args.sweep is not None:
        from pipeline.stages.sweep_report import sweep_report

        print(f"report: {sweep_report(cfg, args.sweep)}")
        return
    from pipeline.stages.report import report

    print(f"report: {report(cfg)}")


def cmd_sample(cfg, args):
    from pipeline.stages.sample import sample_to_file

    print(f"samples: {sample_to_file(args.model, args.n, args.output, args.temperature, args.label, cfg)}")


def cmd_compare(cfg, args):
    from pipeline.stages.compare import compare

    compare(cfg, args.runs, args.experiment, sweep=args.sweep, every=args.all)


def _sweep_option_is_an_override(args) -> None:
    """`compare --sweep key=value`: argparse gives the override to --sweep's optional ID; a sweep id has no `=`."""
    if getattr(args, "sweep", None) and "=" in args.sweep:
        args.overrides.insert(0, args.sweep)
        args.sweep = "latest"


def cmd_ui(cfg, args):
    """`mlflow ui` on 127.0.0.1, after storing the runs view of the configured data set's experiment (sorted by
    test/nll, the Dataset and key metric columns shown) and printing its address."""
    from pipeline import tracking

    uri = tracking.tracking_uri(cfg)
    base = f"http://127.0.0.1:{args.port}"
    experiment_id = tracking.prepare_runs_view(cfg)
    print(f"{tracking.experiment_name(cfg)}'s runs: {tracking.runs_view_url(base, experiment_id)}", flush=True)
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])


def cmd_config(cfg, args):
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve=True), end="")


# --- the parser -----------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genzoo")
    except PackageNotFoundError:
        return "unknown"


def _options_train(p):
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep comma-separated override values (a=1,2 b=x,y): each point is trained into "
                        "data/sweeps/<family>/<point>/ and evaluated; `genzoo compare` shows the sweep")


def _options_sample(p):
    p.add_argument("--model", help="a checkpoint path or an MLflow model URI (runs:/<id>/model); default: "
                                   "the family=<name> model trained on the configured data")
    p.add_argument("-n", type=int, default=64, help="how many samples (default 64)")
    p.add_argument("-o", "--output", default="samples.png", help="output PNG, or .pt for the tensor")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, for families that take one")
    p.add_argument("--label", type=int, default=None, help="sample this class (models trained on labelled data)")


def _options_compare(p):
    p.add_argument("--runs", default=None, help="comma-separated MLflow run ids (default: the latest run per family)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: genzoo-<dataset>)")
    p.add_argument("--sweep", nargs="?", const="latest", default=None, metavar="ID",
                   help="one row per point of a `genzoo train -m` sweep: the latest (of family=<name>, if given), "
                        "or the sweep ID (the runs' genzoo.sweep tag)")
    p.add_argument("--all", action="store_true",
                   help="one row per finished run (of family=<name>, if given): pipeline runs and sweep points")


def _options_report(p):
    p.add_argument("--sweep", nargs="?", const="latest", default=None, metavar="ID",
                   help="instead of the pipeline's report, reports/sweeps/<ID>.html: one row per point of a "
                        "`genzoo train -m` sweep, the latest (of family=<name>, if given) or the sweep ID")


def _options_ui(p):
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")


# command -> (handler, one-line help, its own options)
COMMANDS: Dict[str, tuple] = {
    "fetch": (cmd_fetch, "stage: the configured data set -> data/prepared/<dataset>/", None),
    "featnet": (cmd_featnet, "stage: the FID feature network and the real-data floor", None),
    "train": (cmd_train, "stage: train one family (family=<name>), logged to MLflow", _options_train),
    "evaluate": (cmd_evaluate, "stage: score one trained family (family=<name>)", None),
    "report": (cmd_report, "stage: reports/metrics.json and reports/index.html", _options_report),
    "sample": (cmd_sample, "draw samples from a checkpoint or an MLflow model", _options_sample),
    "compare": (cmd_compare, "the comparison table of finished runs, from MLflow", _options_compare),
    "ui": (cmd_ui, "the MLflow UI over this project's store", _options_ui),
    "config": (cmd_config, "print the resolved config (params.yaml + overrides)", None),
}


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`genzoo train: error: unrecognized arguments: --port`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


VERBOSITY_OPTIONS = ("-q", "--quiet", "-v", "--verbose")


def _options_verbosity(p) -> None:
    """-q / -v, on the top-level parser and on every command's (before or after the command)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET, default=DEFAULT,
                   help="errors only (the result lines still go to stdout)")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE, default=DEFAULT,
                   help="INFO logs of genzoo and Lightning, and every warning unfiltered")


def parsers() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own."""
    top = Parser(prog="genzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"genzoo {_version()}")
    _options_verbosity(top)
    sub = top.add_subparsers(dest="command", metavar="<command>", required=True, parser_class=Parser)
    commands = {}
    for name, (handler, help_text, options) in COMMANDS.items():
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (Hydra grammar)")
        _options_verbosity(c)
        if options is not None:
            options(c)
        c.set_defaults(handler=handler, multirun=False, command=name, point=None)
        commands[name] = c
    return top, commands


def parse(argv: List[str]) -> argparse.Namespace:
    """The command's own parser reads everything after the command, with options and overrides in any
    order (`train -m a=1,2`); argparse's intermixed mode cannot see through subparsers, hence two steps. -q / -v
    before the command (`genzoo -q train`) are handed to the command's parser like those after it."""
    top, commands = parsers()
    argv = list(argv)
    lead = 0
    while lead < len(argv) and argv[lead] in VERBOSITY_OPTIONS:
        lead += 1
    if lead == len(argv) or argv[lead] not in commands:
        return top.parse_args(argv)  # --help, --version, or a usage error naming the commands
    args = commands[argv[lead]].parse_intermixed_args(argv[:lead] + argv[lead + 1:])
    _sweep_option_is_an_override(args)
    return args


def sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra's sweep grammar (`a=1,2 b=x,y`) expanded to the cartesian product of plain overrides."""
    from pipeline.sweeps import expand

    return expand(overrides)[0]


def run(argv: List[str]) -> None:
    args = parse(argv)
    configure_output(args.verbosity)
    from pipeline.config import load_config

    handler: Callable = args.handler
    if not args.multirun:
        handler(load_config(args.overrides), args)
        return
    run_sweep(args, load_config)


def run_sweep(args, load_config) -> None:
    """Every point's config is validated before any work; a point that fails (a diverged GAN, say) is reported
    and the sweep goes on; it ends with exit code 2 when any point failed."""
    from pipeline.sweeps import expand, new_sweep_id, sweep_point

    points, swept = expand(args.overrides)
    configs = [load_config(p) for p in points]
    sweep_id = new_sweep_id()
    named = [sweep_point(sweep_id, p, swept, cfg.family or "") for p, cfg in zip(points, configs)]
    print(f"sweep {sweep_id}: {len(points)} point(s)")
    failed = []
    for i, (cfg, point) in enumerate(zip(configs, named), 1):
        if args.verbosity > QUIET:  # progress, not a result
            print(f"sweep point {i}/{len(points)}: {' '.join(point.overrides) or '(no overrides)'}")
        args.point = point
        try:
            args.handler(cfg, args)
        except GenzooError as e:
            print(f"genzoo: error: sweep point {point.slug}: {e}", file=sys.stderr)
            failed.append(point.slug)
    if args.command == "train" and len(failed) < len(points):
        _sweep_report(configs, sweep_id)
    if failed:
        raise GenzooError(f"{len(failed)} of {len(points)} sweep points failed: {', '.join(failed)}")


def _sweep_report(configs, sweep_id: str) -> None:
    """The page of a trained (and evaluated) sweep, one row per point; a sweep across data sets has its points in
    several experiments, one page each: `genzoo report --sweep ID data.dataset=<name>`."""
    from pipeline.stages.sweep_report import sweep_report

    datasets = {cfg.data.dataset for cfg in configs}
    if len(datasets) == 1:
        cfg = configs[0]
        if len({c.family for c in configs}) > 1:  # a sweep over families: every point's row
            cfg = cfg.copy()
            cfg.family = None
        print(f"report: {sweep_report(cfg, sweep_id)}")
    else:
        print(f"report: genzoo report --sweep {sweep_id} data.dataset=<one of {', '.join(sorted(datasets))}>")


def main(argv=None) -> None:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except GenzooError as e:
        print(f"genzoo: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("genzoo: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
