"""The semi-supervised objective of M2 (Kingma, Rezende, Mohamed & Welling 2014, "Semi-supervised learning
with deep generative models"), for a conditional VAE p(x | y, z) p(y) p(z) with q(z | x, y) and a
classifier q(y | x). As bounds to maximise (the paper's L and U are their negatives):

- labelled:   L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]   (eq. 6)
- unlabelled: U(x) = sum_y q(y | x) L(x, y) + H(q(y | x)) <= log p(x)                       (eq. 7)
- together:   J^alpha = sum_labelled L(x, y) + sum_unlabelled U(x) + alpha E_labelled[log q(y | x)]  (eq. 8-9)

The model maximises J^alpha / N per batch, so its `alpha` is the paper's alpha / N (their 0.1 N is 0.1).
U(x) <= log p(x) holds for any distribution over y, so restricting q(y | x) to the classes it finds most
likely, renormalised over them (`top_classes`, the model's `semi_classes`), keeps a valid bound and spends
the decoder passes on the classes that carry q's mass.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def top_classes(logits: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """The m classes of highest q(y | x) per example, (B, m), and log q(y | x) renormalised over them."""
    if m >= logits.shape[1]:
        classes = torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
        return classes, torch.log_softmax(logits, 1)
    kept, classes = logits.topk(m, 1)
    return classes, torch.log_softmax(kept, 1)


def sum_over_classes(log_q: Tensor, bounds: Tensor) -> Tensor:
    """U(x) = sum_y q(y | x) (L(x, y) - log q(y | x)) (eq. 7), from log q (B, m) and L(x, y) (B, m)."""
    return (log_q.exp() * (bounds - log_q)).sum(1)
