"""The in-training FID that picks the best checkpoint (`pipeline.callbacks.BestSampleQuality`) under DDP: a
torchmetrics metric whose states (feature sums, outer-product sums, counts) are summed across ranks, so the
FID it reports is the FID of every rank's samples pooled, checked against a scipy Fréchet distance of the
pooled features: merged in one process, and synchronised for real by two gloo processes."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fid_reference import digits_images, frechet_distance
from pipeline.callbacks import BestSampleQuality
from pipeline.evaluation.featnet import IdentityFeatures
from pipeline.evaluation.sample_metrics import extract, fid_kid, fid_metric


def gaussians(n: int, seed: int, mean: float, dim: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 1.5, dim)
    return torch.randn((n, dim), generator=g) * scale + mean


def test_merged_rank_states_give_the_fid_of_the_pooled_samples():
    """Two "ranks", each with its own real and fake shard (of different sizes): merging their states (the
    same sum DDP's sync does) gives the pooled FID, which the mean of the two per-rank FIDs is not."""
    features = IdentityFeatures(64)  # pixel space: dequantised digits have a full-rank covariance
    real, fake = digits_images(300, seed=0, classes=range(5)), digits_images(260, seed=1, classes=range(3, 10))
    ranks = [fid_metric(features), fid_metric(features)]
    shards = [(real[:170], fake[:100]), (real[170:], fake[100:])]
    per_rank = []
    with torch.no_grad():
        for metric, (r, f) in zip(ranks, shards):
            metric.update(r, real=True)
            metric.update(f, real=False)
            per_rank.append(float(copy.deepcopy(metric).compute()))  # a copy: compute() caches its result
        ranks[0].merge_state(ranks[1])
        merged = float(ranks[0].compute())
        want = frechet_distance(extract(features, real).double().numpy(), extract(features, fake).double().numpy())
    assert want > 1e-3
    assert merged == pytest.approx(want, rel=1e-4)
    assert abs(np.mean(per_rank) - want) > 100 * abs(merged - want), (per_rank, merged, want)  # the old average


class Shard(torch.nn.Module):
    """A stand-in for a family on one rank: `sample(n)` gives this rank's next n of a fixed set of fakes."""

    def __init__(self, fakes: torch.Tensor, start: int):
        super().__init__()
        self.fakes, self.start = fakes, start

    @property
    def device(self):
        return torch.device("cpu")

    def sample(self, n: int) -> torch.Tensor:
        return self.fakes[self.start : self.start + n]


def shares(n: int, world: int) -> list:
    return [n // world + (r < n % world) for r in range(world)]


def test_callback_fid_is_the_fid_of_its_samples_and_keeps_the_real_side():
    """One process: the callback's FID of n samples equals `fid_kid`'s; a second evaluation (fresh fakes)
    still scores against the real split, added once."""
    real, fake = gaussians(400, 0, 0.0), gaussians(301, 1, 0.4)
    cb = BestSampleQuality(IdentityFeatures(3), real, Path("unused.ckpt"), every_n_epochs=1, n=301)
    got = cb.pooled_fid(Shard(fake, 0), rank=0, world_size=1)
    assert got == pytest.approx(fid_kid(IdentityFeatures(3), real, fake, kid_subset_size=50, kid_subsets=2)["fid"],
                                rel=1e-5)
    again = cb.pooled_fid(Shard(fake, 0), rank=0, world_size=1)
    assert again == pytest.approx(got, rel=1e-6) and int(cb.fid.real_features_num_samples) == 400


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real, fake = gaussians(400, 0, 0.0), gaussians(301, 1, 0.4)
        cb = BestSampleQuality(IdentityFeatures(3), real, Path(out_dir) / "best.ckpt", every_n_epochs=1, n=len(fake))
        start = sum(shares(len(fake), world)[:rank])
        fid = cb.pooled_fid(Shard(fake, start), rank, world)
        real_seen = int(cb.fid.real_features_num_samples)  # this rank's own count: the sync is undone after compute
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"fid": fid, "real_seen": real_seen}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_report_the_fid_of_the_pooled_samples(tmp_path):
    """Two real processes (gloo): each adds every other real example and its share of the 301 fakes; both
    report the same FID, the scipy Fréchet distance of all 400 real and all 301 fake points."""
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    real, fake = gaussians(400, 0, 0.0), gaussians(301, 1, 0.4)
    want = frechet_distance(real.double().numpy(), fake.double().numpy())
    assert results[0]["fid"] == results[1]["fid"]
    assert results[0]["fid"] == pytest.approx(want, rel=1e-4) and math.isfinite(want) and want > 0.1
    assert [r["real_seen"] for r in results] == [200, 200]  # each rank holds its shard of the real split only
