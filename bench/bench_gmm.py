"""Time per EM iteration of genzoo's GMM against scikit-learn's GaussianMixture and torchgmm (the Lightning
GMM that succeeded PyCave), K = 10, covariance full and diag, N in {1e4, 1e5}, D in {2, 64}.

All three start from the same k-means++ means; genzoo and scikit-learn also share weights and
covariances, so after the same number of iterations their log-likelihoods must agree (checked). torchgmm
re-estimates covariances from the means on its own first epoch, so its final log-likelihood is reported
beside them rather than asserted equal.

Per-iteration time is (time for n + 1 iterations - time for 1) / n, so set-up and initialisation cancel:
- genzoo EM step: `e_step` over the data in chunks + `m_step`, what one Lightning epoch computes;
- genzoo Trainer epoch: the same through `Trainer.fit` (chunk-sized batches, and the pipeline's 128);
- scikit-learn: `GaussianMixture.fit(max_iter=...)`, tol=0 (float64, like genzoo);
- torchgmm: `GaussianMixture.fit` with trainer max_epochs, full-batch, float32 (its default).

Prints a markdown table (stdout) and writes bench/results/gmm.json. Usage: python bench/bench_gmm.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import SequentialSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.contract import DataInfo  # noqa: E402
from lightning_modules.common.gaussian import covariances_from_precision_cholesky  # noqa: E402
from lightning_modules.gmm import GMM  # noqa: E402
from pipeline.data.datamodule import BatchIndexedDataset, batch_loader  # noqa: E402

K = 10
CHUNK = 16384  # rows per e_step call (a Lightning batch; e_step works through it in blocks of E_STEP_ROWS)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_iteration(run, n: int):
    """(t(n + 1) - t(1)) / n, the cost of one more iteration with set-up cancelled, and run(n + 1)'s result."""
    out = []
    t_long = timed(lambda: out.append(run(n + 1)))
    return max(t_long - timed(lambda: run(1)), 0.0) / n, out[0]


