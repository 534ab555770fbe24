"""Semi-supervised accuracy of every family against labels per class, with seeds and their spread.

Each run trains a family exactly as the train stage does (same data module, seeding callbacks and
Trainer settings, no MLflow), on the prepared digits split with `labels_per_class` seeded labels per
class and the rest hidden, then scores the family's own classifier p(y | x) on the test split (`semi_acc`).
Beside them: the supervised-only baselines on the same labelled examples (logistic regression on pixels).

Runs go in parallel processes (one thread each). Writes bench/results/semi_supervised.json and prints the
markdown table BENCHMARKS.md holds.

Usage: python bench/semi_supervised.py [--families gmm vae] [--labels 1 5 10 50] [--seeds 0 1 2]
                                       [--data data/prepared/digits] [--jobs N] [--max-epochs N]
                                       [--set family.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEMI_FAMILIES = ["gmm", "hmm", "rbm", "vae", "gan", "flow", "diffusion"]
# published figures for the same methods on MNIST with 100 labels (10 per class), test accuracy
PUBLISHED = {"vae": ("M2, Kingma et al. 2014", 0.88), "gan": ("Improved-GAN, Salimans et al. 2016", 0.991),
             "flow": ("FlowGMM, Izmailov et al. 2020", 0.989)}


def _params(family: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())[family]


def run_one(job: dict) -> dict:
    """Train one family on one labelled subset; returns its test accuracy and wall time."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    import pytorch_lightning as pl

    from lightning_modules.registry import family_class
    from pipeline.callbacks import FailOnNonFiniteLoss, ReseedEachStep
    from pipeline.data.datamodule import PreparedDataModule
    from pipeline.data.labelled import select_labelled

    family, per_class, seed = job["family"], job["labels"], job["seed"]
    cls = family_class(family)
    section = {**_params(family), **job.get("overrides", {}), "conditional": True, "seed": seed}
    dm = PreparedDataModule(job["data"], batch_size=128, seed=seed, fixed_train_noise=cls.exact_sharding,
                            exact_sharding=cls.exact_sharding)
    y_all = dm.labels("train").numpy()
    dm.use_labelled(select_labelled(y_all, per_class, dm.info.num_classes, seed))
    train_y = dm.labels("train")
    pl.seed_everything(seed, workers=True, verbose=False)
    model = cls(section, dm.info.to_dict())
    model.set_class_prior(train_y)
    if cls.needs_init_data:
        model.provide_init_data(dm.split("train")[0], train_y)
    epochs = job.get("max_epochs") or model.config.max_epochs
    trainer = pl.Trainer(accelerator=job.get("accelerator", "cpu"), devices=1, max_epochs=epochs, deterministic=True,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[ReseedEachStep(seed), FailOnNonFiniteLoss()])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    x_test, y_test = dm.split("test")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model.classify(chunk.to(model.device)).argmax(1).cpu() for chunk in x_test.split(256)])
    return {**{k: job[k] for k in ("family", "labels", "seed")}, "semi_acc": float((pred == y_test).float().mean()),
            "train_seconds": seconds, "epochs": epochs}


def logistic_regression(job: dict) -> dict:
    """The supervised-only baseline on the same labelled pixels."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.data.datamodule import PreparedDataModule
    from pipeline.data.labelled import select_labelled

    dm = PreparedDataModule(job["data"])
    (xtr, ytr), (xte, yte) = dm.split("train"), dm.split("test")
    idx = select_labelled(ytr.numpy(), job["labels"], dm.info.num_classes, job["seed"])
    clf = LogisticRegression(max_iter=5000).fit(xtr[idx].flatten(1).double().numpy(), ytr[idx].numpy())
    acc = float((clf.predict(xte.flatten(1).double().numpy()) == yte.numpy()).mean())
    return {"family": "logreg", "labels": job["labels"], "seed": job["seed"], "semi_acc": acc, "train_seconds": 0.0}


def summarise(results: list) -> str:
    families = list(dict.fromkeys(r["family"] for r in results))
    labels = sorted({r["labels"] for r in results})
    lines = ["| family | " + " | ".join(f"{n} / class" for n in labels) + " | published, MNIST 100 labels |",
             "|---" * (len(labels) + 2) + "|"]
    for f in families:
        cells = []
        for n in labels:
            accs = [r["semi_acc"] for r in results if r["family"] == f and r["labels"] == n]
            cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f} (n={len(accs)})" if accs else "")
        name, value = PUBLISHED.get(f, ("", None))
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {f'{value:.3f} ({name})' if value else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=SEMI_FAMILIES)
    ap.add_argument("--labels", nargs="+", type=int, default=[1, 5, 10, 50])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", default=str(ROOT / "data/prepared/digits"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="family.key=value overrides (YAML values)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/semi_supervised.json"))
    args = ap.parse_args()
    import yaml

    overrides: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        fam, name = key.split(".", 1)
        overrides.setdefault(fam, {})[name] = yaml.safe_load(value)
    base = {"data": args.data, "max_epochs": args.max_epochs, "accelerator": args.accelerator}
    jobs = [{**base, "family": f, "labels": n, "seed": s, "overrides": overrides.get(f, {})}
            for f in args.families for n in args.labels for s in args.seeds]
    jobs.sort(key=lambda j: -_params(j["family"]).get("max_epochs", 0))  # long runs first
    start = time.perf_counter()
    results = [logistic_regression({**base, "labels": n, "seed": s}) for n in args.labels for s in args.seeds]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(run_one, job) for job in jobs]):
            r = future.result()
            print(json.dumps(r), flush=True)
            results.append(r)  # written as they come, so a run cut short keeps what finished
            out.write_text(json.dumps({"results": results, "wall_seconds": time.perf_counter() - start}, indent=1) + "\n")
    wall = time.perf_counter() - start
    print(summarise(results))
    print(f"\nwall time {wall:.0f} s, {len(jobs)} training runs on {args.jobs} processes")


if __name__ == "__main__":
    main()
