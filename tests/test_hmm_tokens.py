"""The HMM on token data: the bigram start against direct add-k bigram counts and the project's n-gram baseline
(`pipeline.evaluation.token_baselines`), the MAP (Dirichlet-prior) start and transition update against hmmlearn's
priors, the float32 E-step against float64, the token epoch cap inside Lightning, and the `text` defaults
beating the smoothed bigram. Brute-force checks of float32 forward-backward are in tests/test_hmm_properties.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hmmlearn import hmm as hmmlearn

from lightning_modules.common.em import fit_em
from lightning_modules.contract import ConfigError
from lightning_modules.hmm import HMM
from lightning_modules.hmm import model as hmm_model
from pipeline.evaluation.token_baselines import ngram_baseline

VOCAB, STEPS = 6, 9

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def token_info(num_classes=None) -> dict:
    return {"shape": (STEPS,), "kind": "sequence", "vocab_size": VOCAB, "num_classes": num_classes}


def random_tokens(n: int, seed: int, tokens=range(VOCAB)) -> torch.Tensor:
    """(n, STEPS) int64 sequences of `tokens` drawn from a seeded random bigram, lengths 1..STEPS, -1 padding."""
    rng = np.random.default_rng(seed)
    tokens = np.array(list(tokens))
    trans = rng.dirichlet(np.full(len(tokens), 0.5), len(tokens))
    x = np.full((n, STEPS), -1)
    for i, length in enumerate(rng.integers(1, STEPS + 1, n)):
        state = rng.integers(len(tokens))
        for t in range(length):
            x[i, t] = tokens[state]
            state = rng.choice(len(tokens), p=trans[state])
    return torch.from_numpy(x)


def add_k_bigram_loglik(train: torch.Tensor, x: torch.Tensor, k: float, start_k: float = None) -> np.ndarray:
    """log p(x) per sequence under the add-k bigram of `train`'s counts, counted here in numpy: the first token
    from the first tokens' counts (add start_k, default k), each next one from the pair counts."""
    start_k = k if start_k is None else start_k
    first, pairs = np.zeros(VOCAB), np.zeros((VOCAB, VOCAB))
    for row in train.numpy():
        row = row[row >= 0]
        first[row[0]] += 1
        for a, b in zip(row, row[1:]):
            pairs[a, b] += 1
    log_start = np.log((first + start_k) / (first.sum() + start_k * VOCAB))
    log_trans = np.log((pairs + k) / (pairs.sum(1, keepdims=True) + k * VOCAB))
    out = []
    for row in x.numpy():
        row = row[row >= 0]
        out.append(log_start[row[0]] + sum(log_trans[a, b] for a, b in zip(row, row[1:])))
    return np.array(out)


# --- the bigram start -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.3, 0.01])
def test_bigram_start_with_one_state_per_token_is_the_add_k_bigram(k):
    """One state per token, no emission pseudocount: every state emits only its token and the HMM is the add-k
    bigram (k = transition_pseudocount), held-out tokens unseen in training (token 5) included."""
    train, held = random_tokens(60, 0, tokens=range(5)), random_tokens(25, 1)
    model = HMM({"states_per_token": 1, "pseudocount": 0.0, "transition_pseudocount": k}, token_info())
    assert model.init_kind == "bigram" and model.n_states == VOCAB and model.estep_dtype == torch.float32
    model.initialize(train)
    np.testing.assert_array_equal(model.emission.probs.numpy(), np.eye(VOCAB))
    np.testing.assert_allclose(model.log_prob(held).numpy(), add_k_bigram_loglik(train, held, k), rtol=1e-12)


def test_bigram_start_is_the_projects_bigram_baseline():
    """At the k the project's bigram baseline picks on its validation split, the one-state-per-token start's
    test NLL per sequence is the baseline's."""
    train, val, test = random_tokens(60, 0), random_tokens(20, 1), random_tokens(25, 2)
    baseline = ngram_baseline(train, val, test, VOCAB, order=2)
    model = HMM({"states_per_token": 1, "pseudocount": 0.0, "transition_pseudocount": baseline["smoothing_k"]},
                token_info())
    model.initialize(train)
    np.testing.assert_allclose(-model.log_prob(test).mean().item(), baseline["nll"], rtol=1e-12)