def make_data(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 4 * rng.standard_normal((K, dim))
    scales = rng.uniform(0.5, 1.5, (K, dim))
    c = rng.integers(0, K, n)
    return (centres[c] + scales[c] * rng.standard_normal((n, dim))).astype(np.float32)


def initial_model(x: np.ndarray, covariance_type: str) -> GMM:
    model = GMM({"n_components": K, "covariance_type": covariance_type, "reg_covar": 1e-6, "tol": 0.0,
                 "init_subsample": 10_000}, DataInfo(shape=(x.shape[1],), kind="vector").to_dict())
    g = torch.Generator().manual_seed(0)
    model.initialize(torch.from_numpy(x[torch.randperm(len(x), generator=g)[:10_000].numpy()]))
    return model


def copy_of(model: GMM) -> GMM:
    clone = GMM(dataclasses.asdict(model.config), model.info.to_dict())
    clone.load_state_dict(model.state_dict())
    return clone


def genzoo_em(init: GMM, xt: torch.Tensor):
    def run(iters: int) -> GMM:
        model = copy_of(init)
        for _ in range(iters):
            stats = {}
            for i in range(0, len(xt), CHUNK):
                for k, v in model.e_step(xt[i : i + CHUNK]).items():
                    stats[k] = stats[k] + v if k in stats else v
            model.m_step(stats)  # its self.log is a no-op outside a Trainer
        return model
    return run


def genzoo_trainer(init: GMM, xt: torch.Tensor, batch_size: int):
    import pytorch_lightning as pl

    def run(iters: int) -> GMM:
        model = copy_of(init)
        data = BatchIndexedDataset(xt, torch.zeros(len(xt)))  # the pipeline's loading path
        loader = batch_loader(data, SequentialSampler(data), batch_size)
        pl.Trainer(max_epochs=iters, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(model, loader)
        return model
    return run


def sklearn_em(init: GMM, x64: np.ndarray, covariance_type: str):
    from sklearn.mixture import GaussianMixture

    cov = covariances_from_precision_cholesky(init.prec_chol, covariance_type).numpy()
    prec = np.linalg.inv(cov) if covariance_type == "full" else 1.0 / cov

    def run(iters: int):
        gm = GaussianMixture(K, covariance_type=covariance_type, reg_covar=1e-6, max_iter=iters, tol=0.0,
                             weights_init=init.weights.numpy(), means_init=init.means.numpy(), precisions_init=prec)
        return gm.fit(x64)
    return run


def torchgmm_em(init: GMM, xt: torch.Tensor, covariance_type: str):
    from torchgmm.bayes import GaussianMixture

    def run(iters: int):
        gm = GaussianMixture(K, covariance_type=covariance_type, covariance_regularization=1e-6, init_means=init.means.float(),
                             convergence_tolerance=0.0,
                             trainer_params={"max_epochs": iters, "accelerator": "cpu", "devices": 1,
                                             "enable_progress_bar": False, "logger": False,
                                             "enable_checkpointing": False, "enable_model_summary": False})
        return gm.fit(xt)
    return run


def bench_one(n: int, dim: int, covariance_type: str, iters: int, small_batch: bool) -> dict:
    x = make_data(n, dim)
    xt, x64 = torch.from_numpy(x), x.astype(np.float64)
    init = initial_model(x, covariance_type)
    row = {"n": n, "d": dim, "k": K, "covariance_type": covariance_type, "iters": iters}

    row["genzoo_em_s"], model = per_iteration(genzoo_em(init, xt), iters)
    ours = model.log_prob(xt).mean().item()
    row["genzoo_f32_em_s"], model32 = per_iteration(genzoo_em(with_precision(init, "float32"), xt), iters)
    row["genzoo_f32_loglik"] = model32.log_prob(xt).mean().item()
    row["f32_loglik_rel_diff"] = abs(row["genzoo_f32_loglik"] - ours) / abs(ours)
    assert row["f32_loglik_rel_diff"] < 1e-4, row
    if covariance_type == "full":  # the E- and M-step products: [x, 1] (N, D+1) @ (D+1, K D), x^T (D, N) @ (N, K D)
        flops = 2 * n * (dim + 1) * K * dim + 2 * n * dim * K * dim
        row["genzoo_f32_gflops"] = flops / row["genzoo_f32_em_s"] / 1e9 if row["genzoo_f32_em_s"] else None
        row["genzoo_f64_gflops"] = flops / row["genzoo_em_s"] / 1e9 if row["genzoo_em_s"] else None
    row["genzoo_trainer_epoch_s"], _ = per_iteration(genzoo_trainer(init, xt, CHUNK), iters)
    if small_batch:
        row["genzoo_trainer_epoch_b128_s"], _ = per_iteration(genzoo_trainer(init, xt, 128), 1)

    row["sklearn_s"], sk = per_iteration(sklearn_em(init, x64, covariance_type), iters)
    row["sklearn_loglik"] = sk.score(x64)
    row["genzoo_loglik"] = ours
    row["loglik_rel_diff_vs_sklearn"] = abs(ours - row["sklearn_loglik"]) / abs(row["sklearn_loglik"])
    assert row["loglik_rel_diff_vs_sklearn"] < 1e-6, row

    try:
        row["torchgmm_s"], tg = per_iteration(torchgmm_em(init, xt, covariance_type), iters)
        row["torchgmm_loglik"] = -tg.score(xt)
    except ImportError:
        row["torchgmm_s"] = row["torchgmm_loglik"] = None
    peers = [t for t in (row["sklearn_s"], row["torchgmm_s"]) if t]
    row["ratio_vs_fastest_peer"] = row["genzoo_em_s"] / min(peers)
    row["f32_ratio_vs_sklearn"] = row["genzoo_f32_em_s"] / row["sklearn_s"] if row["sklearn_s"] else None
    row["f32_ratio_vs_torchgmm"] = row["genzoo_f32_em_s"] / row["torchgmm_s"] if row["torchgmm_s"] else None
    return row


def with_precision(init: GMM, precision: str) -> GMM:
    clone = GMM({**dataclasses.asdict(init.config), "precision": precision}, init.info.to_dict())
    clone.load_state_dict(init.state_dict())
    return clone


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The machine's matrix-product speed in GFLOP/s (best of `repeats` square products), measured in this run."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def fmt(t) -> str:
    return "n/a" if t is None else f"{1000 * t:.1f}"


def ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def precision_table(rows, peaks) -> str:
    head = ("| N | D | cov | float64 EM step (ms) | float32 EM step (ms) | float32 / scikit-learn | float32 / torchgmm "
            "| float32 GFLOP/s (peak) | float64 GFLOP/s (peak) | float32 loglik rel. diff |\n"
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        g32, g64 = r.get("genzoo_f32_gflops"), r.get("genzoo_f64_gflops")
        flops32 = "n/a" if g32 is None else f"{g32:.1f} ({peaks['float32']:.0f})"
        flops64 = "n/a" if g64 is None else f"{g64:.1f} ({peaks['float64']:.0f})"
        lines.append(f"| {r['n']:.0e} | {r['d']} | {r['covariance_type']} | {fmt(r['genzoo_em_s'])} "
                     f"| {fmt(r['genzoo_f32_em_s'])} | {ratio(r['f32_ratio_vs_sklearn'])} | {ratio(r['f32_ratio_vs_torchgmm'])} "
                     f"| {flops32} | {flops64} | {r['f32_loglik_rel_diff']:.1e} |")
    return head + "\n".join(lines)


def table(rows) -> str:
    head = ("| N | D | cov | genzoo EM step (ms) | genzoo Trainer epoch (ms) | Trainer epoch, batch 128 (ms) "
            "| scikit-learn (ms) | torchgmm (ms) | genzoo / fastest peer | mean loglik genzoo / sklearn / torchgmm |\n"
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = [f"| {r['n']:.0e} | {r['d']} | {r['covariance_type']} | {fmt(r['genzoo_em_s'])} | {fmt(r['genzoo_trainer_epoch_s'])} "
             f"| {fmt(r.get('genzoo_trainer_epoch_b128_s'))} | {fmt(r['sklearn_s'])} | {fmt(r['torchgmm_s'])} "
             f"| {r['ratio_vs_fastest_peer']:.2f} | {r['genzoo_loglik']:.4f} / {r['sklearn_loglik']:.4f} / "
             f"{'n/a' if r['torchgmm_loglik'] is None else format(r['torchgmm_loglik'], '.4f')} |" for r in rows]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N = 1e4 only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads for every library (1: stable timings on a shared CPU)")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    peaks = {str(dt).removeprefix("torch."): gemm_peak(dt) for dt in (torch.float32, torch.float64)}
    log(f"GEMM peak, {args.threads} thread(s): {peaks}")
    rows = []
    for n in (10_000,) if args.quick else (10_000, 100_000):
        for dim in (2, 64):
            for covariance_type in ("full", "diag"):
                log(f"N={n} D={dim} {covariance_type} ...")
                rows.append(bench_one(n, dim, covariance_type, iters=5 if n <= 10_000 else 2, small_batch=n <= 10_000))
                log(json.dumps(rows[-1]))
    out = ROOT / "bench" / "results" / "gmm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "k": K, "chunk": CHUNK, "gemm_peak_gflops": peaks}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"\nK = {K}; per-iteration times as (t(n+1) - t(1)) / n with {args.threads} thread(s) for torch and BLAS; "
          "genzoo and scikit-learn in float64, torchgmm in float32; genzoo's EM step feeds e_step "
          f"{CHUNK}-row chunks. Log-likelihoods are per example after n + 1 iterations.")
    print("\n### `gmm.precision: float32`\n")
    print(precision_table(rows, peaks))
    print("\nThe same EM from the same start with `precision: float32` (E-step arithmetic in float32, statistics "
          "in float64). GFLOP/s: the E- and M-step matrix products (4 N K D^2 flops) per float32 / float64 EM "
          "step; in brackets the machine's square-GEMM peak measured in this run with the same threads. Loglik "
          "rel. diff: float32 against float64 after the same iterations.")


if __name__ == "__main__":
    main()
