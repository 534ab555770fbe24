"""Batched forward-backward and Viterbi for HMMs over padded sequences, in log space.

Shapes: `log_emit` (B, T, N) holds log p(x_t | z_t = n); `mask` (B, T) is True on real steps, which
form a prefix of each row (padding at the end); `start` (N,) and `trans` (N, N) are probabilities.
There is no Python loop over sequences, only over time steps.

Log-space recursions (Rabiner 1989, eqs. 19-25, with alpha/beta kept as logs) use the "log-matmul-exp"
form of the log-sum-exp over previous states:

    logsumexp_i(a_i + log A_ij) = m + log(sum_i exp(a_i - m) A_ij),   m = max_i a_i,

so each step is one (B, N) @ (N, N) matmul and never under- or overflows. At a padded step the
forward message is carried unchanged and the backward message is log 1 = 0, so padding changes nothing.

Batched chains (the class-conditional HMM, one HMM per class): `trans` may be (B, N, N), each sequence
in its own chain (with `start` (B, N); `forward_backward` then counts transitions per sequence), and
`forward` / `backward` / `loglik` / `state_posteriors` also take K independent chains side by side,
`log_emit` (B, T, K, N) with `start` (K, N) and `trans` (K, N, N): each chain is shifted by its own max,
so each gets its exact log p(x | chain k) however unlikely it is next to the others.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Posteriors(NamedTuple):
    loglik: Tensor  # (B,) log p(x_1..T_b) per sequence
    gamma: Tensor  # (B, T, N) p(z_t = n | x), zero on padding
    # (N, N) sum over sequences and steps of p(z_t = i, z_{t+1} = j | x); per sequence (B, N, N) when
    # `trans` is (B, N, N)
    trans_counts: Tensor


def _max_shift(a: Tensor) -> Tensor:
    """max over the last dim (keepdim), made finite where everything is -inf (avoids -inf - -inf = nan)."""
    return a.amax(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).min)


def _per_sequence(m: Tensor, a: Tensor) -> Tensor:
    """A per-sequence tensor m (B,) or (B, T) shaped to broadcast against a (B, [T,] ..., N)."""
    return m.view(*m.shape, *[1] * (a.dim() - m.dim()))


def _first_emission(log_emit: Tensor, mask: Tensor) -> Tensor:
    """log p(x_1 | z_1), or 0 for an empty sequence."""
    first = log_emit[:, 0]
    return torch.where(_per_sequence(mask[:, 0], first), first, torch.zeros_like(first))


def _log_matmul(a: Tensor, p: Tensor) -> Tensor:
    """log(exp(a) @ p) for log-vectors a (..., N) and a probability matrix p (N, N), or a batch of them
    (..., N, N) broadcasting against a's leading dims."""
    m = _max_shift(a)
    e = (a - m).exp()
    return m + torch.log(e @ p if p.dim() == 2 else torch.einsum("...i,...ij->...j", e, p))


