"""Bring your own data: `data.dataset=npy:|npz:|csv:|imagefolder:|text:PATH`. Real files are written here and
fetched; the prepared splits are compared with references computed here from the source (NumPy standardisation
by hand, PIL reads, the text's own characters). Bad input is one error line naming the file or key, before
anything that looks finished is written."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from test_cli_errors import assert_clean_failure

from pipeline.config import load_config
from pipeline.data.datamodule import PreparedDataModule
from pipeline.errors import GenzooError
from pipeline.paths import prepared_dir
from pipeline.stages.fetch import fetch

SPLITS = ("train", "val", "test")


def cfg_for(repo_root, tmp_path, dataset, *overrides):
    return load_config([f"data.root={tmp_path / 'root'}", f"data.dataset={dataset}", *overrides],
                       params_file=str(repo_root / "params.yaml"))


def fetched(repo_root, tmp_path, dataset, *overrides):
    """(manifest, {split: (x, y)}) of a fetch, read back from disk."""
    cfg = cfg_for(repo_root, tmp_path, dataset, *overrides)
    manifest = fetch(cfg)
    folder = prepared_dir(cfg.data)
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    splits = {s: (np.load(folder / f"{s}_x.npy"), np.load(folder / f"{s}_y.npy"))
              for s in manifest["splits"]}
    return manifest, splits


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def by_id(splits, column=0):
    """Source row ids of every prepared row: column 0 holds a distinct id, and standardisation maps every split
    by one increasing affine map, so the ids' order across all splits is their order in the source."""
    allx = np.concatenate([splits[s][0] for s in SPLITS])
    ranks = np.argsort(np.argsort(allx[:, column]))
    out, start = {}, 0
    for s in SPLITS:
        out[s] = ranks[start : start + len(splits[s][0])]
        start += len(splits[s][0])
    return out