def test_bigram_start_with_two_states_per_token_unjittered_is_a_bigram(monkeypatch):
    """S = 2 copies of each token with the jitter off: copy s of token v is state s * V + v, emits only v, and
    the HMM is again a bigram, the add-(S^2 k) one for transitions (each pair's count split over S^2 state pairs,
    k on each) and the add-(S k) one for the first token."""
    monkeypatch.setattr(hmm_model, "BIGRAM_JITTER", 0.0)
    train, held = random_tokens(60, 2), random_tokens(25, 3)
    k = 0.05
    model = HMM({"states_per_token": 2, "pseudocount": 0.0, "transition_pseudocount": k}, token_info())
    model.initialize(train)
    assert model.n_states == 2 * VOCAB
    np.testing.assert_array_equal(model.emission.probs.numpy(), np.tile(np.eye(VOCAB), (2, 1)))
    np.testing.assert_allclose(model.log_prob(held).numpy(), add_k_bigram_loglik(train, held, 4 * k, 2 * k),
                               rtol=1e-12)


def test_bigram_start_jitters_the_copies_apart_seeded():
    """With the jitter (the default) the copies of a token start apart, the same way for the same seed; the
    rows stay distributions and each state's emission peaks on its own token."""
    train = random_tokens(60, 4)

    def started(seed):
        model = HMM({"seed": seed}, token_info())
        model.initialize(train)
        return model

    a, b, c = started(0), started(0), started(1)
    assert torch.equal(a.transmat, b.transmat) and not torch.equal(a.transmat, c.transmat)
    v = VOCAB
    assert (a.transmat[:v] - a.transmat[v:]).abs().max() > 1e-3  # copy 0 and copy 1 of every token differ
    np.testing.assert_allclose(a.transmat.sum(1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(a.startprob.sum().item(), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(a.emission.probs.argmax(1).numpy(), np.arange(2 * v) % v)
    assert (a.emission.probs > 0).all()  # the emission pseudocount: Baum-Welch can move every entry


def test_conditional_bigram_start_is_each_classs_bigram():
    """Conditional with ergodic class HMMs: class c's block starts as the add-k bigram of class c's sequences,
    and log p(x | y) is that bigram's; the blocks never mix."""
    xs = [random_tokens(40, 5), random_tokens(30, 6, tokens=range(2, 6))]
    x, y = torch.cat(xs), torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(30, dtype=torch.long)])
    held = random_tokens(20, 7)
    k = 0.2
    model = HMM({"states_per_token": 1, "pseudocount": 0.0, "transition_pseudocount": k, "conditional": True,
                 "topology": "ergodic"}, token_info(num_classes=2))
    model.set_class_prior(y)
    model.initialize(x, y)
    for c in range(2):
        np.testing.assert_allclose(model.log_prob(held, torch.full((20,), c)).numpy(),
                                   add_k_bigram_loglik(xs[c], held, k), rtol=1e-12)
    off_block = torch.block_diag(*[torch.ones(VOCAB, VOCAB)] * 2) == 0
    assert (model.transmat[off_block] == 0).all()


def test_bigram_start_refuses_float_data_and_left_to_right():
    with pytest.raises(ConfigError, match="init"):
        HMM({"init": "bigram"}, {"shape": (4, 2), "kind": "sequence"})
    with pytest.raises(ConfigError, match="init"):
        HMM({"init": "bigram", "topology": "left_to_right"}, token_info())
    # auto: the bigram only where it fits; a conditional token HMM is left-to-right by default
    assert HMM({}, token_info(num_classes=2)).init_kind == "random"
    assert HMM({}, {"shape": (4, 2), "kind": "sequence"}).init_kind == "random"
    assert HMM({}, {"shape": (4, 2), "kind": "sequence"}).estep_dtype == torch.float64


# --- the MAP M-step: Dirichlet priors on the start and transition rows -----------------------------------
N_STATES, ALPHA, PSEUDOCOUNT = 3, 0.3, 0.5


def reference(seed: int):
    """An hmmlearn CategoricalHMM with random parameters and Dirichlet(1 + ALPHA) priors on the start and
    transition rows (Dirichlet(1 + PSEUDOCOUNT) on the emissions): its M-step adds ALPHA to every count."""
    rng = np.random.default_rng(seed)
    ref = hmmlearn.CategoricalHMM(N_STATES, n_features=VOCAB, init_params="", n_iter=10, tol=-np.inf,
                                  startprob_prior=1 + ALPHA, transmat_prior=1 + ALPHA,
                                  emissionprob_prior=1 + PSEUDOCOUNT)
    ref.startprob_ = rng.dirichlet(np.ones(N_STATES))
    ref.transmat_ = rng.dirichlet(np.ones(N_STATES), N_STATES)
    ref.emissionprob_ = rng.dirichlet(np.ones(VOCAB), N_STATES)
    return ref


def frames(x: torch.Tensor):
    rows = [row[row >= 0].numpy() for row in x]
    return np.concatenate(rows)[:, None], [len(r) for r in rows]


def ours(refs, **cfg) -> HMM:
    refs = refs if isinstance(refs, list) else [refs]
    model = HMM({"n_states": N_STATES, "init": "random", "pseudocount": PSEUDOCOUNT, "transition_pseudocount": ALPHA,
                 "precision": "float64", **cfg}, token_info(len(refs) if len(refs) > 1 else None))
    model.emission.probs.copy_(torch.from_numpy(np.concatenate([r.emissionprob_ for r in refs])))
    model.set_parameters(torch.from_numpy(np.concatenate([r.startprob_ for r in refs])),
                         torch.block_diag(*[torch.from_numpy(r.transmat_) for r in refs]))
    model.initialized.fill_(True)
    return model


def test_map_baum_welch_matches_hmmlearn_with_dirichlet_priors():
    """transition_pseudocount = hmmlearn's startprob_prior - 1 = transmat_prior - 1: the same log-likelihood
    trajectory and the same MAP parameters after 10 steps."""
    ref = reference(0)
    x = random_tokens(30, 8)
    model = ours(ref)
    history = np.array(fit_em(model, x, max_iter=10)) * len(x)
    ref.fit(*frames(x))
    np.testing.assert_allclose(history, ref.monitor_.history, rtol=1e-10)
    np.testing.assert_allclose(model.startprob.numpy(), ref.startprob_, atol=1e-10)
    np.testing.assert_allclose(model.transmat.numpy(), ref.transmat_, atol=1e-10)
    np.testing.assert_allclose(model.emission.probs.numpy(), ref.emissionprob_, atol=1e-10)


def test_conditional_map_baum_welch_is_hmmlearn_per_class():
    """Ergodic class HMMs: the prior goes on every in-block start and transition count only (the blocks stay
    apart), so each block's steps are hmmlearn's MAP fit on its class's sequences."""
    refs = [reference(1), reference(2)]
    xs = [random_tokens(20, 9), random_tokens(15, 10)]
    y = torch.cat([torch.full((len(x),), c) for c, x in enumerate(xs)])
    model = ours(refs, conditional=True, topology="ergodic")
    model.set_class_prior(y)
    history = np.array(fit_em(model, torch.cat(xs), max_iter=10, y=y)) * len(y)
    for ref, x in zip(refs, xs):
        ref.fit(*frames(x))
    np.testing.assert_allclose(history, np.sum([r.monitor_.history for r in refs], 0), rtol=1e-10)
    n = N_STATES
    for c, ref in enumerate(refs):
        block = slice(c * n, (c + 1) * n)
        np.testing.assert_allclose(model.startprob[block].numpy(), ref.startprob_, atol=1e-10)
        np.testing.assert_allclose(model.transmat[block, block].numpy(), ref.transmat_, atol=1e-10)
    assert (model.transmat[torch.block_diag(*[torch.ones(n, n)] * 2) == 0] == 0).all()


def test_transition_pseudocount_keeps_left_to_right_zeros():
    """The prior goes only where the topology allows a transition: a left-to-right HMM keeps its zeros."""
    model = HMM({"n_states": 4, "topology": "left_to_right", "transition_pseudocount": 1.0}, token_info())
    allowed = model.transmat > 0
    fit_em(model, random_tokens(30, 11), max_iter=3)
    assert torch.equal(model.transmat > 0, allowed) and (model.startprob[2:] == 0).all()


# --- float32 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["tokens", "gaussian"])
def test_float32_e_step_is_float64s_to_float32_rounding(data):
    """precision=float32 against float64 from the same start: each step's mean log-likelihood within 1e-6
    relative, the parameters after 5 steps within 1e-4; the statistics stay float64."""
    if data == "tokens":
        x, info, cfg = random_tokens(40, 12), token_info(), {}
    else:
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 6, 2)).cumsum(1))
        info, cfg = {"shape": (6, 2), "kind": "sequence"}, {"n_states": 3}
    runs = {}
    for precision in ("float32", "float64"):
        model = HMM({**cfg, "precision": precision}, info)
        runs[precision] = model, fit_em(model, x, max_iter=5)
    (m32, h32), (m64, h64) = runs["float32"], runs["float64"]
    assert m32.estep_dtype == torch.float32 and m32.e_step(x)["trans"].dtype == torch.float64
    np.testing.assert_allclose(h32, h64, rtol=1e-6)
    np.testing.assert_allclose(m32.transmat.numpy(), m64.transmat.numpy(), atol=1e-4)
    np.testing.assert_allclose(m32.log_prob(x).numpy(), m64.log_prob(x).numpy(), rtol=1e-4)


