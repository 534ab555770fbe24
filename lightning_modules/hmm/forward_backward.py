"""Batched forward-backward and Viterbi for HMMs over padded sequences, in log space.

Shapes: `log_emit` (B, T, N) holds log p(x_t | z_t = n); `mask` (B, T) is True on real steps, which
form a prefix of each row (padding at the end); `start` (N,) and `trans` (N, N) are probabilities.
There is no Python loop over sequences, only over time steps.

Log-space recursions (Rabiner 1989, eqs. 19-25, with alpha/beta kept as logs): each step is a log-sum-exp
over the source states for every destination state,

    log alpha_t+1(j) = logsumexp_i(log alpha_t(i) + log A_ij) + log b_j(x_t+1),

each destination shifted by its own maximum over the sources that reach it, so zero transitions
(log A_ij = -inf) are exact and an unreachable destination gets -inf, never NaN. One shift shared by all
destinations, m = max_i log alpha_t(i), is not enough: where the best source cannot reach j (a sparse,
e.g. left-to-right, chain) and those that can sit more than ~745 nats below it, exp(log alpha - m) A
underflows to 0 and log p(x) comes out thousands of nats wrong, with -inf betas and NaN posteriors.

Speed: with one transition matrix (N, N) (the P(X) model) a step is first one matmul with the shared
shift, exp(a - m) @ A, whose result is accurate to rounding wherever it is >= 1e-250 (every term it drops
or rounds is below 1e-304); only the rows with a smaller, reachable destination are redone as the
per-destination log-sum-exp (`_log_matmul_exp`). Per-sequence or per-chain transitions, and any device
but the CPU (no host sync per step), take the log-sum-exp directly. float64 exp of an argument below
about -708 (subnormal or 0 results, and -inf) runs on a slow path, tens to hundreds of times slower: exps
are taken at max(x, -700) (`_exp_`), which changes nothing above rounding.

The expected transition counts xi_t(i, j) = alpha_t(i) A_ij b_j(x_t+1) beta_t+1(j) / p(x) (Rabiner
eq. 37) come from log-space factors: log alpha_t(i) - log p(x) and log b_j(x_t+1) + log beta_t+1(j),
each step shifted by its maxima, summed as one matmul over the steps whose shifts keep every term above
1e-276 exact (`_Limits.xi_safe_log_scale`); the other steps (factors peaking on states no transition joins)
are formed whole in log space, log alpha + log A + log b + log beta - log p(x), and exponentiated
term by term.

At a padded step the forward message is carried unchanged and the backward message is log 1 = 0, so
padding changes nothing.

Batched chains (the class-conditional HMM, one HMM per class): `trans` may be (B, N, N), each sequence
in its own chain (with `start` (B, N); `forward_backward` then counts transitions per sequence), and
`forward` / `backward` / `loglik` / `state_posteriors` also take K independent chains side by side,
`log_emit` (B, T, K, N) with `start` (K, N) and `trans` (K, N, N): each chain's recursion is its own
log-sum-exp, so each gets its exact log p(x | chain k) however unlikely it is next to the others.

A sequence that is impossible under the model (log p(x) = -inf) gets NaN posteriors (0 / 0); the
class-conditional E-step, which can meet one, drops it by its weight 0.

Threads: the loops over time steps run a few thousand small ops per batch (a (B, N) message, a (B, N) x (N, N)
matmul); on the CPU they run on one thread (`few_threads`) unless a step's matmul is large, and so does the
HMM's whole E-step (`HMM.e_step`). Splitting each small op over OpenMP's threads gains little on an idle
machine, and on a loaded one every op waits at the barrier for a descheduled worker: `text` (128 sequences a
batch, 194 states, float32, 2 cores under a load of about 6) took 5.5 s for 8 batches of forward-backward on 2
threads and 1.0 s on one; the emission counts' index_add_ of one batch 89 ms against 0.7 ms.

float32 (`hmm.precision`): the same recursions in the inputs' dtype, with the floors scaled to float32's
range (`_LIMITS`): exps at max(x, -64) (exp(-64) ~ 1.6e-28, a normal float32, so no subnormal slow path),
matmul results trusted from 1e-12 (what the shift may drop is below N * 1.6e-28) and xi by matmul where
the shifted factors stay below exp(24). Every result is then float32's rounding (log p(x) within ~1e-6
relative of float64's) except terms more than 64 nats below their step's largest, which count as 0.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor


class Posteriors(NamedTuple):
    loglik: Tensor  # (B,) log p(x_1..T_b) per sequence
    gamma: Tensor  # (B, T, N) p(z_t = n | x), zero on padding
    # (N, N) sum over sequences and steps of p(z_t = i, z_{t+1} = j | x); per sequence (B, N, N) when
    # `trans` is (B, N, N)
    trans_counts: Tensor


class _Limits(NamedTuple):
    exp_floor: float  # exps are taken at max(x, exp_floor): exp(exp_floor) is still a normal float
    exp_floor_value: float
    # A matmul result with the shared shift is trusted where >= this: what it may have dropped or rounded is
    # below N * exp(exp_floor), far under its rounding
    matmul_trusted: float
    # xi by matmul at the steps where max log alpha - log p(x) + max (log b + log beta) <= this: every term
    # >= exp(xi_safe_log_scale + exp_floor) then has both factors >= exp(exp_floor), exact to rounding
    xi_safe_log_scale: float


# float64: exp(-700) ~ 1e-304 (exp's fast path), terms >= ~1e-276 of xi exact; float32: exp(-64) ~ 1.6e-28
# (float32's smallest normal is ~1.2e-38), terms >= exp(24 - 64) ~ 4e-18 of xi exact
_LIMITS = {torch.float64: _Limits(-700.0, math.exp(-700.0), 1e-250, 64.0),
           torch.float32: _Limits(-64.0, math.exp(-64.0), 1e-12, 24.0)}


def _limits(x: Tensor) -> _Limits:
    try:
        return _LIMITS[x.dtype]
    except KeyError:
        raise TypeError(f"forward-backward runs in float64 or float32, not {x.dtype}") from None

# elements of one (sequences, N, N) chunk of xi formed whole in log space (float64: 32 MiB)
_XI_CHUNK_ELEMENTS = 1 << 22
# the time-step loops run on one CPU thread while a step's matmul (B x N x N multiply-adds, all chains) is at
# most this (`few_threads`)
_ONE_THREAD_STEP_WORK = 1 << 26


@contextlib.contextmanager
def few_threads(step_work: int, device: torch.device):
    """One intra-op thread on the CPU while `step_work` (B x N x N: a time step's matmul of B sequences through N
    states, all chains) is small (see the module's "Threads"); the thread count is restored after."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before == 1 or step_work > _ONE_THREAD_STEP_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _few_threads(log_emit: Tensor):
    """`few_threads` for the recursions over `log_emit` (B, T, [K,] N)."""
    return few_threads(log_emit[:, 0].numel() * log_emit.shape[-1], log_emit.device)


def _per_sequence(m: Tensor, a: Tensor) -> Tensor:
    """A per-sequence tensor m (B,) or (B, T) shaped to broadcast against a (B, [T,] ..., N)."""
    return m.view(*m.shape, *[1] * (a.dim() - m.dim()))


def _first_emission(log_emit: Tensor, mask: Tensor) -> Tensor:
    """log p(x_1 | z_1), or 0 for an empty sequence."""
    first = log_emit[:, 0]
    return torch.where(_per_sequence(mask[:, 0], first), first, torch.zeros_like(first))


def _finite_max(x: Tensor, dim: int = -1) -> Tensor:
    """max along dim (keepdim), made finite where everything is -inf (so x - max is -inf there, not NaN)."""
    return x.amax(dim, keepdim=True).clamp_min_(torch.finfo(x.dtype).min)


def _exp_(x: Tensor) -> Tensor:
    """exp(x) in place, exactly 0 where x <= -700 (x = -inf: a zero transition, an unreachable state,
    padding) and within exp(-700) ~ 1e-304 of exp(x) elsewhere, always on exp's fast path (float32: -64
    and exp(-64) ~ 1.6e-28)."""
    lim = _limits(x)
    return x.clamp_min_(lim.exp_floor).exp_().sub_(lim.exp_floor_value)


def _logsumexp_(s: Tensor, dim: int) -> Tensor:
    """log(sum(exp(s))) along dim, consuming s (a fresh temporary): shifted by its max along dim (every term
    in [0, 1], the largest 1), -inf where every term is -inf; terms more than 700 nats below the max count
    as exp(-700), a relative change of at most N * 1e-304, below rounding (float32: 64 nats, N * 1.6e-28)."""
    m = s.amax(dim, keepdim=True)
    total = s.sub_(m.clamp_min(torch.finfo(s.dtype).min)).clamp_min_(_limits(s).exp_floor).exp_().sum(dim)
    return total.log_().add_(m.squeeze(dim))


def _log_matmul_exp(x: Tensor, trans: Tensor, log_trans: Tensor) -> Tensor:
    """log(exp(x) @ A)_j = logsumexp_i(x_i + log A_ij) for log-vectors x (..., N) and A = `trans` (N, N)
    (log_trans = log A), or a stack of matrices (..., N, N) broadcasting against x's leading dims."""
    if trans.dim() != 2 or x.device.type != "cpu":
        return _logsumexp_(x[..., :, None] + log_trans, -2)
    m = _finite_max(x)
    s = _exp_(x - m) @ trans
    out = s.log().add_(m)
    suspect = s < _limits(s).matmul_trusted
    if bool(suspect.any()):
        # 0 is exact where no source with alpha > 0 reaches j; elsewhere a small result may have lost its
        # terms to the shared shift: those rows get the per-destination log-sum-exp
        reach = torch.isfinite(x).to(trans.dtype) @ (trans > 0).to(trans.dtype)
        rows = (suspect & (reach > 0)).any(-1)
        if bool(rows.any()):
            out[rows] = _logsumexp_(x[rows][..., :, None] + log_trans, -2)
    return out


def forward(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log alpha_t(n) = log p(x_1..t, z_t = n), shape of log_emit (B, T, [K,] N); carried unchanged
    over padding."""
    log_trans = trans.log()
    log_alpha = torch.empty_like(log_emit)
    a = start.log() + _first_emission(log_emit, mask)
    log_alpha[:, 0] = a
    with _few_threads(log_emit):
        for t in range(1, log_emit.shape[1]):
            a = torch.where(_per_sequence(mask[:, t], a), _log_matmul_exp(a, trans, log_trans) + log_emit[:, t], a)
            log_alpha[:, t] = a
    return log_alpha


def loglik(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log p(x) per sequence (B,) (per sequence and chain (B, K) for K chains): the forward pass only."""
    return torch.logsumexp(forward(start, trans, log_emit, mask)[:, -1], -1)


def backward(trans: Tensor, log_emit: Tensor, mask: Tensor) -> Tensor:
    """log beta_t(n) = log p(x_t+1..T | z_t = n), shape of log_emit; 0 at and after the last real step."""
    trans_t = trans.mT  # beta_t(i) = sum_j A_ij b_j(x_t+1) beta_t+1(j): a forward step through A^T
    log_trans_t = trans_t.log()
    log_beta = torch.zeros_like(log_emit)
    b = torch.zeros_like(log_emit[:, 0])
    with _few_threads(log_emit):
        for t in range(log_emit.shape[1] - 2, -1, -1):
            b = torch.where(_per_sequence(mask[:, t + 1], b),
                            _log_matmul_exp(log_emit[:, t + 1] + b, trans_t, log_trans_t), torch.zeros_like(b))
            log_beta[:, t] = b
    return log_beta


def state_posteriors(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor):
    """(log alpha, log beta, log p(x) (B,) or (B, K), gamma_t(n) = p(z_t = n | x) zero on padding)."""
    log_alpha = forward(start, trans, log_emit, mask)
    log_beta = backward(trans, log_emit, mask)
    ll = torch.logsumexp(log_alpha[:, -1], -1)
    gamma = _exp_(log_alpha + log_beta - ll.unsqueeze(1).unsqueeze(-1)) * _per_sequence(mask, log_alpha)
    return log_alpha, log_beta, ll, gamma


def forward_backward(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor) -> Posteriors:
    log_alpha, log_beta, ll, gamma = state_posteriors(start, trans, log_emit, mask)
    return Posteriors(ll, gamma, transition_counts(trans, log_alpha, log_emit + log_beta, mask, ll))


def transition_counts(trans: Tensor, log_alpha: Tensor, log_evidence: Tensor, mask: Tensor, ll: Tensor) -> Tensor:
    """xi_t(i, j) = exp(log alpha_t(i) + log A_ij + log b_j(x_t+1) + log beta_t+1(j) - log p(x)) summed over
    the real steps t -> t+1 (and over sequences when `trans` is (N, N)): (N, N), or (B, N, N) per sequence
    when `trans` is (B, N, N). `log_evidence` = log b + log beta (B, T, N)."""
    u = log_alpha[:, :-1] - ll[:, None, None]  # (B, T-1, N): log alpha_t(i) - log p(x)
    # log b_j(x_t+1) + log beta_t+1(j), -inf where step t+1 is padding (its terms are exactly 0)
    v = log_evidence[:, 1:].masked_fill(~mask[:, 1:, None], -torch.inf)
    mv = _finite_max(v)
    # xi_t(i, j) = U_ti V_tj A_ij with U = exp(u + mv) and V = exp(v - mv) <= 1. Where max U <= exp(64),
    # any term xi >= exp(64 - 700) has U_i >= xi and V_j >= xi exp(-64), both >= exp(-700): a matmul
    # of the two is exact to rounding (float32: exp(24) and exp(-64))
    log_u = u + mv
    safe = log_u.amax(-1, keepdim=True) <= _limits(u).xi_safe_log_scale  # (B, T-1, 1); False for NaN
    big_u = _exp_(log_u.masked_fill_(~safe, -torch.inf))
    big_v = _exp_(v - mv)
    if trans.dim() == 2:  # one chain: summed over sequences and steps
        counts = trans * (big_u.flatten(0, 1).mT @ big_v.flatten(0, 1))
    else:
        counts = trans * (big_u.mT @ big_v)
    unsafe = ~safe.squeeze(-1) & mask[:, 1:]
    if bool(unsafe.any()):
        counts = _add_log_space_counts(counts, trans, u, v, unsafe)
    return counts


def _add_log_space_counts(counts: Tensor, trans: Tensor, u: Tensor, v: Tensor, steps: Tensor) -> Tensor:
    """counts plus xi_t(i, j) = exp(u_ti + log A_ij + v_tj) at the steps `steps` (B, T-1) bool, each term
    formed whole in log space (exact however far apart u and v peak), in chunks of steps."""
    b_idx, t_idx = steps.nonzero(as_tuple=True)
    log_trans = trans.log()
    n = trans.shape[-1]
    chunk = max(1, _XI_CHUNK_ELEMENTS // (n * n))
    for s in range(0, len(b_idx), chunk):
        b, t = b_idx[s:s + chunk], t_idx[s:s + chunk]
        lt = log_trans if trans.dim() == 2 else log_trans[b]
        xi = _exp_((u[b, t, :, None] + v[b, t, None, :]).add_(lt))  # (n steps, N, N)
        counts = counts + xi.sum(0) if trans.dim() == 2 else counts.index_add(0, b, xi)
    return counts


def viterbi(start: Tensor, trans: Tensor, log_emit: Tensor, mask: Tensor):
    """Most probable state path (B, T) (-1 on padding) and its joint log-probability (B,) (Rabiner eq.
    30-35); max-product needs no shift, so zero transitions (log 0 = -inf) are exact. For a sequence the
    model cannot produce the score is -inf and the path arbitrary."""
    B, T, N = log_emit.shape
    log_trans = trans.log()
    stay = torch.arange(N, device=log_emit.device).expand(B, N)
    pointers = torch.empty(B, T, N, dtype=torch.long, device=log_emit.device)
    d = start.log() + _first_emission(log_emit, mask)
    with _few_threads(log_emit):
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
