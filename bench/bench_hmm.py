"""Time per Baum-Welch iteration of genzoo's HMM against hmmlearn and pomegranate 1.x: 1000 sequences x
100 steps, 8 states; Gaussian emissions (4-d, diag and full covariance) and categorical (20 symbols).

All three start from the same parameters. genzoo and hmmlearn fit the same model, so after the same
number of iterations their log-likelihoods must agree (checked, relative 1e-6). pomegranate's DenseHMM
also learns end-state probabilities (a different model), so its final log-likelihood is reported beside.

Per-iteration time is (t(n + 1 iterations) - t(1)) / n, so set-up cancels:
- genzoo: `e_step` on all sequences in one batch + `m_step` (one Lightning epoch's work), float64;
- hmmlearn: `fit(n_iter=...)`, tol=-inf, init_params="" (C, log-space forward-backward, float64);
- pomegranate: `DenseHMM.fit(max_iter=...)`, tol=0 (its minimum), float32 (its
  forward pass allocates float32 buffers, so float64 input fails).
torch runs with --threads threads (default 1, as hmmlearn's C loop is single-threaded).

Prints a markdown table (stdout) and writes bench/results/hmm.json. Usage: python bench/bench_hmm.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.hmm import HMM  # noqa: E402

N_STATES, DIM, VOCAB = 8, 4, 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def per_iteration(run, n: int):
    """Seconds per iteration and the model after n + 1 iterations."""
    (t_long, model), (t_one, _) = timed(lambda: run(n + 1)), timed(lambda: run(1))
    return max(t_long - t_one, 0.0) / n, model


def random_parameters(kind: str, rng: np.random.Generator) -> dict:
    p = {"startprob": rng.dirichlet(np.ones(N_STATES)),
         "transmat": rng.dirichlet(np.ones(N_STATES) + 4 * np.eye(N_STATES)[0], N_STATES)}
    if kind == "categorical":
        p["probs"] = rng.dirichlet(np.ones(VOCAB), N_STATES)
    else:
        p["means"] = rng.normal(scale=2.0, size=(N_STATES, DIM))
        a = rng.normal(size=(N_STATES, DIM, DIM)) / np.sqrt(DIM)
        full = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(DIM)
        p["covars"] = full if kind == "full" else np.diagonal(full, axis1=1, axis2=2).copy()
    return p


def hmmlearn_model(kind: str, p: dict, n_iter: int):
    from hmmlearn import hmm

    if kind == "categorical":
        m = hmm.CategoricalHMM(N_STATES, n_features=VOCAB, init_params="", n_iter=n_iter, tol=-np.inf)
        m.emissionprob_ = p["probs"]
    else:
        m = hmm.GaussianHMM(N_STATES, covariance_type=kind, init_params="", n_iter=n_iter, tol=-np.inf,
                            covars_prior=0.0)
        m.n_features = DIM
        m.means_, m.covars_ = p["means"], p["covars"]
    m.startprob_, m.transmat_ = p["startprob"], p["transmat"]
    return m


def genzoo_model(kind: str, p: dict, steps: int) -> HMM:
    if kind == "categorical":
        # the model hmmlearn fits: a given start (not the bigram one), maximum likelihood, float64
        m = HMM({"n_states": N_STATES, "pseudocount": 0.0, "init": "random", "transition_pseudocount": 0.0,
                 "precision": "float64"}, {"shape": (steps,), "kind": "sequence", "vocab_size": VOCAB})
        m.emission.probs.copy_(torch.from_numpy(p["probs"]))
    else:
        m = HMM({"n_states": N_STATES, "covariance_type": kind, "reg_covar": 0.0}, {"shape": (steps, DIM), "kind": "sequence"})
        m.emission.set_parameters(torch.from_numpy(p["means"]), torch.from_numpy(p["covars"]))
    m.set_parameters(torch.from_numpy(p["startprob"]), torch.from_numpy(p["transmat"]))
    m.initialized.fill_(True)
    return m


def pomegranate_model(kind: str, p: dict, n_iter: int):
    from pomegranate.distributions import Categorical, Normal
    from pomegranate.hmm import DenseHMM

    t = {k: torch.from_numpy(v).float() for k, v in p.items()}  # its forward pass is float32-only
    if kind == "categorical":
        dists = [Categorical(probs=t["probs"][k][None]) for k in range(N_STATES)]
    else:
        dists = [Normal(means=t["means"][k], covs=t["covars"][k], covariance_type=kind) for k in range(N_STATES)]
    return DenseHMM(dists, edges=t["transmat"], starts=t["startprob"], max_iter=n_iter, tol=0.0, verbose=False)


def bench(kind: str, n_seq: int, steps: int, n_iter: int) -> dict:
    rng = np.random.default_rng(0)
    truth = random_parameters(kind, rng)
    X, _ = hmmlearn_model(kind, truth, 1).sample(n_seq * steps, random_state=1)
    start = random_parameters(kind, np.random.default_rng(1))  # a different model to start EM from
    lengths = [steps] * n_seq
    x = torch.from_numpy(X.reshape(n_seq, steps) if kind == "categorical" else X.reshape(n_seq, steps, DIM))

    def run_genzoo(n):
        m = genzoo_model(kind, start, steps)
        for _ in range(n):
            m.m_step(m.e_step(x))
        return m

    def run_hmmlearn(n):
        return hmmlearn_model(kind, start, n).fit(X, lengths)

    x_pom = x[..., None] if kind == "categorical" else x.float()

    def run_pomegranate(n):
        return pomegranate_model(kind, start, n).fit(x_pom)

    row = {"kind": kind, "sequences": n_seq, "steps": steps, "states": N_STATES, "iterations": n_iter + 1}
    models = {}
    for name, run in (("genzoo", run_genzoo), ("hmmlearn", run_hmmlearn), ("pomegranate", run_pomegranate)):
        log(f"{kind}: {name} ...")
        row[f"{name}_s_per_iter"], models[name] = per_iteration(run, n_iter)
    # same number of iterations -> same model: compare the final total log-likelihoods
    row["genzoo_loglik"] = models["genzoo"].log_prob(x).sum().item()
    row["hmmlearn_loglik"] = models["hmmlearn"].score(X, lengths)
    with torch.no_grad():
        row["pomegranate_loglik"] = models["pomegranate"].log_probability(x_pom).sum().item()
    row["loglik_rel_diff_vs_hmmlearn"] = abs(row["genzoo_loglik"] - row["hmmlearn_loglik"]) / abs(row["hmmlearn_loglik"])
    fastest_peer = min(row["hmmlearn_s_per_iter"], row["pomegranate_s_per_iter"])
    row["ratio_vs_fastest_peer"] = row["genzoo_s_per_iter"] / fastest_peer if fastest_peer > 0 else float("nan")
    log(json.dumps(row))
    return row


def table(rows) -> str:
    lines = ["| emission | data | genzoo s/iter | hmmlearn s/iter | pomegranate s/iter | genzoo / fastest peer "
             "| final loglik genzoo | hmmlearn | pomegranate (learns end probs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['sequences']} x {r['steps']}, {r['states']} states | {r['genzoo_s_per_iter']:.4f} "
                     f"| {r['hmmlearn_s_per_iter']:.4f} | {r['pomegranate_s_per_iter']:.4f} | {r['ratio_vs_fastest_peer']:.2f}x "
                     f"| {r['genzoo_loglik']:.2f} | {r['hmmlearn_loglik']:.2f} | {r['pomegranate_loglik']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100 sequences, 2 timed iterations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="n in (t(n + 1) - t(1)) / n")
    ap.add_argument("--sequences", type=int, default=1000)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    n_seq, n_iter = (100, 2) if args.quick else (args.sequences, args.iters)
    rows = [bench(kind, n_seq, 100, n_iter) for kind in ("diag", "full", "categorical")]
    for r in rows:
        if r["loglik_rel_diff_vs_hmmlearn"] > 1e-6:
            raise SystemExit(f"{r['kind']}: genzoo and hmmlearn disagree after the same iterations: {r}")
    out = ROOT / "bench" / "results" / "hmm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch_threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"\ntorch threads: {args.threads}; times per Baum-Welch iteration, (t(n+1) - t(1)) / n with n = {n_iter}.")


if __name__ == "__main__":
    main()
