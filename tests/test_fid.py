"""Sample-quality metrics against independent references: torchmetrics' FID (through
sample_metrics.fid_kid, featnet features) vs a scipy Fréchet distance, KID vs a numpy unbiased MMD^2,
and k-NN precision/recall (Kynkäänniemi et al. 2019) vs a brute-force numpy version."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fid_reference import digits_images, frechet_distance
from pipeline.evaluation.featnet import ConvFeatures, IdentityFeatures
from pipeline.evaluation.sample_metrics import extract, fid_kid, precision_recall


def unbiased_mmd2_cubic(a: np.ndarray, b: np.ndarray) -> float:
    """MMD^2 (unbiased) with KID's kernel k(x, y) = (x.y / d + 1)^3, by explicit double loops over pairs."""
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1.0) ** 3
    m = len(a)
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(kxx + kyy - 2 * kxy)


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    return ConvFeatures(1, 16).eval()  # the featnet's feature body, random init


@pytest.mark.parametrize("fake_kind", ["other_classes", "blurred_noise", "same"])
def test_torchmetrics_fid_equals_scipy_frechet_distance(features, fake_kind):
    real = digits_images(300, seed=0, classes=range(5))
    if fake_kind == "other_classes":
        fake = digits_images(300, seed=1, classes=range(5, 10))
    elif fake_kind == "blurred_noise":
        g = torch.Generator().manual_seed(2)
        fake = 0.5 * digits_images(300, seed=2) + 0.5 * torch.rand((300, 1, 8, 8), generator=g)
    else:
        fake = real.clone()
    torch.manual_seed(0)
    got = fid_kid(features, real, fake, kid_subset_size=50, kid_subsets=3, batch_size=64)
    with torch.no_grad():
        fr, ff = extract(features, real).double().numpy(), extract(features, fake).double().numpy()
    want = frechet_distance(fr, ff)
    if fake_kind == "same":
        assert abs(got["fid"]) < 1e-3 and abs(want) < 1e-6
    else:
        assert want > 1e-3
        assert abs(got["fid"] - want) / want < 1e-3, (got["fid"], want)
    if fake_kind == "other_classes":  # other digits are farther than new draws of the same digits
        more = digits_images(300, seed=5, classes=range(5))
        assert want > frechet_distance(fr, extract(features, more).double().numpy())


def test_kid_on_full_subsets_equals_unbiased_mmd(features):
    real, fake = digits_images(40, seed=3), digits_images(40, seed=4)
    fake = 0.7 * fake + 0.3  # a brighter, shifted set: KID clearly positive
    got = fid_kid(features, real, fake, kid_subset_size=40, kid_subsets=2, batch_size=16)
    with torch.no_grad():
        fr, ff = extract(features, real).double().numpy(), extract(features, fake).double().numpy()
    want = unbiased_mmd2_cubic(fr, ff)
    assert want > 0
    # subset == whole set: every subset is a permutation of all points, so KID is exact and its std ~0
    assert got["kid_mean"] == pytest.approx(want, rel=1e-4)
    assert got["kid_std"] < 1e-4 * abs(want)


def test_identity_features_fid_on_gaussians_matches_closed_form():
    """Vector data uses the points themselves: FID of two large Gaussian samples approaches the Fréchet
    distance of the two Gaussians, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    rng = np.random.default_rng(0)
    s1, s2 = np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[0.4, -0.1], [-0.1, 1.5]])
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, -0.5])
    a = torch.tensor(rng.multivariate_normal(mu1, s1, 20000), dtype=torch.float32)
    b = torch.tensor(rng.multivariate_normal(mu2, s2, 20000), dtype=torch.float32)
    got = fid_kid(IdentityFeatures(2), a, b, kid_subset_size=100, kid_subsets=2, batch_size=5000)["fid"]
    r1 = scipy.linalg.sqrtm(s1)
    exact = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(r1 @ s2 @ r1).real))
    assert got == pytest.approx(frechet_distance(a.double().numpy(), b.double().numpy()), rel=1e-3)
    assert got == pytest.approx(exact, abs=0.05)


# --- precision / recall ----------------------------------------------------------------------------
def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int):
    def radii(points):
        out = []
        for i, p in enumerate(points):
            d = sorted(np.sqrt(((p - q) ** 2).sum()) for j, q in enumerate(points) if j != i)
            out.append(d[k - 1])  # distance to the k-th nearest *other* point
        return out

    def coverage(points, centres, r):
        inside = [any(np.sqrt(((p - c) ** 2).sum()) <= rc for c, rc in zip(centres, r)) for p in points]
        return float(np.mean(inside))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("seed, k, shift", [(0, 3, 0.0), (1, 3, 1.0), (2, 1, 0.5), (3, 5, 2.0)])
def test_precision_recall_match_brute_force(seed, k, shift):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(40, 3))
    fake = rng.normal(size=(30, 3)) * 0.6 + shift  # narrower and shifted: precision and recall differ
    got = precision_recall(torch.tensor(real), torch.tensor(fake), k=k)
    p, r = brute_force_precision_recall(real, fake, k)
    assert got["precision"] == pytest.approx(p, abs=1e-6)  # fractions of 30 / 40 points
    assert got["recall"] == pytest.approx(r, abs=1e-6)
    if shift == 0.0:
        assert got["precision"] > got["recall"]  # a narrow fake set sits inside the real manifold


def test_precision_recall_extremes():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(50, 4)))
    assert precision_recall(x, x.clone()) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # a collapsed generator: every sample on one real point -> full precision, almost no recall
    collapsed = precision_recall(x, x[:1].repeat(20, 1) + 1e-9)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] <= 4 / 50
