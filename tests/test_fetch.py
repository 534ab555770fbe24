"""The fetch stage: seeded, byte-reproducible splits with an honest manifest; torchvision sources read
offline from IDX files written here; corrupt inputs and outputs stop with a GenzooError naming the file."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from pipeline.config import load_config
from pipeline.data.datamodule import PreparedDataModule
from pipeline.data.sources import load_source
from pipeline.data.toy2d import TOYS
from pipeline.paths import prepared_dir
from pipeline.errors import GenzooError
from pipeline.stages.fetch import fetch
from pipeline.data.store import sha256, write_prepared


def cfg_for(repo_root, root, *overrides):
    return load_config([f"data.root={root}", *overrides], params_file=str(repo_root / "params.yaml"))


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- digits: determinism and the manifest ------------------------------------------------------------
def test_same_params_give_byte_identical_files(repo_root, tmp_path):
    a = fetch(cfg_for(repo_root, tmp_path / "a"))
    b = fetch(cfg_for(repo_root, tmp_path / "b"))
    fa, fb = tmp_path / "a/prepared/digits", tmp_path / "b/prepared/digits"
    assert folder_bytes(fa) == folder_bytes(fb)
    assert a["content_hash"] == b["content_hash"]
    assert not (tmp_path / "a/prepared/digits.tmp").exists()  # the temporary folder was renamed away
    c = fetch(cfg_for(repo_root, tmp_path / "c", "data.seed=1"))
    assert c["content_hash"] != a["content_hash"]
    assert c["seed"] == 1
    # same images overall, differently split
    xa = np.load(fa / "test_x.npy")
    xc = np.load(tmp_path / "c/prepared/digits/test_x.npy")
    assert xa.shape == xc.shape and not np.array_equal(xa, xc)


def test_manifest_records_what_was_written(digits_folder):
    from sklearn.datasets import load_digits

    m = json.loads((digits_folder / "manifest.json").read_text())
    assert m["dataset"] == "digits" and m["seed"] == 0
    assert "load_digits" in m["source"]
    assert m["info"] == {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10, "vocab_size": None}
    d = load_digits()
    n = len(d.target)
    sizes = {k: v["n"] for k, v in m["splits"].items()}
    assert set(sizes) == {"train", "val", "test"}
    assert sum(sizes.values()) == n == 1797
    assert sizes["test"] == round(0.2 * n) and sizes["val"] == round(0.1 * n)
    for split, s in m["splits"].items():
        x, y = np.load(digits_folder / f"{split}_x.npy"), np.load(digits_folder / f"{split}_y.npy")
        assert list(x.shape) == s["x_shape"] == [s["n"], 1, 8, 8] and str(x.dtype) == s["x_dtype"] == "uint8"
        assert y.shape == (s["n"],) and y.dtype == np.int64
        for part in ("x", "y"):
            name = f"{split}_{part}.npy"
            assert m["files"][name] == sha256(digits_folder / name)
    # the splits partition the source: the same multiset of (image, label) rows
    rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(x), -1).astype(np.int64), y[:, None]], 1)))
    parts = [(np.load(digits_folder / f"{s}_x.npy"), np.load(digits_folder / f"{s}_y.npy")) for s in ("train", "val", "test")]
    got = rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert got == rows(d.images.astype(np.int64), d.target.astype(np.int64))


def test_each_split_gets_its_own_dequantisation_noise(digits_folder):
    dm = PreparedDataModule(digits_folder)
    noise = {s: (dm.split(s)[0] * 17 - dm.raw(s)[0].float()).flatten() for s in ("train", "val", "test")}
    n = len(noise["val"])
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):  # example i's noise differs across splits
        assert abs(float(np.corrcoef(noise[a][:n], noise[b][:n])[0, 1])) < 0.02
    assert all(float(u.min()) > -1e-5 and float(u.max()) < 1 + 1e-5 for u in noise.values())
    assert torch.equal(dm.split("test")[0], PreparedDataModule(digits_folder).split("test")[0])  # and fixed
    assert not torch.equal(dm.split("test")[0], PreparedDataModule(digits_folder, seed=1).split("test")[0])


def test_corrupt_prepared_file_is_named(digits_folder, tmp_path):
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(digits_folder, folder)
    path = folder / "train_x.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a pixel value: still a loadable .npy, only the hash can tell
    path.write_bytes(bytes(raw))
    dm = PreparedDataModule(folder)
    assert dm.raw("val")[0].shape[1:] == (1, 8, 8)  # untouched splits still load
    with pytest.raises(GenzooError, match="train_x.npy") as e:
        dm.raw("train")
    assert "corrupt" in str(e.value)
    path.unlink()
    with pytest.raises(GenzooError, match="train_x.npy"):
        PreparedDataModule(folder).raw("train")


def test_holdout_class_becomes_its_own_split(repo_root, tmp_path):
    m = fetch(cfg_for(repo_root, tmp_path, "data.holdout_class=3"))
    folder = tmp_path / "prepared/digits"
    for split in ("train", "val", "test"):
        assert 3 not in np.load(folder / f"{split}_y.npy")
    hold = np.load(folder / "holdout_y.npy")
    assert len(hold) > 0 and (hold == 3).all() and m["holdout_class"] == 3


# --- toy 2-D sets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy2d_sets_are_seeded(repo_root, tmp_path, name):
    def load(seed):
        p = load_source(cfg_for(repo_root, tmp_path, f"data.dataset=toy2d:{name}", "data.toy_samples=500",
                                f"data.seed={seed}").data)
        return {k: x for k, (x, y) in p.splits.items()}

    a, b, c = load(0), load(0), load(1)
    assert {k: v.shape for k, v in a.items()} == {"train": (350, 2), "val": (50, 2), "test": (100, 2)}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())


def test_eight_gaussians_manifest_holds_the_true_test_nll(repo_root, tmp_path):
    cfg = cfg_for(repo_root, tmp_path, "data.dataset=toy2d:8gaussians", "data.toy_samples=4000")
    m = fetch(cfg)
    folder = prepared_dir(cfg.data)
    assert folder.name == "toy2d-8gaussians"
    x = np.load(folder / "test_x.npy").astype(np.float64)
    assert len(x) == m["splits"]["test"]["n"] == 800
    # independent reference: an equal-weight mixture of 8 isotropic scipy Gaussians on the radius-2 circle
    angles = np.arange(8) * 2 * np.pi / 8
    centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    comp = np.stack([multivariate_normal(c, 0.04 * np.eye(2)).logpdf(x) for c in centres], 1)
    nll = -(logsumexp(comp, axis=1) - np.log(8)).mean()
    assert m["true_test_nll"] == pytest.approx(nll, rel=1e-9)
    entropy = np.log(8) + np.log(2 * np.pi * np.e * 0.04)  # well-separated components
    assert abs(nll - entropy) < 0.15


# --- torchvision sources offline: MNIST from IDX files written here -----------------------------------
def write_idx(path, array: np.ndarray) -> None:
    """The IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root, n_train=20, n_test=10):
    raw = root / "raw" / "MNIST" / "raw"  # data.root/raw is torchvision's root; MNIST keeps raw files there
    raw.mkdir(parents=True)
    rng = np.random.default_rng(123)
    out = {}
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = offset + np.arange(n)  # a unique id per image
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out[prefix] = (x, y)
    return raw, out


