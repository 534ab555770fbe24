"""Independent references for the sample-quality tests (tests/test_fid.py, tests/test_fid_sync.py): the
Fréchet distance computed by scipy, and dequantised digits images to score."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), float64, unbiased covariances."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def digits_images(n: int, seed: int, classes=range(10)) -> torch.Tensor:
    """n seeded sklearn digits of the given classes, dequantised to [0, 1): (levels + U(0, 1)) / 17."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(d.images[np.isin(d.target, list(classes))], dtype=torch.float32)[:, None]
    idx = torch.randperm(len(levels), generator=g)[:n]
    return (levels[idx] + torch.rand((n, 1, 8, 8), generator=g)) / 17
