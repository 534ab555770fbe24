"""`genzoo <command> [key=value ...]`: the pipeline stages and tools behind one console script.

Every params.yaml key can be overridden in Hydra's grammar (`vae.latent_dim=8 trainer.devices=2`);
`family=<name>` picks the family. `genzoo train -m vae.beta=0.5,1,2` sweeps (one MLflow run per point).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import List

from pipeline.errors import GenzooError

COMMANDS = ("fetch", "featnet", "train", "evaluate", "report", "sample", "compare", "ui")


def _quiet() -> None:
    from pipeline.tracking import quiet_telemetry

    quiet_telemetry()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_fetch(cfg, args):
    from pipeline.fetch import fetch

    m = fetch(cfg)
    print(f"fetched {m['dataset']}: " + ", ".join(f"{k} {v['n']}" for k, v in m["splits"].items()))


def cmd_featnet(cfg, args):
    from pipeline.featnet import run_featnet

    r = run_featnet(cfg)
    print("featnet: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()))


def cmd_train(cfg, args):
    from pipeline.train import train

    print(f"trained {cfg.family}: {train(cfg)}")


def cmd_evaluate(cfg, args):
    from pipeline.evaluate import evaluate

    r = evaluate(cfg)
    print(f"{cfg.family}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())))


def cmd_report(cfg, args):
    from pipeline.report import report

    print(f"report: {report(cfg)}")


def cmd_sample(cfg, args):
    from pipeline.sample import sample_to_file

    print(f"samples: {sample_to_file(args.model, args.n, args.output, args.temperature)}")


def cmd_compare(cfg, args):
    from pipeline.compare import compare

    compare(cfg, args.runs, args.experiment)


def cmd_ui(cfg, args):
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(cfg)
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("-m", "--multirun", action="store_true", help="train: sweep comma-separated override values")
    p.add_argument("--model", help="sample: a checkpoint path or an MLflow model URI (runs:/<id>/model)")
    p.add_argument("-n", type=int, default=64, help="sample: how many samples")
    p.add_argument("-o", "--output", default="samples.png", help="sample: output PNG (or .pt for the tensor)")
    p.add_argument("--temperature", type=float, default=None, help="sample: temperature, for families that take one")
    p.add_argument("--runs", default=None, help="compare: comma-separated MLflow run ids (default: latest per family)")
    p.add_argument("--experiment", default=None, help="compare: MLflow experiment name (default: genzoo-<dataset>)")
    p.add_argument("--port", type=int, default=5000, help="ui: port on 127.0.0.1")
    return p


def sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra's sweep grammar (`a=1,2 b=x,y`) expanded to the cartesian product of plain overrides."""
    from pipeline.config import parse_overrides

    axes = []
    for ov in parse_overrides(overrides):
        key = ov.get_key_element()
        values = [str(v) for v in ov.sweep_string_iterator()] if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def run(argv: List[str]) -> None:
    args = parser().parse_intermixed_args(argv)  # `train -m a=1,2`: options between positionals
    _quiet()
    from pipeline.config import load_config

    handler = globals()[f"cmd_{args.command}"]
    points = sweep(args.overrides) if args.multirun else [args.overrides]
    if args.multirun and args.command != "train":
        raise GenzooError("-m/--multirun is for `genzoo train`")
    for point in points:
        cfg = load_config(point)
        if len(points) > 1:
            print(f"sweep point: {' '.join(point)}")
        handler(cfg, args)


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
