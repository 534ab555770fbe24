"""Real 2-process CPU DDP training of the VAE through the train stage (`ddp_spawn`, as DESIGN.md advises
inside pytest): one MLflow run however many ranks, finished, with the validation loss and a checkpoint."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import time

import torch

from lightning_modules.vae import VAE
from pipeline.checkpoints import load_model
from pipeline.config import load_config
from pipeline.stages.train import train

DDP = ["family=vae", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
       "vae.max_epochs=1", "vae.hidden=32", "vae.channels=8", "vae.iwae_k=8", "data.batch_size=256"]


def test_ddp_spawn_two_cpu_processes_make_one_finished_run(digits_project, tmp_path):
    db = tmp_path / "ddp_mlflow.db"
    cfg = load_config(DDP + [f"tracking.uri=sqlite:///{db}", "tracking.experiment=ddp-test"])
    start = time.perf_counter()
    model_dir = train(cfg)
    seconds = time.perf_counter() - start

    assert model_dir.resolve() == digits_project / "data" / "models" / "vae"
    assert (model_dir / "model.ckpt").is_file() and (model_dir / "last.ckpt").is_file()
    state = json.loads((model_dir / "state.json").read_text())
    run_file = json.loads((model_dir / "mlflow_run.json").read_text())
    assert state["finished"] and state["run_id"] == run_file["run_id"]

    # the store itself, read with sqlite3: exactly one run, FINISHED, tagged, with the metrics
    con = sqlite3.connect(db)
    try:
        runs = con.execute("SELECT run_uuid, status FROM runs").fetchall()
        assert runs == [(run_file["run_id"], "FINISHED")], runs
        metrics = {k for (k,) in con.execute("SELECT DISTINCT key FROM metrics")}
        tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_file["run_id"],)).fetchall())
        params = {k for (k,) in con.execute("SELECT key FROM params")}
        val_loss = con.execute("SELECT value FROM metrics WHERE key = 'val/loss'").fetchall()
    finally:
        con.close()
    assert {"val/loss", "train/loss", "perf/train_seconds"} <= metrics, metrics
    assert len(val_loss) == 1 and all(v == v for (v,) in val_loss)  # one epoch, one value, not NaN
    assert tags["genzoo.family"] == "vae" and tags["genzoo.dataset"] == "digits"
    assert "trainer.devices" in params and "vae.latent_dim" in params

    # the checkpoint is the trained model (weights_only load), not the untrained initialisation
    model = load_model(model_dir / "model.ckpt")
    assert isinstance(model, VAE)
    torch.manual_seed(0)
    fresh = VAE(dataclasses.asdict(model.config), model.info.to_dict())
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # ... and the weights rank 0 trained: the launcher's model.ckpt equals rank 0's last.ckpt
    last = torch.load(model_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert last.keys() == model.state_dict().keys()
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())
    assert seconds < 90, f"2-process DDP training took {seconds:.0f} s"
