"""Run every benchmark in one go and write BENCHMARKS.md from what they print (markdown tables).

Each bench script measures genzoo against the peer a user would pick instead, in the same process run,
and prints its tables; ratios taken in one run are what we compare (absolute seconds vary by machine)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("Gaussian mixtures: EM iteration vs scikit-learn GaussianMixture and torchgmm", "bench_gmm.py"),
    ("Hidden Markov models: Baum-Welch iteration vs hmmlearn and pomegranate", "bench_hmm.py"),
    ("RBM: training epoch vs scikit-learn BernoulliRBM", "bench_rbm.py"),
    ("Quality at equal wall time: genzoo against zuko, pythae and scikit-learn on digits", "quality.py"),
    ("Deep families: Lightning overhead and sampling speed of every family", "bench_lightning_loop.py"),
]


def main() -> None:
    import torch

    parts = [
        "# Benchmarks\n",
        f"Measured {datetime.date.today()} by `make bench` (`python bench/run_all.py`) on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads). "
        "Ratios are genzoo time / peer time measured in the same run (< 1 means genzoo is faster).\n",
    ]
    for title, script in SCRIPTS:
        path = HERE / script
        if not path.exists():
            continue
        print(f"running {script} ...", flush=True)
        out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=HERE.parent)
        body = out.stdout.strip() if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n```\n{out.stderr[-2000:]}\n```"
        parts.append(f"## {title}\n\n{body}\n")
    parts.append((HERE / "NOTES.md").read_text())  # what the numbers mean and what would close the gaps
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