def test_e_step_runs_on_one_thread_and_restores_the_count():
    """Small time steps: the E-step and log_prob run on one CPU thread (forward_backward.py, "Threads"), and
    the caller's thread count is back after them (also after an error inside)."""
    from lightning_modules.hmm import forward_backward as fb

    model, x = HMM({}, token_info()), random_tokens(10, 13)
    model.initialize(x)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        original = fb.forward_backward
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fb, "forward_backward", lambda *a: seen.append(torch.get_num_threads()) or original(*a))
            model.e_step(x)
        model.log_prob(x)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with fb.few_threads(1, torch.device("cpu")):
                raise RuntimeError
        assert torch.get_num_threads() == 2
        with fb.few_threads(1 << 30, torch.device("cpu")):  # a large step keeps every thread
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- inside Lightning: the token epoch cap --------------------------------------------------------------
def test_token_max_epochs_stops_training(tmp_path):
    """Token data stop after token_max_epochs Baum-Welch steps, before max_epochs."""
    from pipeline.config import DataConfig
    from pipeline.data.datamodule import PreparedDataModule
    from pipeline.data.sources import load_source
    from pipeline.data.store import write_prepared

    text = tmp_path / "small.txt"
    text.write_text("".join(np.random.default_rng(0).choice(list("abcde "), 64 * 40)))
    folder = tmp_path / "prepared"
    write_prepared(load_source(DataConfig(dataset=f"text:{text}")), folder, "text", 0)
    dm = PreparedDataModule(folder, batch_size=200, exact_sharding=True, fixed_train_noise=True)
    model = HMM({"max_epochs": 10, "token_max_epochs": 3, "tol": 0.0}, dm.info.to_dict())
    trainer = pl.Trainer(max_epochs=10, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu", devices=1, use_distributed_sampler=False)
    model.provide_init_data(*dm.split("train"))
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 3 and model.init_kind == "bigram"


# --- the defaults on `text` ------------------------------------------------------------------------------
def test_text_defaults_beat_the_smoothed_bigram_in_a_few_steps():
    """The default token HMM (2 states per character from the bigram, float32) on 1500 `text` training
    sequences: its start is about the test perplexity of the smoothed bigram of the same sequences, and 3
    Baum-Welch steps take it well below (bigram 10.96, start 11.05, 3 steps 9.71; all 5671 training sequences
    and its default 12 steps, `genzoo train`: 7.90 against 10.78)."""
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source

    p = load_source(DataConfig(dataset="text", seed=0))
    xtr, xva, xte = (torch.from_numpy(p.splits[s][0]) for s in ("train", "val", "test"))
    xtr = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:1500]]
    bigram = ngram_baseline(xtr, xva, xte, p.info.vocab_size, order=2)["perplexity"]
    tokens = int((xte >= 0).sum())

    def perplexity(model):
        return math.exp(-model.log_prob(xte).sum().item() / tokens)

    model = HMM({}, p.info.to_dict())
    assert model.init_kind == "bigram" and model.n_states == 2 * p.info.vocab_size
    model.initialize(xtr)
    model.initialized.fill_(True)
    start = perplexity(model)
    assert start < 1.05 * bigram, (start, bigram)
    fit_em(model, xtr, max_iter=3)
    assert perplexity(model) < 0.93 * bigram, (perplexity(model), bigram)


# --- serving ------------------------------------------------------------------------------------------------
def test_the_pyfunc_wrapper_serves_token_sequences_as_integers():
    """MLflow's pyfunc input for a token model is an integer array: it must reach the model as token indices
    (a float32 cast made `genzoo evaluate` on `text` fail to log the input example), and its score is the
    model's own anomaly score, -log p(x), against the add-k bigram counted in numpy."""
    from pipeline.serving import GenzooPyfunc

    train, held = random_tokens(60, 0, tokens=range(5)), random_tokens(4, 1)
    model = HMM({"states_per_token": 1, "pseudocount": 0.0, "transition_pseudocount": 0.3}, token_info())
    model.initialize(train)
    served = GenzooPyfunc(model).predict(held.numpy())
    np.testing.assert_allclose(served, -add_k_bigram_loglik(train, held, 0.3), rtol=1e-10)
