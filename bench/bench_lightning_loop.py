"""Lightning overhead of the deep families: the training-step time of `Flow` and `GAN` inside a real
`Trainer.fit` against a plain PyTorch loop doing the same work (same model init, batches, optimizers,
the module's own loss functions), and sampling throughput of every family at batch 1024.

    python bench/bench_lightning_loop.py [--batches 60] [--warmup 10] [--repeats 3]

Writes bench/results/lightning_loop.json and prints markdown tables. Runs alternate (plain, Lightning,
plain, ...) and the median per-step time of each is reported, to damp the noise of a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.flow import Flow  # noqa: E402
from lightning_modules.common.ema import ema_decay_at, ema_update_
from lightning_modules.gan.model import GAN  # noqa: E402

DIGITS = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
TOY = {"shape": [2], "kind": "vector"}


def digits_loader(batch_size: int, n_batches: int) -> DataLoader:
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(0)
    levels = torch.tensor(load_digits().images, dtype=torch.float32)[:, None]
    x = ((levels + torch.rand(levels.shape, generator=g)) / 17).repeat(1 + n_batches * batch_size // len(levels), 1, 1, 1)
    x = x[: n_batches * batch_size]
    return DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch_size, shuffle=False)


def new_flow() -> Flow:
    return Flow({}, DIGITS)  # same seed -> identical initial weights every time


def new_gan() -> GAN:
    return GAN({}, DIGITS)


class StepClock(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.warmup - 1:
            self.t0 = time.perf_counter()
        elif batch_idx >= self.warmup:
            self.t1, self.n = time.perf_counter(), self.n + 1


def lightning_step_seconds(model: pl.LightningModule, loader: DataLoader, warmup: int, root: Path) -> float:
    clock = StepClock(warmup)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root)
    trainer.fit(model, loader)
    return (clock.t1 - clock.t0) / clock.n


def timed_loop(loader: DataLoader, warmup: int, step) -> float:
    t0 = None
    for i, (x, _) in enumerate(loader):
        step(x)
        if i == warmup - 1:
            t0 = time.perf_counter()
    return (time.perf_counter() - t0) / (len(loader) - warmup)


def plain_flow_step_seconds(loader: DataLoader, warmup: int) -> float:
    model = new_flow().train()
    opt, sched = model.optimizer_and_schedule(len(loader))  # what configure_optimizers gives the Trainer

    def step(x):
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()

    return timed_loop(loader, warmup, step)


def plain_gan_step_seconds(loader: DataLoader, warmup: int) -> float:
    """GAN.training_step without Lightning: one D step, one G step (n_critic = 1), the EMA update."""
    model = new_gan().train()
    opt_g, opt_d = model.configure_optimizers()
    g_steps = 0

    def step(x):
        nonlocal g_steps
        loss_d = model.discriminator_loss(x, model.generator(model.noise(len(x))))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = model.loss.generator(model.discriminator(model.generator(model.noise(len(x)))))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        g_steps += 1
        ema_update_(model.generator_ema, model.generator, ema_decay_at(model.config.ema_decay, g_steps))

    return timed_loop(loader, warmup, step)


def samples_per_second(model, n: int = 1024, repeats: int = 5) -> float:
    model = model.eval()
    model.sample(n)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.sample(n)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def every_family_on_digits():
    """Each family built from params.yaml's section for the default data (untrained: sampling cost does
    not depend on the weights)."""
    from lightning_modules.registry import FAMILIES, family_class
    from pipeline.config import family_section, load_config

    cfg = load_config([], params_file=str(ROOT / "params.yaml"))
    return {name: family_class(name)(family_section(cfg, name), DIGITS) for name in FAMILIES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lightning_loop.json"))
    args = ap.parse_args()

    root = ROOT / "bench" / "results" / "lightning_root"
    loops = {"flow": (new_flow, plain_flow_step_seconds), "gan": (new_gan, plain_gan_step_seconds)}
    steps = {}
    for batch_size in args.batch_sizes:
        loader = digits_loader(batch_size, args.batches)
        for name, (new_model, plain_step) in loops.items():
            plain, lit = [], []
            for _ in range(args.repeats):
                plain.append(plain_step(loader, args.warmup))
                lit.append(lightning_step_seconds(new_model(), loader, args.warmup, root))
            p, q = statistics.median(plain), statistics.median(lit)
            steps[f"{name}, batch {batch_size}"] = {
                "plain_step_ms": 1e3 * p, "lightning_step_ms": 1e3 * q, "ratio": q / p,
                "plain_step_ms_all": [1e3 * t for t in plain], "lightning_step_ms_all": [1e3 * t for t in lit]}
    sampling = {name: samples_per_second(model) for name, model in every_family_on_digits().items()}
    sampling["flow (toy2d, MAF)"] = samples_per_second(Flow({}, TOY))
    sampling["gan (toy2d, MLP)"] = samples_per_second(GAN({}, TOY))
    result = {
        "data": "digits 1x8x8, default params.yaml sections",
        "batch_sizes": args.batch_sizes,
        "timed_batches": args.batches - args.warmup,
        "repeats": args.repeats,
        "steps": steps,
        "samples_per_second_b1024": sampling,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Training step (median of {args.repeats} alternating runs, "
          f"{args.batches - args.warmup} timed steps each):\n")
    print("| family, batch | plain PyTorch step (ms) | Lightning step (ms) | Lightning / plain (target <= 1.05) |\n|---|---:|---:|---:|")
    for name, r in steps.items():
        print(f"| {name} | {r['plain_step_ms']:.2f} | {r['lightning_step_ms']:.2f} | {r['ratio']:.3f} |")
    print("\nSampling, batch 1024 (median of 5):\n\n| family | samples / s |\n|---|---:|")
    for name, v in sampling.items():
        print(f"| {name} | {v:,.0f} |")
    print(f"\nwritten {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