def test_mnist_from_local_idx_files(repo_root, tmp_path):
    raw, written = fake_mnist(tmp_path)
    cfg = cfg_for(repo_root, tmp_path, "data.dataset=mnist")
    p = load_source(cfg.data)
    assert p.info.shape == (1, 28, 28) and p.info.levels == 256 and p.info.num_classes == 10
    assert "MNIST" in p.source
    xtr, ytr = written["train"]
    xte, yte = written["t10k"]
    x, y = p.splits["test"]
    np.testing.assert_array_equal(x, xte[:, None])
    np.testing.assert_array_equal(y, yte.astype(np.int64))
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert len(p.splits["val"][0]) == round(0.1 * len(xtr)) and len(p.splits["train"][0]) == len(xtr) - 2
    # train + val are a seeded permutation of the written training images, each with its own label
    xs = np.concatenate([p.splits["train"][0], p.splits["val"][0]])[:, 0]
    ys = np.concatenate([p.splits["train"][1], p.splits["val"][1]])
    ids = xs[:, 0, 0].astype(int)
    assert sorted(ids) == list(range(len(xtr)))
    np.testing.assert_array_equal(xs, xtr[ids])
    np.testing.assert_array_equal(ys, ytr[ids].astype(np.int64))
    assert list(ids) != list(range(len(xtr)))  # shuffled
    # and through the store and the data module, as the pipeline reads it
    m = write_prepared(p, prepared_dir(cfg.data), "mnist", 0)
    dm = PreparedDataModule(prepared_dir(cfg.data))
    np.testing.assert_array_equal(dm.raw("test")[0].numpy(), xte[:, None])
    assert m["splits"]["train"]["x_shape"] == [18, 1, 28, 28]
    x01, _ = dm.split("test")
    assert 0 <= float(x01.min()) and float(x01.max()) <= 1  # dequantised into [0, 1]


def test_truncated_idx_file_is_a_clear_error(repo_root, tmp_path):
    raw, _ = fake_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 28 * 28 * 5 + 7])  # header + 5.x images of 20
    with pytest.raises(GenzooError) as e:
        load_source(cfg_for(repo_root, tmp_path, "data.dataset=mnist").data)
    msg = str(e.value)
    assert "mnist" in msg and str(path) in msg and "truncated" in msg and "\n" not in msg
    path.write_bytes(b"\x00\x00")  # cut inside the header
    with pytest.raises(GenzooError, match="train-images-idx3-ubyte"):
        load_source(cfg_for(repo_root, tmp_path, "data.dataset=mnist").data)
