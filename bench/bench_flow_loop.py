"""Lightning overhead of the flow family: the training-step time of `Flow` inside a real `Trainer.fit`
against a plain PyTorch loop doing the same work (same model init, batches, optimizer), and sampling
throughput at batch 1024.

    python bench/bench_flow_loop.py [--batches 60] [--warmup 10] [--repeats 3]

Writes bench/results/flow.json and prints a markdown table. Runs alternate (plain, Lightning, plain, ...)
and the median per-step time of each is reported, to damp the noise of a shared CPU.
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

DIGITS = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
TOY = {"shape": [2], "kind": "vector"}


def digits_loader(batch_size: int, n_batches: int) -> DataLoader:
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(0)
    levels = torch.tensor(load_digits().images, dtype=torch.float32)[:, None]
    x = ((levels + torch.rand(levels.shape, generator=g)) / 17).repeat(1 + n_batches * batch_size // len(levels), 1, 1, 1)
    x = x[: n_batches * batch_size]
    return DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch_size, shuffle=False)


def new_model() -> Flow:
    return Flow({}, DIGITS)  # same seed -> identical initial weights every time


class StepClock(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.warmup - 1:
            self.t0 = time.perf_counter()
        elif batch_idx >= self.warmup:
            self.t1, self.n = time.perf_counter(), self.n + 1


def lightning_step_seconds(loader: DataLoader, warmup: int, root: Path) -> float:
    model, clock = new_model(), StepClock(warmup)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root)
    trainer.fit(model, loader)
    return (clock.t1 - clock.t0) / clock.n


def plain_step_seconds(loader: DataLoader, warmup: int) -> float:
    model = new_model().train()
    opt, sched = model.optimizer_and_schedule(len(loader))  # what configure_optimizers gives the Trainer
    t0 = None
    for i, (x, _) in enumerate(loader):
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if i == warmup - 1:
            t0 = time.perf_counter()
    return (time.perf_counter() - t0) / (len(loader) - warmup)


def samples_per_second(info: dict, n: int = 1024, repeats: int = 5) -> float:
    model = Flow({}, info).eval()
    model.sample(n)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.sample(n)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "flow.json"))
    args = ap.parse_args()

    loader = digits_loader(args.batch_size, args.batches)
    root = ROOT / "bench" / "results" / "lightning_root"
    plain, lit = [], []
    for _ in range(args.repeats):
        plain.append(plain_step_seconds(loader, args.warmup))
        lit.append(lightning_step_seconds(loader, args.warmup, root))
    p, q = statistics.median(plain), statistics.median(lit)
    result = {
        "model": "flow (default Config) on digits 1x8x8",
        "batch_size": args.batch_size,
        "timed_batches": args.batches - args.warmup,
        "repeats": args.repeats,
        "plain_step_ms": 1e3 * p,
        "lightning_step_ms": 1e3 * q,
        "ratio": q / p,
        "plain_step_ms_all": [1e3 * t for t in plain],
        "lightning_step_ms_all": [1e3 * t for t in lit],
        "samples_per_second_digits_b1024": samples_per_second(DIGITS),
        "samples_per_second_toy2d_b1024": samples_per_second(TOY),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "note": "shared CPU: timings are noisy",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    print(f"| plain PyTorch step (ms, median of {args.repeats}) | {result['plain_step_ms']:.2f} |")
    print(f"| Lightning step (ms, median of {args.repeats}) | {result['lightning_step_ms']:.2f} |")
    print(f"| Lightning / plain | {result['ratio']:.3f} (target <= 1.05) |")
    print(f"| samples/s, digits, batch 1024 | {result['samples_per_second_digits_b1024']:.0f} |")
    print(f"| samples/s, toy2d (MAF), batch 1024 | {result['samples_per_second_toy2d_b1024']:.0f} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
