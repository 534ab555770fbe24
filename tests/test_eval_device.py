"""`eval.device` (issue 13): the evaluate stage and `genzoo sample` run the model, the feature network and the label
classifier on the accelerator the trainer uses (`auto`) or on the one named; the scoring moves each batch to the
model's device and the results back to the CPU. No GPU here: the resolver is tested as a pure function with the
machine's devices given, and an evaluation on `cpu` must give exactly the metrics of `auto` (the CPU here)."""
from __future__ import annotations

import pytest

from pipeline import cli
from pipeline.errors import GenzooError
from pipeline.runtime import resolve_eval_device

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("setting, accelerator, cuda, mps, want", [
    ("auto", "auto", False, False, "cpu"),  # this machine
    ("auto", "auto", True, False, "cuda"),
    ("auto", "gpu", True, False, "cuda"),
    ("auto", "cuda", True, False, "cuda"),
    ("auto", "cpu", True, False, "cpu"),  # trained on the CPU by choice: evaluated there too
    ("auto", "auto", False, True, "mps"),
    ("auto", "gpu", False, True, "mps"),
    ("auto", "mps", False, True, "mps"),
    ("auto", "cuda", False, True, "cpu"),
    ("auto", "mps", True, False, "cpu"),
    ("cpu", "auto", True, True, "cpu"),
    ("cuda", "cpu", True, False, "cuda"),  # named: whatever the trainer used
    ("cuda:1", "auto", True, False, "cuda:1"),
    ("mps", "cpu", False, True, "mps"),
])
def test_eval_device_resolves_as_lightning_picks_the_accelerator(setting, accelerator, cuda, mps, want):
    assert resolve_eval_device(setting, accelerator, cuda, mps, cuda_count=2 if cuda else 0) == want


@pytest.mark.parametrize("setting, cuda, count, words", [
    ("cuda", False, 0, "no CUDA GPU"), ("cuda:0", False, 0, "no CUDA GPU"), ("cuda:2", True, 2, "2 CUDA GPU(s)"),
    ("mps", False, 0, "no MPS"),
])
def test_an_absent_device_is_refused_naming_eval_device(setting, cuda, count, words):
    with pytest.raises(GenzooError) as e:
        resolve_eval_device(setting, "auto", cuda, False, cuda_count=count)
    assert f"eval.device={setting}" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_evaluate_on_cpu_gives_the_metrics_of_auto_and_cuda_is_refused(project_dir, capsys):
    """Here `auto` is the CPU: the same metrics, bit for bit (the costs aside); `cuda` is one line, exit 2."""
    import json

    import torch

    common = ["family=gmm", "data.dataset=toy2d:moons", "data.toy_samples=600", "trainer.accelerator=cpu",
              "gmm.n_components=3", "gmm.max_epochs=2", "eval.n_samples=60", "eval.kid_subset_size=20",
              "eval.kid_subsets=3", "tracking.log_model=false", f"tracking.uri=sqlite:///{project_dir / 'mlflow.db'}"]
    cli.main(["-q", "fetch", *common])
    cli.main(["-q", "train", *common])
    report = project_dir / "reports" / "families" / "gmm.json"
    metrics = {}
    for device in ("auto", "cpu"):
        cli.main(["-q", "evaluate", *common, f"eval.device={device}"])
        metrics[device] = {k: v for k, v in json.loads(report.read_text())["metrics"].items()
                           if k not in ("samples_per_second", "peak_memory_mb")}
    assert metrics["cpu"] == metrics["auto"] and "nll" in metrics["cpu"] and "fid" in metrics["cpu"]
    capsys.readouterr()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            cli.main(["evaluate", *common, "eval.device=cuda"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "eval.device=cuda" in err and err.count("\n") == 1
        with pytest.raises(SystemExit):
            cli.main(["sample", *common, "eval.device=cuda", "-n", "4", "-o", str(project_dir / "s.pt")])
        assert "eval.device=cuda" in capsys.readouterr().err
    cli.main(["sample", *common, "eval.device=cpu", "--label", "1", "-n", "4", "-o", str(project_dir / "s.pt")])
    assert torch.load(project_dir / "s.pt").shape == (4, 2)
