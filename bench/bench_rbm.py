"""RBM benchmark: genzoo's RBM against scikit-learn's BernoulliRBM on binarised digits, at equal settings and
equal quality.

Both run PCD-1 (sklearn's only algorithm: persistent chains, one Gibbs sweep per update, as many chains as
the batch), the same n_hidden, batch size, learning rate and number of epochs, no momentum and no weight
decay (sklearn has neither), one thread each. Timed per epoch:
- sklearn: `BernoulliRBM(n_iter=E).fit` total / E;
- genzoo raw step: the module's own `cd_step` + SGD over the same batches, no Lightning;
- genzoo Lightning: `Trainer.fit` epochs (median of per-epoch times from a callback; validation off).
Quality: the exact log-likelihood when n_hidden <= 20 (enumeration over the hidden layer), else the AIS
estimate, plus the exact pseudo-likelihood and sklearn's own `score_samples` applied to both models' weights.

    .venv/bin/python bench/bench_rbm.py [--epochs 30] [--hidden 16 64] [--lr 0.1]

Writes bench/results/rbm.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.neural_network import BernoulliRBM
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.rbm import RBM

RESULTS = Path(__file__).parent / "results" / "rbm.json"
INFO = dict(shape=[1, 8, 8], kind="image", levels=17, num_classes=10)


def digits(seed: int = 0):
    """Dequantised digits in [0, 1] (as the pipeline serves them), 1257 train / 180 val."""
    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.images))
    x = torch.from_numpy((d.images[idx][:, None] + rng.random((len(idx), 1, 8, 8))) / 17).float()
    return x[:1257], x[1257:1437]


def binary(x: torch.Tensor) -> np.ndarray:
    return (x.flatten(1) > 0.5).double().numpy()


def genzoo_model(args, n_hidden: int) -> RBM:
    cfg = dict(visible="bernoulli", conditional=False, n_hidden=n_hidden, persistent=True, n_chains=args.batch_size,
               cd_k=1, lr=args.lr, momentum=0.0,
               weight_decay=0.0, max_epochs=args.epochs, seed=args.seed)
    return RBM(cfg, INFO)


# --- timing ------------------------------------------------------------------------------------------------
def time_sklearn(args, n_hidden, train):
    model = BernoulliRBM(n_components=n_hidden, learning_rate=args.lr, batch_size=args.batch_size,
                         n_iter=args.epochs, random_state=args.seed)
    t = time.perf_counter()
    model.fit(binary(train))
    return model, (time.perf_counter() - t) / args.epochs


def time_raw_step(args, n_hidden, train):
    torch.manual_seed(args.seed)
    model = genzoo_model(args, n_hidden)
    model.set_statistics(model.units.statistics(train.flatten(1)))
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train), generator=g).split(args.batch_size):
            loss, _ = model.cd_step(train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (time.perf_counter() - t) / args.epochs


class EpochTimer(pl.Callback):
    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds.append(time.perf_counter() - self._t)


def time_lightning(args, n_hidden, train, tmp):
    pl.seed_everything(args.seed, verbose=False)
    model = genzoo_model(args, n_hidden)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[timer], default_root_dir=tmp)
    loader = DataLoader(TensorDataset(train, torch.zeros(len(train))), batch_size=args.batch_size, shuffle=True)
    model.provide_init_data(train)
    trainer.fit(model, loader)  # on_train_end computes log Z: not inside any epoch
    return model, statistics.median(timer.seconds)


# --- quality -------------------------------------------------------------------------------------------------
def as_genzoo(sk: BernoulliRBM, args, train) -> RBM:
    model = genzoo_model(args, sk.n_components)
    model.set_statistics(model.units.statistics(train.flatten(1)))
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(sk.components_.T))
        model.b.copy_(torch.from_numpy(sk.intercept_visible_))
        model.c.copy_(torch.from_numpy(sk.intercept_hidden_))
    model.refresh_log_z()
    return model


def as_sklearn(model: RBM, sk_template: BernoulliRBM) -> BernoulliRBM:
    sk = copy.deepcopy(sk_template)
    sk.components_ = model.W.detach().double().numpy().T.copy()
    sk.intercept_visible_ = model.b.detach().double().numpy().copy()
    sk.intercept_hidden_ = model.c.detach().double().numpy().copy()
    return sk


def quality(model: RBM, sk: BernoulliRBM, val) -> dict:
    bits = torch.from_numpy(binary(val)).float()
    with torch.no_grad():
        log_p_bits = model.log_prob(val) - val[0].numel() * math.log(2)  # undo the data-space 2^D factor
        pl_exact = model.energy().pseudo_log_likelihood(bits)
    return {"val_log_lik": float(log_p_bits.mean()), "log_lik_kind": "exact" if bool(model.log_z_exact) else "AIS",
            "val_pseudo_log_lik": float(pl_exact.mean()),
            "val_sklearn_score_samples": float(sk.score_samples(bits.double().numpy()).mean())}


def run(args) -> dict:
    torch.set_num_threads(1)
    train, val = digits(args.seed)
    rows = []
    for n_hidden in args.hidden:
        with threadpool_limits(1):
            sk, sk_epoch = time_sklearn(args, n_hidden, train)
        raw_epoch = time_raw_step(args, n_hidden, train)
        model, pl_epoch = time_lightning(args, n_hidden, train, args.tmp)
        rows.append({
            "n_hidden": n_hidden,
            "seconds_per_epoch": {"sklearn": sk_epoch, "genzoo_raw_step": raw_epoch, "genzoo_lightning": pl_epoch},
            "ratio_vs_sklearn": {"genzoo_raw_step": raw_epoch / sk_epoch, "genzoo_lightning": pl_epoch / sk_epoch},
            "quality": {"sklearn": quality(as_genzoo(sk, args, train), sk, val),
                        "genzoo": quality(model, as_sklearn(model, sk), val)},
        })
    return {"dataset": "digits (binarised at 0.5)", "n_train": len(train), "n_val": len(val),
            "settings": {"algorithm": "PCD-1", "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
                         "momentum": 0.0, "weight_decay": 0.0, "threads": 1},
            "torch": torch.__version__, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| n_hidden | sklearn s/epoch | genzoo raw s/epoch | genzoo Lightning s/epoch | raw / sklearn | "
             "Lightning / sklearn | val log-lik sklearn | val log-lik genzoo | val PL sklearn | val PL genzoo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, q = r["seconds_per_epoch"], r["quality"]
        lines.append(
            f"| {r['n_hidden']} | {s['sklearn'] * 1e3:.1f} ms | {s['genzoo_raw_step'] * 1e3:.1f} ms | "
            f"{s['genzoo_lightning'] * 1e3:.1f} ms | {r['ratio_vs_sklearn']['genzoo_raw_step']:.2f}x | "
            f"{r['ratio_vs_sklearn']['genzoo_lightning']:.2f}x | "
            f"{q['sklearn']['val_log_lik']:.2f} ({q['sklearn']['log_lik_kind']}) | "
            f"{q['genzoo']['val_log_lik']:.2f} ({q['genzoo']['log_lik_kind']}) | "
            f"{q['sklearn']['val_pseudo_log_lik']:.2f} | {q['genzoo']['val_pseudo_log_lik']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, nargs="+", default=[16, 64])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="Lightning's default_root_dir (a temporary folder if unset)")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = args.tmp or tmp
        result = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\n(wrote {RESULTS}; timings on a shared CPU are noisy)")


if __name__ == "__main__":
    main()
