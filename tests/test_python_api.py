"""README's "Python API" section, run as written (issue 13): its ```python blocks are executed in order in one
namespace, in a throw-away project, after the pipeline has registered the GMM of the moons its last block loads
(the `bash` block before it, with smaller settings). The registry's champion logic itself is test_sweeps.py's."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pipeline import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_blocks(repo_root, section="## Python API") -> list:
    text = (repo_root / "README.md").read_text()
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_readme_python_api_runs(project_dir, repo_root):
    blocks = readme_blocks(repo_root)
    assert len(blocks) == 3
    uri = f"sqlite:///{project_dir / 'mlflow.db'}"  # the README's relative `sqlite:///mlflow.db`, made absolute
    ns: dict = {}
    exec(blocks[0], ns)  # build and train a conditional GMM on the user's arrays
    assert (project_dir / "gmm.ckpt").is_file() and ns["trainer"].current_epoch == 2
    exec(blocks[1], ns)  # score new data, classify, sample a class
    log_p, p_y, samples = ns["log_p"], ns["p_y"], ns["class_1"]
    assert log_p.shape == (3,) and torch.isfinite(log_p).all() and log_p[2] < log_p[:2].min()
    assert p_y.shape == (3, 2) and torch.allclose(p_y.sum(1), torch.ones(3, dtype=p_y.dtype))
    assert p_y[0, 0] > 0.9 and p_y[1, 1] > 0.9  # the blobs around (-2, -2) and (2, 2)
    assert samples.shape == (16, 2) and samples.mean(0).sub(2).abs().max() < 1  # class 1 lies around (2, 2)

    moons = ["data.dataset=toy2d:moons", "data.toy_samples=1000", "family=gmm", "trainer.accelerator=cpu",
             "gmm.max_epochs=3", "eval.n_samples=100", "eval.kid_subset_size=50", "eval.kid_subsets=5",
             f"tracking.uri={uri}"]
    cli.main(["-q", "fetch", *moons])
    cli.main(["-q", "train", *moons])
    cli.main(["-q", "evaluate", *moons, "tracking.register=true"])
    exec(blocks[2].replace('"sqlite:///mlflow.db"', repr(uri)), ns)  # a registered model, from the store
    served, champion = np.asarray(ns["p_y"]), ns["champion"]
    assert served.shape == (3, 2) and np.allclose(served.sum(1), 1, atol=1e-5)
    with torch.no_grad():  # the pyfunc serves the full model's p(y | x)
        assert np.allclose(served, champion.classify(ns["x_new"]).exp().numpy(), atol=1e-5)
    assert ns["log_p"].shape == (3,) and champion.family == "gmm" and ns["mine"].family == "gmm"
    with torch.no_grad():  # the checkpoint saved from Python loads the same model
        assert torch.allclose(ns["mine"].log_prob(ns["x_new"]), ns["model"].log_prob(ns["x_new"]))
