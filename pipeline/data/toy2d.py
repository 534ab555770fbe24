"""Seeded 2-D toy densities, the usual benchmark set of the flow literature (FFJORD, Grathwohl et al.
2019). Where a closed form exists the true log-density is given, so a model's test NLL can be compared
with the entropy floor."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
from scipy.special import logsumexp

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits

EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.2


def _eight_centres() -> np.ndarray:
    angles = np.arange(8) * (2 * math.pi / 8)
    return EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def eight_gaussians(n: int, rng: np.random.Generator):
    c = rng.integers(0, 8, size=n)
    x = _eight_centres()[c] + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))
    return x, c


def eight_gaussians_log_density(x: np.ndarray) -> np.ndarray:
    s2 = EIGHT_GAUSSIANS_STD**2
    d2 = ((x[:, None, :] - _eight_centres()[None]) ** 2).sum(-1)
    comp = -0.5 * d2 / s2 - math.log(2 * math.pi * s2)
    return logsumexp(comp, axis=1) - math.log(8)


def checkerboard(n: int, rng: np.random.Generator):
    # 8 unit squares of a 4x4 board on [-2, 2]^2: uniform density 1/8 on them
    x1 = rng.uniform(-2, 2, size=n)
    x2 = rng.uniform(0, 1, size=n) + rng.integers(0, 2, size=n) * 2.0 - 2.0
    x2 = x2 + (np.floor(x1) % 2)
    cls = ((np.floor(x1) + 2) * 4 + np.floor(x2) + 2).astype(int)
    return np.stack([x1, x2], axis=1), cls


def checkerboard_log_density(x: np.ndarray) -> np.ndarray:
    inside = (np.abs(x) <= 2).all(axis=1) & ((np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0)
    return np.where(inside, -math.log(8.0), -np.inf)


def moons(n: int, rng: np.random.Generator):
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=0.1, random_state=int(rng.integers(2**31)))
    return (x - np.array([0.5, 0.25])) * 2.0, y


def circles(n: int, rng: np.random.Generator):
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=n, noise=0.08, factor=0.5, random_state=int(rng.integers(2**31)))
    return x * 2.0, y


def pinwheel(n: int, rng: np.random.Generator, arms: int = 5):
    radial_std, tangential_std, rate = 0.3, 0.1, 0.25
    labels = rng.integers(0, arms, size=n)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = 2 * math.pi * labels / arms + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], axis=1).reshape(-1, 2, 2)
    return 2 * np.einsum("ti,tij->tj", feats, rot), labels


def spirals(n: int, rng: np.random.Generator):
    t = np.sqrt(rng.uniform(0, 1, size=n)) * 540 * (2 * math.pi) / 360
    arm = rng.integers(0, 2, size=n)
    sign = np.where(arm == 0, 1.0, -1.0)
    x = np.stack([-np.cos(t) * t, np.sin(t) * t], axis=1) * sign[:, None]
    x = x + rng.uniform(0, 1, size=(n, 2)) * 0.5
    return x / 3.0, arm


TOYS: Dict[str, Callable] = {
    "moons": moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "spirals": spirals,
}

TRUE_LOG_DENSITY: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "8gaussians": eight_gaussians_log_density,
    "checkerboard": checkerboard_log_density,
}


def true_log_density(name: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    return TRUE_LOG_DENSITY.get(name)


def toy_source(name: str) -> Callable:
    """The source `toy2d:<name>`: seeded samples of a toy, with the true test NLL where it has a closed form."""
    def load(dcfg, rng) -> Prepared:
        x, y = TOYS[name](dcfg.toy_samples, rng)
        x, y = x.astype(np.float32), np.asarray(y, dtype=np.int64)
        splits = three_splits(x, y, dcfg, rng)
        extra = {}
        truth = true_log_density(name)
        if truth is not None:
            extra["true_test_nll"] = float(-truth(splits["test"][0].astype(np.float64)).mean())
        # the generating component is the label (not for the checkerboard, whose cells are not all used)
        num_classes = None if name == "checkerboard" else int(y.max()) + 1
        info = DataInfo(shape=(2,), kind="vector", num_classes=num_classes)
        return Prepared(splits, info, f"genzoo toy2d:{name}", extra)

    return load
