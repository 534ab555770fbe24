"""Every test metric, computed through the family contract only (no branch on the family).

Likelihoods: the continuous NLL of dequantised data plus D·ln(levels) bounds the discrete-data NLL
(Theis et al. 2016), reported in nats per example and bits per dimension.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_modules.contract import DataInfo, GenerativeModel, progress
from pipeline.evaluation.conditional import accuracy, bayes_classifier_accuracy, conditional_metrics, proportional_labels
from pipeline.evaluation.sample_metrics import extract, fid_kid, precision_recall


MAX_LOG_FLOAT = math.log(sys.float_info.max)  # the largest x with a finite exp(x)


@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, device=None) -> Tensor:
    """fn over `x` in chunks of `batch_size`, each moved to `device` (the model's: `eval.device`), the results
    gathered on the CPU, with a progress bar (on a terminal) named after fn."""
    chunks = x.split(batch_size)
    name = getattr(fn, "__name__", "evaluate")
    return torch.cat([fn(chunk if device is None else chunk.to(device)).detach().cpu()
                      for chunk in progress(chunks, name, len(chunks))])


def likelihood_metrics(model: GenerativeModel, log_p: Tensor, x: Tensor, info: DataInfo, batch_size: int) -> Dict[str, float]:
    """NLL, bits per dimension (per token for token sequences) and perplexity from the test log-densities."""
    log_p = log_p.double()
    nll = -log_p.mean().item()
    if info.levels is not None:
        nll += info.dim * math.log(info.levels)
    out = {"nll": nll, "bpd": nll / (info.dim * math.log(2))}
    if model.token_count(x[:1].to(model.device)) is not None:  # sequence models over tokens: perplexity per token
        tokens = batched(model.token_count, x, batch_size, model.device).double().sum().item()
        per_token = -log_p.sum().item() / tokens
        # math.exp raises OverflowError past ~709.78 nats per token: such a perplexity is +inf
        out["perplexity"] = math.inf if per_token >= MAX_LOG_FLOAT else math.exp(per_token)
        out["bpd"] = per_token / math.log(2)  # bits per token
    return out


def held_out_log_likelihoods(model: GenerativeModel, x: Tensor, y: Tensor, batch_size: int) -> tuple:
    """(log p(x) of each test example, metrics of the Bayes classifier). A model of P(X, Y) gets both from one
    pass over log p(x, y) for every class: log p(x) is its log-sum-exp over y (the contract's marginal) and the
    Bayes classifier its argmax."""
    if not model.can_classify():
        return batched(model.log_prob, x, batch_size, model.device).double(), {}
    joint = batched(model.class_log_joint, x, batch_size, model.device).double()
    return torch.logsumexp(joint, 1), {"gen_class_acc": bayes_classifier_accuracy(joint, y)}


@torch.no_grad()
def timed_samples(model: GenerativeModel, n: int, batch_size: int, seed: int, **sample_kwargs):
    """n samples and the samples per second. A model of P(X, Y) is asked for labels in the exact proportions of
    its p(y) (`proportional_labels`, the CAS samples' protocol): the sample metrics then compare x, not the luck of
    the label counts."""
    labels = None
    if model.conditional:
        prior = model.class_log_prior().exp().detach().cpu()
        labels = proportional_labels(prior, n, torch.Generator().manual_seed(seed)).to(model.device)
    start = time.perf_counter()
    parts = []
    for done in progress(range(0, n, batch_size), "sample", -(-n // batch_size)):
        size = min(batch_size, n - done)
        y = None if labels is None else labels[done:done + size]
        parts.append(model.sample(size, y, **sample_kwargs).detach().cpu())
    seconds = time.perf_counter() - start
    return torch.cat(parts), n / seconds


def corrupted(x: Tensor, info: DataInfo, generator: torch.Generator) -> Dict[str, Tensor]:
    """Out-of-distribution versions of the test set: uniform noise, and (images) upside-down flips."""
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    noise = lo + (hi - lo) * torch.rand(x.shape, generator=generator)
    out = {"noise": noise}
    if info.kind == "image":
        out["flip"] = x.flip(-2)
    return out


def score_ranks(score: Tensor) -> Tensor:
    """Anomaly scores -> their dense ranks scaled into [0, 1], NaN counted as +inf (a score the model could not
    compute flags the input as anomalous), ties kept. AUROC and the ROC curve depend only on the order, and
    torchmetrics reads scores outside [0, 1] as logits and applies a sigmoid, which rounds every score above
    ~37 to 1 (and below ~-745 to 0), tying them all: log-likelihood scores would give a meaningless AUROC."""
    score = score.double()
    score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
    rank = torch.unique(score, sorted=True, return_inverse=True)[1].double()
    return rank / rank.max().clamp_min(1)


def anomaly_metrics(model: GenerativeModel, test: Tensor, anomalies: Dict[str, Tensor], batch_size: int):
    """AUROC of the anomaly score (higher = more anomalous; NaN counts as +inf), normal test examples (label 0)
    vs each anomaly set and all together, and the ROC curve of all together."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    normal = batched(model.anomaly_score, test, batch_size, model.device)
    metrics, curves = {}, {}
    scores = {name: batched(model.anomaly_score, a, batch_size, model.device) for name, a in anomalies.items()}
    scores["all"] = torch.cat(list(scores.values()))
    for name, s in scores.items():
        score = score_ranks(torch.cat([normal, s]))
        label = torch.cat([torch.zeros(len(normal)), torch.ones(len(s))]).long()
        key = "anomaly_auroc" if name == "all" else f"anomaly_auroc_{name}"
        metrics[key] = binary_auroc(score, label).item()
        if name == "all":
            fpr, tpr, _ = binary_roc(score, label)
            curves["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return metrics, curves


def probe_metrics(model: GenerativeModel, train, test, batch_size: int, seed: int) -> Dict[str, float]:
    """Logistic-regression probe on encode(x): all training labels, and 10 labels per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = train, test
    ftr = batched(model.encode, xtr, batch_size, model.device).flatten(1).double().numpy()
    fte = batched(model.encode, xte, batch_size, model.device).flatten(1).double().numpy()
    ytr, yte = ytr.numpy(), yte.numpy()
    scaler = StandardScaler().fit(ftr)
    ftr, fte = scaler.transform(ftr), scaler.transform(fte)
    rng = np.random.default_rng(seed)
    few = np.concatenate([rng.permutation(np.flatnonzero(ytr == c))[:10] for c in np.unique(ytr)])
    out = {}
    for key, idx in (("probe_acc", np.arange(len(ytr))), ("probe_acc_10", few)):
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(ftr[idx], ytr[idx])
        out[key] = float((clf.predict(fte) == yte).mean())
    return out


def sample_quality(features, test: Tensor, samples: Tensor, ecfg) -> Dict[str, float]:
    """FID, KID and k-NN precision / recall of `samples` against `test`, in the feature space."""
    out = fid_kid(features, test, samples, ecfg.kid_subset_size, ecfg.kid_subsets, ecfg.batch_size)
    out.update(precision_recall(extract(features, test), extract(features, samples)))
    return out


SWEEP_METRICS = ("fid", "kid_mean", "precision", "recall")


def sample_sweep_metrics(model: GenerativeModel, features, test: Tensor, default_quality: Dict[str, float],
                         ecfg) -> tuple:
    """The sample-quality metrics at each of the model's further sampling settings (`sample_sweep`, e.g. guidance
    scales; {} is the default setting, scored already as `default_quality`): ({"fid_<suffix>": ..., ...}, [one point
    per setting, in order])."""
    metrics, points = {}, []
    for suffix, kwargs in model.sample_sweep().items():
        quality = default_quality
        if kwargs:
            samples, _ = timed_samples(model, ecfg.n_samples, ecfg.batch_size, ecfg.seed, **kwargs)
            quality = sample_quality(features, test, samples, ecfg)
        metrics.update({f"{k}_{suffix}": quality[k] for k in SWEEP_METRICS})
        points.append({"setting": suffix, **kwargs, **{k: quality[k] for k in SWEEP_METRICS}})
    return metrics, points


def real_data_floor(features, dm, ecfg) -> Dict[str, float]:
    """The sample-quality metrics of the test split against the train split: how far real data is from
    itself, a floor no model can be expected to beat."""
    torch.manual_seed(ecfg.seed)
    return sample_quality(features, dm.split("test")[0], dm.split("train")[0], ecfg)


def score(model: GenerativeModel, dm, features: Optional[torch.nn.Module], ecfg, label_classifier=None,
          fcfg=None) -> tuple:
    """All metrics for one trained model: (scalar metrics, curves, samples, labelled samples). The labelled
    samples are (samples, their requested classes) of a model of P(X, Y), else None; `label_classifier`
    judges them (cond_acc) and `fcfg` is the featnet budget of the CAS classifier."""
    info, bs = dm.info, ecfg.batch_size
    torch.manual_seed(ecfg.seed)
    test_x, test_y = dm.split("test")
    metrics, curves = {}, {}
    if model.has_log_prob():
        log_p, classifier_metrics = held_out_log_likelihoods(model, test_x, test_y, bs)
        metrics.update(likelihood_metrics(model, log_p, test_x, info, bs))
        metrics.update(model.likelihood_diagnostics())
        metrics.update(classifier_metrics)
    samples, per_second = timed_samples(model, ecfg.n_samples, bs, ecfg.seed)
    metrics["samples_per_second"] = per_second
    if features is not None:
        quality = sample_quality(features, test_x, samples, ecfg)
        metrics.update(quality)
        sweep, points = sample_sweep_metrics(model, features, test_x, quality, ecfg)
        metrics.update(sweep)
        if points:
            curves["sample_sweep"] = points
    if info.kind in ("image", "vector"):
        g = torch.Generator().manual_seed(ecfg.seed)
        anomalies = corrupted(test_x, info, g)
        if dm.has_split("holdout"):
            anomalies["holdout"] = dm.split("holdout")[0]
        m, c = anomaly_metrics(model, test_x, anomalies, bs)
        metrics.update(m)
        curves.update(c)
    if model.has_encoder() and info.num_classes:
        metrics.update(probe_metrics(model, dm.split("train"), (test_x, test_y), bs, ecfg.seed))
    if dm.labelled is not None and model.can_classify():  # trained on a semi-supervised split
        metrics["semi_acc"] = accuracy(model.classify, test_x, test_y, bs, model.device)
    labelled = None
    if model.conditional:
        m, *labelled = conditional_metrics(model, info.kind, dm.split("train")[1], (test_x, test_y), label_classifier,
                                           fcfg, ecfg)
        metrics.update(m)
    return metrics, curves, samples, labelled
