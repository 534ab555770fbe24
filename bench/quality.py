"""Density quality at equal wall time: genzoo's likelihood families against what a user would pick instead.

genzoo's families are trained and evaluated the way a user runs them (`genzoo train` + `genzoo evaluate`,
default params.yaml, in a scratch copy of the project). Each peer is then trained on the same prepared
digits split for the wall time genzoo's best family took, and scored the same way: test NLL in nats of
the discrete pixel levels, -mean log p((level + u) / L) + D ln L, the `nll` of reports/metrics.json.

Peers: zuko's NSF and MAF (5 transforms of 256x256, Adam 1e-3, batch 128, best validation epoch, on
logit(alpha + (1 - 2 alpha) x) like genzoo's flow), scikit-learn's KernelDensity (bandwidth picked on the
validation split) and GaussianMixture (genzoo's GMM defaults). Samples: pythae's VAE against genzoo's,
by FID in genzoo's feature space at the genzoo VAE's training time (pythae's Bernoulli decoder on [0, 1]
pixels defines no density of the dequantised levels, so it has no NLL row).

    .venv/bin/python bench/quality.py [--families gmm hmm vae flow] [--threads 2]

Runs `genzoo fetch` first where data/prepared/digits is missing. Needs the bench extras (zuko, pythae). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / "data" / "prepared" / "digits"
LEVELS, D = 17, 64
OFFSET = D * math.log(LEVELS)  # the discrete-data NLL adds D ln L to the density of the dequantised pixels
LOGIT_ALPHA = 0.05


def levels(split: str) -> np.ndarray:
    return np.load(PREPARED / f"{split}_x.npy").reshape(-1, D).astype(np.float64)


def dequantised(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (x + rng.random(x.shape)) / LEVELS


def run_genzoo_family(family: str, scratch: Path) -> dict:
    """`genzoo train` + `genzoo evaluate` with the project's defaults; the family's test metrics."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}", "PYTHONWARNINGS": "ignore"}
    genzoo = Path(sys.executable).with_name("genzoo")
    for stage in ("train", "evaluate"):
        out = subprocess.run([str(genzoo), stage, f"family={family}"], cwd=scratch, env=env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise SystemExit(f"genzoo {stage} family={family} failed:\n{out.stderr[-2000:]}")
    report = json.loads((scratch / "reports" / "families" / f"{family}.json").read_text())
    m = report["metrics"]
    return {"nll": m.get("nll"), "fid": m.get("fid"), "seconds": m["train_seconds"], "kind": report["nll_kind"]}


def scratch_project() -> Path:
    """A copy of params.yaml, dvc.yaml and the prepared digits: genzoo writes its models and reports there."""
    scratch = Path(tempfile.mkdtemp(prefix="genzoo-quality-"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, scratch / name)
    shutil.copytree(PREPARED, scratch / "data" / "prepared" / "digits")
    featnet = ROOT / "data" / "featnet"
    if featnet.is_dir():
        shutil.copytree(featnet, scratch / "data" / "featnet")
    else:  # the FID feature space genzoo evaluate scores samples in
        subprocess.run([str(Path(sys.executable).with_name("genzoo")), "featnet"], cwd=scratch, check=True,
                       capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"})
    return scratch


def kernel_density(train, val, test) -> tuple:
    from sklearn.neighbors import KernelDensity

    scores = {bw: KernelDensity(bandwidth=bw).fit(train).score_samples(val).mean()
              for bw in (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)}
    bw = max(scores, key=scores.get)
    start = time.perf_counter()
    nll = -KernelDensity(bandwidth=bw).fit(train).score_samples(test).mean() + OFFSET
    return f"scikit-learn KernelDensity (bandwidth {bw}, picked on val)", nll, time.perf_counter() - start


def gaussian_mixture(train, test) -> tuple:
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    gm = GaussianMixture(10, covariance_type="full", reg_covar=1e-3, max_iter=100, random_state=0).fit(train)
    seconds = time.perf_counter() - start
    return "scikit-learn GaussianMixture (full, K=10)", -gm.score(test) + OFFSET, seconds


def logit(x: torch.Tensor):
    """y = logit(alpha + (1 - 2 alpha) x) and log|dy/dx| per example (RealNVP section 4.1)."""
    p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x
    logdet = (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(p) - torch.log1p(-p)).sum(1)
    return torch.log(p) - torch.log1p(-p), logdet


def zuko_flow(kind: str, train_levels, val, test, budget: float) -> tuple:
    """zuko's flow trained for `budget` seconds of wall time (whole epochs, fresh dequantisation noise each
    epoch), the best validation epoch kept."""
    import zuko

    torch.manual_seed(0)
    flow = getattr(zuko.flows, kind)(D, transforms=5, hidden_features=(256, 256))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    lv = torch.tensor(train_levels, dtype=torch.float32)
    xva, xte = (torch.tensor(a, dtype=torch.float32) for a in (val, test))
    log_p = lambda x: flow().log_prob(logit(x)[0]) + logit(x)[1]  # noqa: E731
    start, epochs, best, state = time.perf_counter(), 0, -math.inf, None
    while time.perf_counter() - start < budget:
        for idx in torch.randperm(len(lv)).split(128):
            batch = (lv[idx] + torch.rand(len(idx), D)) / LEVELS
            loss = -log_p(batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        with torch.no_grad():
            v = log_p(xva).mean().item()
        if v > best:
            best, state = v, {k: t.clone() for k, t in flow.state_dict().items()}
    flow.load_state_dict(state)
    with torch.no_grad():
        nll = -log_p(xte).mean().item() + OFFSET
    return f"zuko {kind} 5x(256, 256) ({epochs} epochs, best val)", nll, time.perf_counter() - start


def pythae_vae(scratch: Path, budget: float, latent_dim: int) -> tuple:
    """pythae's VAE (its default MLP encoder and decoder, Bernoulli decoder on [0, 1] pixels, Adam 1e-3, batch
    128) for about `budget` seconds (its epoch timed on 2 epochs first), scored by FID in genzoo's feature space
    against the test split, exactly as `genzoo evaluate` scores a family's samples."""
    import contextlib
    import io
    import logging

    from pythae.models import VAE, VAEConfig
    from pythae.pipelines import TrainingPipeline
    from pythae.samplers import NormalSampler
    from pythae.trainers import BaseTrainerConfig

    from pipeline.config import load_config
    from pipeline.evaluation.features import feature_extractor
    from pipeline.evaluation.scoring import sample_quality
    from pipeline.runtime import datamodule_for

    logging.getLogger("pythae").setLevel(logging.WARNING)  # its per-epoch log lines
    cfg = load_config([f"data.root={scratch / 'data'}"], params_file=str(scratch / "params.yaml"))
    dm = datamodule_for(cfg)
    train, val, test = (dm.split(s)[0].numpy() for s in ("train", "val", "test"))

    def fit(epochs: int):
        torch.manual_seed(0)
        model = VAE(VAEConfig(input_dim=train.shape[1:], latent_dim=latent_dim, reconstruction_loss="bce"))
        config = BaseTrainerConfig(output_dir=str(scratch / "pythae"), num_epochs=epochs, learning_rate=1e-3,
                                   per_device_train_batch_size=128, no_cuda=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            TrainingPipeline(model=model, training_config=config)(train_data=train, eval_data=val)
        return model, time.perf_counter() - start

    _, probe = fit(2)
    epochs = max(1, int(budget / (probe / 2)))
    model, seconds = fit(epochs)
    with torch.no_grad():
        samples = NormalSampler(model).sample(num_samples=cfg.eval.n_samples, batch_size=cfg.eval.batch_size)
    torch.manual_seed(cfg.eval.seed)
    fid = sample_quality(feature_extractor(cfg, dm.info), torch.as_tensor(test), samples.float().cpu(), cfg.eval)["fid"]
    return f"pythae VAE, latent {latent_dim} ({epochs} epochs)", fid, seconds


def table(rows, value: str, reference: float) -> None:
    print(f"| model | {value} | train seconds | minus genzoo's best |")
    print("|---|---|---|---|")
    for name, v, seconds in rows:
        if v is None:
            print(f"| {name} | not run | | |")
        else:
            print(f"| {name} | {v:.3f} | {seconds:.1f} | {v - reference:+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["gmm", "hmm", "vae", "flow"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not PREPARED.is_dir():
        subprocess.run([str(Path(sys.executable).with_name("genzoo")), "fetch"], cwd=ROOT, check=True)
    torch.set_num_threads(args.threads)
    scratch = scratch_project()
    try:
        ours = {f: run_genzoo_family(f, scratch) for f in args.families}
        vae_row = None
        if "vae" in ours:
            try:
                vae_row = pythae_vae(scratch, ours["vae"]["seconds"], 16)
            except ImportError:
                vae_row = ("pythae VAE (not installed: pip install -e '.[bench]')", None, None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    exact = {f: r for f, r in ours.items() if r["kind"] == "exact" and r["nll"] is not None}
    best = min(exact, key=lambda f: exact[f]["nll"])
    budget = exact[best]["seconds"]
    rows = [(f"genzoo {f} ({r['kind']})", r["nll"], r["seconds"])
            for f, r in sorted(ours.items(), key=lambda fr: fr[1]["nll"] or math.inf)]

    rng = np.random.default_rng(0)
    train_levels = levels("train")
    train, val, test = dequantised(train_levels, rng), dequantised(levels("val"), rng), dequantised(levels("test"), rng)
    rows.append(kernel_density(train, val, test))
    rows.append(gaussian_mixture(train, test))
    try:
        rows += [zuko_flow(kind, train_levels, val, test, budget) for kind in ("NSF", "MAF")]
    except ImportError:
        rows.append(("zuko (not installed: pip install -e '.[bench]')", None, None))

    print(f"**Density.** Test NLL on genzoo's digits test split (nats, with the {D} ln {LEVELS} offset; lower is "
          f"better). The zuko flows train for the wall time of genzoo's best exact-likelihood family ({best}, "
          f"{budget:.1f} s); {args.threads} threads.\n")
    table(rows, "test NLL (nats)", exact[best]["nll"])
    if vae_row is not None:
        print(f"\n**Samples.** FID in genzoo's feature space (featnet) against the test split, "
              f"{'at the genzoo VAE' + chr(39) + 's'} training time; lower is better.\n")
        table([("genzoo vae", ours["vae"]["fid"], ours["vae"]["seconds"]), vae_row], "FID", ours["vae"]["fid"])


if __name__ == "__main__":
    main()