def forward(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log alpha_t(n) = log p(x_1..t, z_t = n), shape of log_emit (B, T, [K,] N); carried unchanged
    over padding."""
    log_alpha = torch.empty_like(log_emit)
    a = start.log() + _first_emission(log_emit, mask)
    log_alpha[:, 0] = a
    for t in range(1, log_emit.shape[1]):
        a = torch.where(_per_sequence(mask[:, t], a), _log_matmul(a, trans) + log_emit[:, t], a)
        log_alpha[:, t] = a
    return log_alpha


def loglik(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log p(x) per sequence (B,) (per sequence and chain (B, K) for K chains): the forward pass only."""
    return torch.logsumexp(forward(start, trans, log_emit, mask)[:, -1], -1)


def backward(trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log beta_t(n) = log p(x_t+1..T | z_t = n), shape of log_emit; 0 at and after the last real step."""
    log_beta = torch.zeros_like(log_emit)
    b = torch.zeros_like(log_emit[:, 0])
    for t in range(log_emit.shape[1] - 2, -1, -1):
        b = torch.where(_per_sequence(mask[:, t + 1], b), _log_matmul(log_emit[:, t + 1] + b, trans.mT),
                        torch.zeros_like(b))
        log_beta[:, t] = b
    return log_beta


def state_posteriors(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor):
    """(log alpha, log beta, log p(x) (B,) or (B, K), gamma_t(n) = p(z_t = n | x) zero on padding)."""
    log_alpha = forward(start, trans, log_emit, mask)
    log_beta = backward(trans, log_emit, mask)
    ll = torch.logsumexp(log_alpha[:, -1], -1)
    gamma = (log_alpha + log_beta - ll.unsqueeze(1).unsqueeze(-1)).exp() * _per_sequence(mask, log_alpha)
    return log_alpha, log_beta, ll, gamma


def forward_backward(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Posteriors:
    log_alpha, log_beta, ll, gamma = state_posteriors(start, trans, log_emit, mask)

    # xi_t(i, j) = alpha_t(i) A_ij b_j(x_t+1) beta_t+1(j) / p(x)  (Rabiner eq. 37), summed over b and t.
    # Each factor is shifted by its max so it lies in [0, 1]; the shifts go into one per-step weight w.
    u = log_alpha[:, :-1]
    v = log_emit[:, 1:] + log_beta[:, 1:]
    mu, mv = _max_shift(u), _max_shift(v)
    log_w = (mu + mv).squeeze(-1) - ll[:, None]
    # w overflows where alpha's and beta's maxima sit on states no transition joins (a sequence far from
    # a sparse, e.g. left-to-right, chain): those sequences are counted in log space instead
    overflow = ((log_w > _LOG_W_MAX) & mask[:, 1:]).any(1)
    if bool(overflow.any()):
        log_w = log_w.masked_fill(overflow[:, None], -torch.inf)
    w = log_w.exp() * mask[:, 1:]
    u = (u - mu).exp() * w[..., None]
    v = (v - mv).exp()
    if trans.dim() == 2:  # one chain: summed over sequences and steps
        u, v = u.reshape(-1, u.shape[-1]), v.reshape(-1, v.shape[-1])
    trans_counts = trans * (u.mT @ v)  # (N, N), or per sequence (B, N, N)
    if bool(overflow.any()):
        trans_counts = _add_log_space_counts(trans_counts, overflow, log_alpha, log_emit + log_beta, trans, mask, ll)
    return Posteriors(ll, gamma, trans_counts)


_LOG_W_MAX = 600.0  # exp(600) ~ 1e260: far from float64 overflow even after the [0, 1] factors


def _add_log_space_counts(trans_counts: Tensor, rows: Tensor, log_alpha: Tensor, log_ev: Tensor, trans: Tensor,
                          mask: Tensor, ll: Tensor) -> Tensor:
    """trans_counts plus the transition counts of the sequences `rows` (B,) bool, xi_t(i, j) summed over t
    and computed whole in log space, log alpha_t(i) + log A_ij + log b_j(x_t+1) + log beta_t+1(j) - log p(x),
    one (n, N, N) step at a time (exact however far apart the factors are)."""
    idx = rows.nonzero().squeeze(1)
    log_trans = (trans[idx] if trans.dim() == 3 else trans).log()
    counts = torch.zeros(len(idx), *trans.shape[-2:], dtype=trans_counts.dtype, device=trans_counts.device)
    for t in range(log_alpha.shape[1] - 1):
        xi = log_alpha[idx, t, :, None] + log_trans + log_ev[idx, t + 1, None, :] - ll[idx, None, None]
        counts = counts + xi.exp() * mask[idx, t + 1, None, None]
    if trans.dim() == 2:
        return trans_counts + counts.sum(0)
    return trans_counts.index_add(0, idx, counts)


def viterbi(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor):
    """Most probable state path (B, T) (-1 on padding) and its joint log-probability (B,) (Rabiner eq. 30-35)."""
    B, T, N = log_emit.shape
    log_trans = trans.log()
    stay = torch.arange(N, device=log_emit.device).expand(B, N)
    pointers = torch.empty(B, T, N, dtype=torch.long, device=log_emit.device)
    d = start.log() + _first_emission(log_emit, mask)
    for t in range(1, T):
        best, arg = (d[:, :, None] + log_trans).max(1)
        d = torch.where(mask[:, t, None], best + log_emit[:, t], d)
        pointers[:, t] = torch.where(mask[:, t, None], arg, stay)  # padding: follow the state unchanged
    score, state = d.max(-1)
    path = torch.empty(B, T, dtype=torch.long, device=log_emit.device)
    path[:, -1] = state
    for t in range(T - 1, 0, -1):
        state = pointers[:, t].gather(1, state[:, None]).squeeze(1)
        path[:, t - 1] = state
    return torch.where(mask, path, torch.full_like(path, -1)), score
