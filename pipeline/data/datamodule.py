"""The LightningDataModule over a prepared dataset folder.

Images come off disk as integer levels and are dequantised here: fresh uniform noise for every training
batch, a fixed seeded noise for val/test so evaluation is repeatable (`dequantize`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from lightning_modules.contract import DataInfo
from pipeline.data.labelled import hide_labels
from pipeline.data.store import data_info, read_labelled, read_labels, read_manifest, read_split


def dequantize(x_levels: torch.Tensor, levels: Optional[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Integer levels 0..L-1 -> (x + u) / L with u ~ U[0, 1): a sample in the level's bin of [0, 1]."""
    if levels is None:
        return x_levels
    u = torch.rand(x_levels.shape, generator=generator)
    return (x_levels.float() + u) / levels


SPLITS = ("train", "val", "test", "holdout")


def split_noise_generator(seed: int, split: str) -> torch.Generator:
    """The generator of a split's fixed dequantisation noise: keyed on (seed, split), so the splits' noise is
    independent (a SeedSequence mixes the key; `seed + constant` per split would collide across seeds)."""
    key = np.random.SeedSequence([seed, 1000, SPLITS.index(split)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(key[0]) << 31 | int(key[1]) >> 1)


class ShardSampler(Sampler):
    """Rank r takes examples r, r+W, r+2W, ... in order: disjoint, no padding, no shuffling.

    Exact EM needs this (DistributedSampler pads by repeating examples, which would bias the
    summed sufficient statistics)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class EpochShuffleSampler(Sampler):
    """A fresh permutation per epoch drawn from (seed, epoch) only, so a resumed run sees the same
    order as an uninterrupted one (Lightning calls `set_epoch` before each epoch). With several ranks,
    rank r takes every W-th index of the permutation, padded by wrap-around so all ranks take the same
    number of steps (as torch's DistributedSampler does)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world_size, 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        perm = torch.cat([perm, perm[: self.per_rank * self.world - self.n]])
        return iter(perm[self.rank :: self.world].tolist())

    def __len__(self):
        return self.per_rank


class BatchIndexedDataset(Dataset):
    """Whole batches by one fancy index: `ds[[i, j, ...]]` -> (x[idx], y[idx], idx). Loaded through a
    BatchSampler with `batch_size=None`, this skips default collation's fetch-and-stack of every example
    (about 10 us an example: it was most of an EM epoch over 1e5 rows). `idx` keys the batch's noise."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, index):
        idx = torch.as_tensor(index)
        return (*(t[idx] for t in self.tensors), idx)


class EpochBatchSampler(BatchSampler):
    """A BatchSampler that passes Lightning's `set_epoch` on to the sampler it batches."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _without_index(batch):
    return batch[:-1]


def batch_loader(dataset: BatchIndexedDataset, sampler: Sampler, batch_size: int, collate=_without_index,
                 num_workers: int = 0) -> DataLoader:
    """Batches of `dataset` in the order of `sampler`, each fetched by one fancy index."""
    return DataLoader(dataset, sampler=EpochBatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      collate_fn=collate, num_workers=num_workers)


class PreparedDataModule(pl.LightningDataModule):
    """`hide_unlabelled`: where the store holds a labelled subset (`data.labels_per_class`), the training
    split's other labels are served as UNLABELLED (the train stage's view; evaluation sees every label)."""

    def __init__(self, folder: str | Path, batch_size: int = 128, seed: int = 0, num_workers: int = 0,
                 fixed_train_noise: bool = False, exact_sharding: bool = False, hide_unlabelled: bool = False):
        super().__init__()
        self.folder = Path(folder)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.fixed_train_noise, self.exact_sharding = fixed_train_noise, exact_sharding
        self.manifest = read_manifest(self.folder)
        self.info: DataInfo = data_info(self.manifest)
        self.labelled = read_labelled(self.folder, self.manifest)  # indices of the labelled training examples, or None
        self.hide_unlabelled = hide_unlabelled and self.labelled is not None
        self._raw = {}

    def raw(self, split: str):
        """(x, y) as stored: integer levels for images (hidden training labels as UNLABELLED)."""
        if split not in self._raw:
            x, y = read_split(self.folder, split, self.manifest)
            self._raw[split] = (torch.from_numpy(x), torch.from_numpy(self._visible(split, y)))
        return self._raw[split]

    def labels(self, split: str) -> torch.Tensor:
        """A split's labels, without reading its data."""
        if split in self._raw:
            return self._raw[split][1]
        return torch.from_numpy(self._visible(split, read_labels(self.folder, split, self.manifest)))

    def use_labelled(self, labelled) -> None:
        """Serve only these training labels (indices), whatever the store holds: the semi-supervised bench
        draws several labelled subsets of one prepared split."""
        self.labelled, self.hide_unlabelled, self._raw = labelled, True, {}

    def _visible(self, split: str, y):
        return hide_labels(y, self.labelled) if split == "train" and self.hide_unlabelled else y

    def has_split(self, split: str) -> bool:
        return f"{split}_x.npy" in self.manifest["files"]

    def split(self, split: str):
        """(x, y) in data space with a fixed, seeded dequantisation, drawn independently for each split (test
        example i does not share its noise with training example i)."""
        x, y = self.raw(split)
        return dequantize(x, self.info.levels, split_noise_generator(self.seed, split)), y

    def _dequantize_batch(self, batch):
        """Fresh noise per batch from its own generator keyed on (seed, epoch, first example), not the global
        RNG: the noise then does not depend on when Lightning prefetches the batch, nor on a resume."""
        x, y, index = batch
        key = hash((self.seed, getattr(self._train_sampler, "epoch", 0), int(index[0]))) % 2**62
        return dequantize(x, self.info.levels, torch.Generator().manual_seed(key)), y

    def _batched_loader(self, ds: Dataset, sampler: Sampler, collate) -> DataLoader:
        return batch_loader(ds, sampler, self.batch_size, collate, self.num_workers)

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.exact_sharding:  # EM: disjoint shards in a fixed order, the same on any number of ranks
            self._train_sampler = ShardSampler(len(self.raw("train")[0]), rank, world)
        else:
            self._train_sampler = EpochShuffleSampler(len(self.raw("train")[0]), self.seed, rank, world)
        if self.fixed_train_noise:
            return self._batched_loader(BatchIndexedDataset(*self.split("train")), self._train_sampler, _without_index)
        return self._batched_loader(BatchIndexedDataset(*self.raw("train")), self._train_sampler, self._dequantize_batch)

    def _eval_loader(self, split: str):
        ds = BatchIndexedDataset(*self.split(split))
        return self._batched_loader(ds, SequentialSampler(ds), _without_index)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
