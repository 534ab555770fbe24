"""Sample-quality metrics in a feature space: FID and KID through torchmetrics, and the k-NN precision
and recall of Kynkäänniemi et al. 2019 ("Improved precision and recall metric for assessing generative
models"). All take any `nn.Module` feature extractor with a `num_features` attribute."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_modules.contract import progress


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or buffers) are; the CPU for one without any (raw-data features)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class OnItsDevice(nn.Module):
    """`features` run on the device it is on (`eval.device`), its output handed back on the CPU: the metrics'
    float64 states stay on the CPU (MPS has no float64) whatever device the feature network runs on."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.num_features = features.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x.to(module_device(self.features))).cpu()


def _update(metric, x: Tensor, real: bool, batch_size: int) -> None:
    chunks = x.split(batch_size)
    for chunk in progress(chunks, "features", len(chunks)):
        metric.update(chunk, real=real)


def fid_metric(features: nn.Module, reset_real_features: bool = True) -> FrechetInceptionDistance:
    """torchmetrics' FID in the feature space of `features`, on data-space inputs. Its states (the feature sums,
    the sums of their outer products and the counts, float64) are summed across ranks when it computes: under
    DDP that is the FID of every rank's samples pooled, on the device the metric is on. `reset_real_features`
    False keeps the real side through `reset()`, for a metric that scores fresh fakes against one real set."""
    return FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=reset_real_features)


@torch.no_grad()
def fid_kid(features: nn.Module, real: Tensor, fake: Tensor, kid_subset_size: int = 100,
            kid_subsets: int = 50, batch_size: int = 256) -> Dict[str, float]:
    """FID and KID of `fake` against `real` (both in data space, same shape); `features` runs on its own device,
    the metrics on the CPU."""
    features = OnItsDevice(features)
    fid = fid_metric(features)
    subset = min(kid_subset_size, len(real), len(fake))
    kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=subset, normalize=True)
    for metric in (fid, kid):
        _update(metric, real, True, batch_size)
        _update(metric, fake, False, batch_size)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def _kth_neighbour_radius(feats: Tensor, k: int) -> Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def _coverage(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of `points` inside at least one ball (centre, radius): the k-NN manifold estimate."""
    inside = torch.cdist(points, centres) <= radii[None, :]
    return inside.any(dim=1).float().mean().item()


@torch.no_grad()
def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> Dict[str, float]:
    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    return {
        "precision": _coverage(fake_feats, real_feats, _kth_neighbour_radius(real_feats, k)),
        "recall": _coverage(real_feats, fake_feats, _kth_neighbour_radius(fake_feats, k)),
    }


@torch.no_grad()
def extract(features: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """The features of `x` (on the CPU), computed on the device `features` is on."""
    chunks, device = x.split(batch_size), module_device(features)
    return torch.cat([features(chunk.to(device)).cpu() for chunk in progress(chunks, "features", len(chunks))])
