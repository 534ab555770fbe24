"""Building what a stage runs: the data module a family trains on and the Lightning Trainer, from the
config, in one place."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_modules.contract import ConfigError
from pipeline.data.datamodule import PreparedDataModule
from pipeline.errors import GenzooError
from pipeline.paths import prepared_dir, write_atomic


def datamodule_for(cfg, cls=None, batch_size=None, hide_unlabelled=False) -> PreparedDataModule:
    """The prepared data, served as family `cls` needs it (exact shards and fixed noise for EM); the train stage
    asks for the hidden labels of a semi-supervised split to be hidden (`hide_unlabelled`)."""
    exact = bool(cls is not None and cls.exact_sharding)
    dm = PreparedDataModule(prepared_dir(cfg.data), batch_size=batch_size or cfg.data.batch_size, seed=cfg.trainer.seed,
                            num_workers=cfg.data.num_workers, fixed_train_noise=exact, exact_sharding=exact,
                            hide_unlabelled=hide_unlabelled)
    check_data_settings(cfg, dm.manifest, dm.folder)
    return dm


def check_data_settings(cfg, manifest: dict, folder: Path) -> None:
    """The `data` settings that must fit the prepared data, before any work: a held-out class is a class of
    the dataset, and the folder was fetched with the configured hold-out and labelled subset."""
    holdout, classes = cfg.data.holdout_class, manifest["info"].get("num_classes")
    if holdout is not None and not (classes and 0 <= holdout < classes):
        allowed = f"a class of {manifest['dataset']} (0 to {classes - 1}) or null" if classes else \
            f"null ({manifest['dataset']} has no labels)"
        raise GenzooError(f"bad value for config key 'data.holdout_class': must be {allowed}, not {holdout}")
    for key in ("holdout_class", "labels_per_class"):
        fetched = manifest.get(key)
        if fetched != cfg.data[key]:
            raise GenzooError(f"data.{key}={cfg.data[key]} but {folder} was fetched with {key}={fetched}: "
                              "run `genzoo fetch` (or `dvc repro`) first")


def check_fits_data(model, train_labels) -> None:
    """The family's settings that must fit the training set (no more mixture components than examples:
    `GenerativeModel.check_fits_data`), as one error line naming the key; the train stage calls it before
    its MLflow run opens."""
    try:
        model.check_fits_data(train_labels)
    except ConfigError as e:
        raise GenzooError(f"bad value for config key '{model.family}.{e.key}': {e.message}") from None


def build_trainer(cfg, max_epochs: int, default_root_dir: Path, **kwargs) -> pl.Trainer:
    """A Trainer from the `trainer` section (its `max_epochs` overrides the stage's); progress bars only on
    a terminal. A setting Lightning refuses becomes one error line naming the trainer keys."""
    quiet_lightning()
    t = cfg.trainer
    args = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, max_epochs=t.max_epochs or max_epochs, deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps, default_root_dir=str(default_root_dir),
        enable_progress_bar=sys.stdout.isatty(), enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        return pl.Trainer(**{**args, **kwargs})
    except (ValueError, MisconfigurationException) as e:  # e.g. fsdp on a CPU, devices=3 with 2 GPUs
        raise GenzooError(f"trainer settings (trainer.accelerator={t.accelerator}, trainer.devices={t.devices}, "
                          f"trainer.strategy={t.strategy}): {str(e).splitlines()[0]}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writes (`last.ckpt`, `trainer.save_checkpoint`) made atomic on a local disk: the
    bytes go to a temporary file in the checkpoint's own folder, fsynced, then renamed over it
    (`paths.write_atomic`). Lightning's own save goes through a temporary file in the system temp folder and
    then copies it over the old checkpoint wherever that folder is on another file system, so a full disk
    there could leave a truncated checkpoint in place of the last good one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))


def quiet_lightning() -> None:
    """Lightning logs its device lines and product tips at INFO on every fit (it resets its logger's level
    when imported, so this runs after the import): a user asked for neither. Warnings and errors still show,
    and so does the one line per process of a multi-process run that says which rank of how many it is.
    `genzoo -v` (genzoo's `pipeline` logger at INFO: `cli.configure_output`) keeps Lightning's INFO lines too."""
    verbose = logging.getLogger("pipeline").getEffectiveLevel() <= logging.INFO
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("lightning_fabric.utilities.distributed").setLevel(logging.INFO)


def resolve_eval_device(setting: str, accelerator: str, cuda_available: bool, mps_available: bool,
                        cuda_count: int = 1) -> str:
    """`eval.device` as a torch device: `auto` is the device the Trainer uses (or would) under
    `trainer.accelerator`, as Lightning picks it (auto / gpu: CUDA or MPS when present; cuda, mps: that one;
    else the CPU); `cpu`, `cuda`, `cuda:<i>`, `mps` are themselves, refused in one line where absent."""
    accelerator = str(accelerator)
    if setting == "auto":
        if accelerator in ("auto", "gpu", "cuda") and cuda_available:
            return "cuda"
        if accelerator in ("auto", "gpu", "mps") and mps_available:
            return "mps"
        return "cpu"
    if setting.startswith("cuda"):
        index = int(setting.partition(":")[2] or 0)
        if not cuda_available or index >= cuda_count:
            found = f"{cuda_count} CUDA GPU(s)" if cuda_available else "no CUDA GPU"
            raise GenzooError(f"eval.device={setting}: this machine has {found}; use eval.device=auto or cpu")
    if setting == "mps" and not mps_available:
        raise GenzooError("eval.device=mps: this machine has no MPS (Apple GPU); use eval.device=auto or cpu")
    return setting


def eval_device(cfg) -> torch.device:
    """The device the evaluate stage and `genzoo sample` run a model on (`resolve_eval_device` on this machine)."""
    mps = getattr(torch.backends, "mps", None)
    cuda = torch.cuda.is_available()
    return torch.device(resolve_eval_device(cfg.eval.device, cfg.trainer.accelerator, cuda,
                                            bool(mps is not None and mps.is_available()),
                                            torch.cuda.device_count() if cuda else 0))


def peak_memory_mb() -> float:
    """Peak GPU memory where training ran on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