def assert_standardised(splits, source, manifest):
    """Each split equals the source rows standardised by hand with the training rows' mean and std."""
    ids = by_id(splits)
    assert sorted(np.concatenate(list(ids.values()))) == list(range(len(source)))
    train = source[ids["train"]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    for s in SPLITS:
        x = splits[s][0]
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, (source[ids[s]] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(manifest["standardisation"]["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(manifest["standardisation"]["std"], std, rtol=1e-12)
    return ids


def assert_nothing_finished(root):
    assert not list(root.rglob("manifest.json")), list(root.rglob("manifest.json"))


# --- each source round-trips -------------------------------------------------------------------------------
def test_csv_is_standardised_with_the_training_split_and_labels_become_indices(repo_root, tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    feats = np.column_stack([np.arange(n) * 3.0 + 7, rng.normal(5, 2, n), rng.integers(0, 9, n)])
    names = np.array(["red", "blue", "green"])[rng.integers(0, 3, n)]
    path = write_csv(tmp_path / "t.csv", ["id", "a", "b", "colour"], [[*map(repr, r), c] for r, c in zip(feats.tolist(), names)])
    m, splits = fetched(repo_root, tmp_path, f"csv:{path}", "data.label_column=colour")
    assert m["info"] == {"shape": [3], "kind": "vector", "levels": None, "num_classes": 3, "vocab_size": None}
    assert m["continuous"] is True and m["columns"] == ["id", "a", "b"] and m["label_column"] == "colour"
    assert m["classes"] == ["blue", "green", "red"]  # sorted names; the label is the index
    assert m["source_file"] == {"kind": "csv", "path": str(path), "sha256": sha256_of(path)}
    assert {s: m["splits"][s]["n"] for s in SPLITS} == {"train": 42, "val": 6, "test": 12}
    ids = assert_standardised(splits, feats, m)
    for s in SPLITS:
        assert splits[s][1].dtype == np.int64
        assert [m["classes"][c] for c in splits[s][1]] == list(names[ids[s]])


def test_csv_without_the_default_label_column_has_no_labels(repo_root, tmp_path):
    feats = np.column_stack([np.arange(30.0), np.linspace(-1, 1, 30) ** 2])
    path = write_csv(tmp_path / "nolabel.csv", ["id", "v"], feats.tolist())
    m, splits = fetched(repo_root, tmp_path, f"csv:{path}")
    assert m["info"]["num_classes"] is None and m["label_column"] is None and "classes" not in m
    assert_standardised(splits, feats, m)
    m, _ = fetched(repo_root, tmp_path, f"csv:{path}", "data.label_column=null")
    assert m["info"]["num_classes"] is None


def test_csv_holdout_class_and_labels_per_class(repo_root, tmp_path):
    """A held-out class leaves every split (its test rows become `holdout`), and the standardisation is that of
    the rows the model trains on; a few labels per class are drawn from the user's classes."""
    rng = np.random.default_rng(2)
    n = 90
    feats = np.column_stack([np.arange(n) * 1.0, rng.normal(0, 1, n)])
    labels = np.repeat([10, 20, 30], n // 3)  # integers, mapped to 0, 1, 2
    path = write_csv(tmp_path / "h.csv", ["id", "a", "label"], [[*r, l] for r, l in zip(feats.tolist(), labels)])
    m, splits = fetched(repo_root, tmp_path, f"csv:{path}", "data.holdout_class=1")
    assert m["classes"] == [10, 20, 30] and m["holdout_class"] == 1
    assert set(splits["holdout"][1]) == {1} and len(splits["holdout"][1]) > 0
    for s in SPLITS:
        assert 1 not in set(splits[s][1])
    # which source row each prepared row is: its id read back through the manifest's map (checked below)
    rows_of = {}
    for s, (x, _) in splits.items():
        ids = x[:, 0].astype(np.float64) * m["standardisation"]["std"][0] + m["standardisation"]["mean"][0]
        np.testing.assert_allclose(ids, np.round(ids), atol=1e-3)
        rows_of[s] = np.round(ids).astype(int)
    assert len(set(np.concatenate(list(rows_of.values())))) == sum(len(r) for r in rows_of.values())
    assert set(labels[rows_of["train"]]) == {10, 30} and set(labels[rows_of["holdout"]]) == {20}
    train = feats[rows_of["train"]]  # by hand: the statistics of the rows the model trains on
    mean, std = train.mean(0), train.std(0)
    np.testing.assert_allclose(m["standardisation"]["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(m["standardisation"]["std"], std, rtol=1e-12)
    for s in splits:
        np.testing.assert_allclose(splits[s][0], (feats[rows_of[s]] - mean) / std, rtol=1e-5, atol=1e-5)
        assert [m["classes"][c] for c in splits[s][1]] == list(labels[rows_of[s]])

    m, _ = fetched(repo_root, tmp_path, f"csv:{path}", "data.labels_per_class=2")
    folder = prepared_dir(cfg_for(repo_root, tmp_path, f"csv:{path}").data)
    labelled = np.load(folder / "train_labelled.npy")
    y = np.load(folder / "train_y.npy")
    assert m["labels_per_class"] == 2 and np.bincount(y[labelled]).tolist() == [2, 2, 2]


def test_npz_integer_images_keep_their_levels(repo_root, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 17, size=(40, 6, 5)).astype(np.int64)  # (N, H, W), values 0..16: 17 levels
    y = np.array(["cat", "dog"] * 20)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=x, y=y)
    m, splits = fetched(repo_root, tmp_path, f"npz:{path}")
    assert m["info"] == {"shape": [1, 6, 5], "kind": "image", "levels": 17, "num_classes": 2, "vocab_size": None}
    assert m["continuous"] is False and m["classes"] == ["cat", "dog"] and "standardisation" not in m
    assert m["source_file"]["sha256"] == sha256_of(path)
    rows = lambda xx, yy: sorted(xx.reshape(len(xx), -1).tolist()[i] + [int(yy[i])] for i in range(len(xx)))
    got_x = np.concatenate([splits[s][0] for s in SPLITS])
    got_y = np.concatenate([splits[s][1] for s in SPLITS])
    assert got_x.dtype == np.uint8 and got_x.shape == (40, 1, 6, 5)
    assert rows(got_x, got_y) == rows(x, (y == "dog").astype(int))
    # the data module dequantises them like the built-in images: (level + u) / 17
    dm = PreparedDataModule(prepared_dir(cfg_for(repo_root, tmp_path, f"npz:{path}").data))
    xs, _ = dm.split("train")
    levels = dm.raw("train")[0].float()
    assert ((xs * 17 - levels) >= 0).all() and ((xs * 17 - levels) < 1).all()


def test_npy_float_images_in_unit_range_are_continuous_and_uint8_has_256_levels(repo_root, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.random((30, 3, 4, 4)).astype(np.float64)
    path = tmp_path / "float.npy"
    np.save(path, x)
    m, splits = fetched(repo_root, tmp_path, f"npy:{path}")
    assert m["info"]["kind"] == "image" and m["info"]["levels"] is None and m["continuous"] is True
    got = np.concatenate([splits[s][0] for s in SPLITS])
    assert got.dtype == np.float32
    assert sorted(map(bytes, got)) == sorted(map(bytes, x.astype(np.float32)))
    dm = PreparedDataModule(prepared_dir(cfg_for(repo_root, tmp_path, f"npy:{path}").data))
    assert np.array_equal(dm.split("test")[0].numpy(), splits["test"][0])  # no dequantisation noise

    u8 = rng.integers(0, 5, size=(30, 1, 3, 3)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    m, _ = fetched(repo_root, tmp_path, f"npy:{tmp_path / 'u8.npy'}")
    assert m["info"]["levels"] == 256


def test_npy_vectors_are_standardised(repo_root, tmp_path):
    rng = np.random.default_rng(5)
    x = np.column_stack([np.arange(50) * 0.5, rng.normal(3, 4, 50), rng.integers(0, 3, 50)]).astype(np.float32)
    path = tmp_path / "vec.npy"
    np.save(path, x)
    m, splits = fetched(repo_root, tmp_path, f"npy:{path}")
    assert m["info"]["kind"] == "vector" and m["info"]["shape"] == [3] and m["continuous"] is True
    assert_standardised(splits, x.astype(np.float64), m)


def png_folder(root, sizes, mode="L", seed=0):
    """PATH/<class>/<i>.png with random pixels; returns {relative path: (class index, PIL image)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = {}
    for cls_i, cls in enumerate(["ant", "bee", "cow"]):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            shape = (h, w) if mode == "L" else (h, w, 3)
            im = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
            im.save(root / cls / f"{i}.png")
            made[f"{cls}/{i}.png"] = (cls_i, im)
    (root / "notes.txt").write_text("not an image, not a class folder")
    return made


def test_imagefolder_grayscale_round_trips(repo_root, tmp_path):
    from PIL import Image

    made = png_folder(tmp_path / "pics", [(5, 4)] * 7)
    m, splits = fetched(repo_root, tmp_path, f"imagefolder:{tmp_path / 'pics'}")
    assert m["info"] == {"shape": [1, 4, 5], "kind": "image", "levels": 256, "num_classes": 3, "vocab_size": None}
    assert m["classes"] == ["ant", "bee", "cow"] and m["channels"] == 1
    assert m["source_file"]["kind"] == "imagefolder" and len(m["source_file"]["sha256"]) == 64
    expected = sorted((np.asarray(Image.open(tmp_path / "pics" / rel)).tobytes(), c) for rel, (c, _) in made.items())
    got = sorted((x.tobytes(), int(y)) for s in SPLITS for x, y in zip(*splits[s]))
    assert got == expected


def test_imagefolder_resizes_mixed_sizes_and_reads_rgb(repo_root, tmp_path):
    from PIL import Image

    made = png_folder(tmp_path / "rgb", [(6, 4), (3, 9), (8, 8), (5, 5), (7, 2), (4, 4), (9, 3)], mode="RGB", seed=1)
    m, splits = fetched(repo_root, tmp_path, f"imagefolder:{tmp_path / 'rgb'}", "data.image_size=4")
    assert m["info"]["shape"] == [3, 4, 4] and m["channels"] == 3
    expected = sorted((np.asarray(Image.open(tmp_path / "rgb" / rel).convert("RGB").resize((4, 4), Image.BILINEAR))
                       .transpose(2, 0, 1).tobytes(), c) for rel, (c, _) in made.items())
    got = sorted((x.tobytes(), int(y)) for s in SPLITS for x, y in zip(*splits[s]))
    assert got == expected
    m, splits = fetched(repo_root, tmp_path, f"imagefolder:{tmp_path / 'rgb'}", "data.image_size=4", "data.channels=1")
    assert m["info"]["shape"] == [1, 4, 4]
    expected = sorted((np.asarray(Image.open(tmp_path / "rgb" / rel).convert("L").resize((4, 4), Image.BILINEAR))
                       .tobytes(), c) for rel, (c, _) in made.items())
    assert sorted((x.tobytes(), int(y)) for s in SPLITS for x, y in zip(*splits[s])) == expected


def test_text_file_is_cut_into_character_sequences(repo_root, tmp_path):
    content = "".join(f"line {i}: héllo wörld, ünïcode {i * 7}\n" for i in range(120))
    path = tmp_path / "story.txt"
    path.write_text(content, encoding="utf-8")
    m, splits = fetched(repo_root, tmp_path, f"text:{path}")
    vocab = sorted(set(content))
    assert m["vocab"] == "".join(vocab) and m["info"]["vocab_size"] == len(vocab) and m["info"]["kind"] == "sequence"
    assert m["source_file"]["sha256"] == sha256_of(path)
    chunks = [content[i : i + 64] for i in range(0, len(content), 64)]
    decoded = ["".join(vocab[t] for t in row if t >= 0) for s in SPLITS for row in splits[s][0]]
    assert sorted(decoded) == sorted(chunks)
    padded = [row for s in SPLITS for row in splits[s][0] if (row < 0).any()]
    assert len(padded) == (1 if len(content) % 64 else 0) and (padded[0][len(content) % 64 :] == -1).all()


def test_builtin_text_is_unchanged_by_the_shared_encoder(repo_root, tmp_path):
    """The built-in `text` source through the shared encoder: every sequence a 64-character cut of one topic."""
    import string

    from pydoc_data.topics import topics

    m, splits = fetched(repo_root, tmp_path, "text")
    vocab = m["vocab"]
    assert vocab == "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))
    keep = set(vocab)
    docs = ["".join(c for c in topics[t] if c in keep) for t in sorted(topics)]
    chunks = sorted(d[i : i + 64] for d in docs for i in range(0, len(d), 64))
    assert sorted("".join(vocab[t] for t in row if t >= 0) for s in SPLITS for row in splits[s][0]) == chunks


# --- bad input: one line naming the file or key, nothing finished written -----------------------------------
def nan_csv(path):
    return write_csv(path, ["a", "b"], [[1, 2], [3, "nan"]] + [[i, i] for i in range(20)])


def bad_inputs(tmp_path):
    """(dataset, extra overrides, what the error names) for each bad input, files written here."""
    from PIL import Image

    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    write_csv(tmp_path / "ragged.csv", ["a", "b", "c"], [[1, 2, 3], [4, 5]] + [[i, i, i] for i in range(20)])
    write_csv(tmp_path / "words.csv", ["a", "colour"], [[1, 0.5]] * 10 + [[2, "red"]] + [[3, 1]] * 10)
    write_csv(tmp_path / "nolabel.csv", ["a", "b"], [[i, i * 2] for i in range(20)])
    np.save(tmp_path / "inf.npy", np.array([[1.0, 2.0]] * 10 + [[np.inf, 0.0]]))
    np.savez(tmp_path / "nox.npz", data=np.zeros((10, 2)))
    for cls, size in (("a", (4, 4)), ("b", (5, 4))):
        (tmp_path / "mixed" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", size).save(tmp_path / "mixed" / cls / f"{i}.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    nan_csv(tmp_path / "nan.csv")
    return [
        ("csv:" + str(tmp_path / "missing.csv"), [], "missing.csv"),
        ("csv:" + str(tmp_path / "empty.csv"), [], "empty.csv"),
        ("npy:" + str(tmp_path / "empty.npy"), [], "empty.npy"),
        ("csv:" + str(tmp_path / "nan.csv"), [], "column 'b'"),
        ("npy:" + str(tmp_path / "inf.npy"), [], "inf.npy"),
        ("csv:" + str(tmp_path / "ragged.csv"), [], "ragged.csv, line 3"),
        ("csv:" + str(tmp_path / "words.csv"), [], "column 'colour' is not numeric"),
        ("csv:" + str(tmp_path / "nolabel.csv"), ["data.label_column=target"], "data.label_column"),
        ("npz:" + str(tmp_path / "nox.npz"), [], "nox.npz has no array 'x'"),
        ("imagefolder:" + str(tmp_path / "mixed"), [], "data.image_size"),
        ("text:" + str(tmp_path / "latin1.txt"), [], "latin1.txt is not UTF-8"),
    ]


def test_bad_inputs_are_one_error_naming_the_file_or_key(repo_root, tmp_path):
    for dataset, overrides, named in bad_inputs(tmp_path):
        cfg = cfg_for(repo_root, tmp_path, dataset, *overrides)
        with pytest.raises(GenzooError) as e:
            fetch(cfg)
        msg = str(e.value)
        assert named in msg and "\n" not in msg, (dataset, msg)
    assert_nothing_finished(tmp_path / "root")


class WritesOnUnpickle:
    """An object whose unpickling creates a file: proof that an object array was never unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_object_arrays_are_refused_without_unpickling(repo_root, tmp_path):
    marker = tmp_path / "unpickled"
    np.save(tmp_path / "evil.npy", np.array([WritesOnUnpickle(marker), 1], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", x=np.array([WritesOnUnpickle(marker)] * 4, dtype=object))
    ragged = np.empty(3, dtype=object)
    ragged[:] = [[1.0, 2.0], [3.0], [4.0, 5.0]]
    np.save(tmp_path / "ragged.npy", ragged, allow_pickle=True)
    (tmp_path / "pickle.npy").write_bytes(__import__("pickle").dumps(WritesOnUnpickle(marker)))
    for name, kind in (("evil.npy", "npy"), ("evil.npz", "npz"), ("ragged.npy", "npy"), ("pickle.npy", "npy")):
        with pytest.raises(GenzooError, match=name) as e:
            fetch(cfg_for(repo_root, tmp_path, f"{kind}:{tmp_path / name}"))
        assert "pickle" in str(e.value)
    assert not marker.exists()
    assert_nothing_finished(tmp_path / "root")


def test_unknown_names_list_the_prefixes(repo_root, tmp_path):
    with pytest.raises(GenzooError, match="data.dataset") as e:
        cfg_for(repo_root, tmp_path, "parquet:x.parquet")
    assert "csv:PATH" in str(e.value) and "digits" in str(e.value) and "imagefolder:PATH" in str(e.value)
    with pytest.raises(GenzooError, match="data.dataset"):
        cfg_for(repo_root, tmp_path, "csv:")


def test_a_file_named_like_a_built_in_data_set_gets_its_kind_in_its_name():
    """Not data/prepared/digits/, the experiment or the registered models of the built-in digits."""
    from pipeline.data.names import BUILT_IN_SLUGS, dataset_slug
    from pipeline.data.sources import SOURCES

    assert BUILT_IN_SLUGS == {dataset_slug(b) for b in SOURCES}
    assert dataset_slug("npz:/data/digits.npz") == "digits-npz" and dataset_slug("csv:text.csv") == "text-csv"
    assert dataset_slug("imagefolder:a/mnist/") == "mnist-imagefolder" and dataset_slug("npy:digits2.npy") == "digits2"


@pytest.mark.parametrize("override, named", [("data.channels=2", "data.channels"), ("data.image_size=0", "data.image_size"),
                                             ("data.label_column=''", "data.label_column")])
def test_new_data_keys_are_validated(repo_root, tmp_path, override, named):
    with pytest.raises(GenzooError, match=named):
        cfg_for(repo_root, tmp_path, "digits", override)


def test_too_few_examples_for_the_components_is_refused_at_train_time(repo_root, tmp_path):
    from pipeline.stages.train import train

    path = write_csv(tmp_path / "tiny.csv", ["a", "b"], [[i, (i * 7) % 5] for i in range(20)])
    overrides = ["family=gmm", "gmm.n_components=50", "trainer.accelerator=cpu",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cfg = cfg_for(repo_root, tmp_path, f"csv:{path}", *overrides)
    fetch(cfg)
    with pytest.raises(GenzooError, match="'gmm.n_components': must be <= 14"):
        train(cfg)
    assert not (tmp_path / "root" / "models").exists()


# --- the console script ---------------------------------------------------------------------------------------
def test_cli_fetches_a_csv_from_data_user(project_dir, genzoo):
    rows = [[i, float(i % 4) ** 2, "x" if i % 3 else "y"] for i in range(30)]
    user = project_dir / "data" / "user"
    user.mkdir(parents=True)
    write_csv(user / "small.csv", ["id", "sq", "label"], rows)
    r = genzoo(["fetch", "data.dataset=csv:data/user/small.csv"], cwd=project_dir)
    assert r.returncode == 0, r.stderr
    folder = next((project_dir / "data" / "prepared").glob("*/manifest.json")).parent
    m = json.loads((folder / "manifest.json").read_text())
    assert m["dataset"] == "csv:data/user/small.csv" and m["classes"] == ["x", "y"]
    assert m["source_file"]["sha256"] == sha256_of(user / "small.csv")
    splits = {s: (np.load(folder / f"{s}_x.npy"), np.load(folder / f"{s}_y.npy")) for s in SPLITS}
    source = np.array([r[:2] for r in rows], dtype=np.float64)
    ids = assert_standardised(splits, source, m)
    for s in SPLITS:
        assert [m["classes"][c] for c in splits[s][1]] == [rows[i][2] for i in ids[s]]


@pytest.mark.parametrize("name", ["nan.csv", "missing.csv"])
def test_cli_bad_csv_is_one_line_and_exit_2(project_dir, genzoo, name):
    user = project_dir / "data" / "user"
    user.mkdir(parents=True)
    if name == "nan.csv":
        nan_csv(user / name)
    r = genzoo(["fetch", f"data.dataset=csv:data/user/{name}"], cwd=project_dir)
    line = assert_clean_failure(r, name)
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr
    assert_nothing_finished(project_dir / "data")


# --- end to end: the wine table through fetch, train and evaluate ------------------------------------------
@pytest.mark.slow  # three process starts and an MLflow store: about 40 s on a busy 2-core machine
def test_wine_csv_fetch_train_evaluate(project_dir, genzoo):
    from sklearn.datasets import load_wine

    user = project_dir / "data" / "user"
    user.mkdir(parents=True)
    load_wine(as_frame=True).frame.rename(columns={"target": "label"}).to_csv(user / "wine.csv", index=False)
    data = ["data.dataset=csv:data/user/wine.csv", "trainer.accelerator=cpu", "tracking.log_model=false",
            "eval.n_samples=200", "eval.kid_subset_size=50", "eval.kid_subsets=5"]
    r = genzoo(["fetch", *data], cwd=project_dir)
    assert r.returncode == 0, r.stderr
    assert "train 124, val 18, test 36" in r.stdout
    gmm = ["family=gmm", "gmm.n_components=3", "gmm.max_epochs=5"]
    r = genzoo(["train", *gmm, *data], cwd=project_dir)
    assert r.returncode == 0, r.stderr
    r = genzoo(["evaluate", *gmm, *data], cwd=project_dir)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((project_dir / "reports" / "families" / "gmm.json").read_text())["metrics"]
    # better than the standard normal (the standardised data's own moments, no correlations): 13/2 log(2 pi e)
    assert np.isfinite(metrics["nll"]) and metrics["nll"] < 13 * 0.5 * np.log(2 * np.pi * np.e), metrics
    assert metrics["probe_acc"] > 0.8, metrics  # the three cultivars, from the model's representation
