"""Metrics of a model of P(X, Y), through the contract only:

- `gen_class_acc`: accuracy of the model's Bayes classifier argmax_y log p(x | y) + log p(y) on the test set
  ("generative models can classify").
- `cond_acc`: the featnet classifier's accuracy on samples asked for class c, labelled c: does the model obey
  the label? (the "GAN-test" of Shmelkov et al. 2018, "How good is my GAN?").
- `cas`: the Classification Accuracy Score (Ravuri & Vinyals 2019; Shmelkov et al.'s "GAN-train"): a classifier
  of the featnet's architecture and budget trained on N generated labelled examples only (N and the label
  counts those of the real training set), tested on the real test set. Its real-data counterpart is the same
  classifier trained on the real training set (`real_data_baselines`).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.contract import GenerativeModel
from pipeline.evaluation.featnet import FeatNet
from pipeline.evaluation.sample_metrics import module_device


@torch.no_grad()
def accuracy(predict, x: Tensor, y: Tensor, batch_size: int, device=None) -> float:
    """Accuracy of `predict`'s argmax on (x, y) (on the CPU); each batch goes to `device` (the predictor's)."""
    pred = torch.cat([predict(chunk.to(device) if device is not None else chunk).argmax(1).cpu()
                      for chunk in x.split(batch_size)])
    return (pred == y).double().mean().item()


def bayes_classifier_accuracy(class_log_joint: Tensor, y: Tensor) -> float:
    """gen_class_acc: argmax_y log p(x, y) = argmax_y log p(x | y) + log p(y) against the true labels."""
    return (class_log_joint.argmax(1) == y).double().mean().item()


def train_classifier(x: Tensor, y: Tensor, num_classes: int, fcfg, seed: int) -> FeatNet:
    """A FeatNet trained on (x, y) with the featnet stage's budget (epochs, batch size, learning rate): a plain
    loop, seeded, on the CPU-sized data this runs on."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatNet(x.shape[1], num_classes, fcfg.feature_dim, fcfg.lr)
        opt = torch.optim.Adam(net.parameters(), lr=fcfg.lr)
        net.train()
        for _ in range(fcfg.max_epochs):
            for idx in torch.randperm(len(x), generator=g).split(fcfg.batch_size):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return net.eval()


def classification_accuracy_score(x_train: Tensor, y_train: Tensor, test: Tuple[Tensor, Tensor], num_classes: int,
                                  fcfg, seed: int, batch_size: int) -> float:
    net = train_classifier(x_train, y_train, num_classes, fcfg, seed)
    return accuracy(net, *test, batch_size)


def proportional_labels(prior: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n class labels in the proportions of `prior` (K,) as exactly as n allows (largest-remainder rounding of
    n p(y)), in a random order: stratified sampling of y ~ p(y). Each sample's label is still marginally p(y), but
    the label counts carry no multinomial noise, which on digits swung a model's FID by +-0.25 between seeds."""
    p = prior.double() / prior.double().sum()
    exact = p * n
    counts = exact.floor().long()
    short = n - int(counts.sum())
    if short:
        counts[torch.argsort(exact - counts, descending=True)[:short]] += 1
    labels = torch.repeat_interleave(torch.arange(len(p)), counts)
    return labels[torch.randperm(n, generator=generator)]


@torch.no_grad()
def labelled_samples(model: GenerativeModel, labels: Tensor, batch_size: int) -> Tensor:
    """Samples asked for the given classes, in data space (on the CPU; drawn on the model's device)."""
    return torch.cat([model.sample(len(chunk), chunk.to(model.device)).detach().cpu()
                      for chunk in labels.split(batch_size)])


def conditional_metrics(model: GenerativeModel, kind: str, train_labels: Tensor, test: Tuple[Tensor, Tensor],
                        classifier, fcfg, ecfg) -> Tuple[Dict[str, float], Tensor, Tensor]:
    """On images: cas, and cond_acc where the featnet classifier exists, from N labelled samples (N and the
    label counts those of the training set). Returns (metrics, samples, labels). Vectors and sequences have
    no classifier architecture here, so no cond_acc or cas. (gen_class_acc comes with the test likelihoods,
    `scoring.held_out_log_likelihoods`.)"""
    metrics = {}
    torch.manual_seed(ecfg.seed)
    labels = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(ecfg.seed))]
    samples = labelled_samples(model, labels, ecfg.batch_size)
    if classifier is not None:
        device = module_device(classifier) if isinstance(classifier, torch.nn.Module) else None  # or any callable
        metrics["cond_acc"] = accuracy(classifier, samples, labels, ecfg.batch_size, device)
    if kind == "image":
        metrics["cas"] = classification_accuracy_score(samples, labels, test, model.num_classes, fcfg, ecfg.seed,
                                                       ecfg.batch_size)
    return metrics, samples, labels


def semi_supervised_baselines(train: Tuple[Tensor, Tensor], labelled: Tensor, test: Tuple[Tensor, Tensor], kind: str,
                              num_classes: int, fcfg, ecfg) -> Dict[str, float]:
    """The supervised-only baselines of a semi-supervised split (`data.labels_per_class`), trained on its
    labelled examples alone: logistic regression on the raw values (`semi_logreg_acc`) and, on images, the
    featnet architecture (`semi_featnet_acc`) given as many optimiser steps as the featnet stage takes on the
    whole training set (a pass over 100 examples is one step)."""
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = train, test
    xl, yl = xtr[labelled], ytr[labelled]
    logreg = LogisticRegression(max_iter=5000).fit(xl.flatten(1).double().numpy(), yl.numpy())
    out = {"semi_logreg_acc": float(np.mean(logreg.predict(xte.flatten(1).double().numpy()) == yte.numpy()))}
    if kind == "image":
        steps = fcfg.max_epochs * math.ceil(len(xtr) / fcfg.batch_size)
        epochs = math.ceil(steps / math.ceil(len(xl) / fcfg.batch_size))
        budget = SimpleNamespace(feature_dim=fcfg.feature_dim, lr=fcfg.lr, batch_size=fcfg.batch_size, max_epochs=epochs)
        net = train_classifier(xl, yl, num_classes, budget, ecfg.seed)
        out["semi_featnet_acc"] = accuracy(net, xte, yte, ecfg.batch_size)
    return out


def real_data_baselines(train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], kind: str, num_classes: int,
                        fcfg, ecfg) -> Dict[str, float]:
    """The discriminative baselines of the real-data row: logistic regression on the raw values (pixels),
    and on images the CAS classifier trained on the real training set (the CAS of a perfect generator)."""
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = train, test
    logreg = LogisticRegression(max_iter=5000).fit(xtr.flatten(1).double().numpy(), ytr.numpy())
    out = {"logreg_acc": float(np.mean(logreg.predict(xte.flatten(1).double().numpy()) == yte.numpy()))}
    if kind == "image":
        out["cas"] = classification_accuracy_score(xtr, ytr, test, num_classes, fcfg, ecfg.seed, ecfg.batch_size)
    return out

