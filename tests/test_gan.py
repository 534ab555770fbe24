"""The GAN family: losses, nets, spectral norm, TTUR/n_critic schedule, EMA of G, checkpoints, DDP, and
that training on 8 Gaussians covers the modes; conditional: the projection discriminator's closed form,
checkpoints, and that samples asked for a component land on it; semi-supervised: the (K+1)-class losses
against their definitions, which objective `auto` picks, `classify`, and few-label training on 8 Gaussians."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.contract import UNLABELLED, DataInfo
from lightning_modules.common.ema import ema_decay_at, ema_update_
from lightning_modules.gan.model import GAN
from lightning_modules.gan.losses import (class_feature_matching, class_responsibilities, feature_matching, gan_loss,
                                          k_plus_one_discriminator, k_plus_one_fake, k_plus_one_real,
                                          supervised_cross_entropy)
from lightning_modules.common.nets import num_stages
from lightning_modules.gan.nets import ProjectionDiscriminator, SpectralNorm, build_pair
from lightning_modules.registry import family_class
from pipeline.data.toy2d import EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD, eight_gaussians

VECTOR = {"shape": [2], "kind": "vector"}
EIGHT = {**VECTOR, "num_classes": 8}  # toy2d:8gaussians, the component as the label
DIGITS = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
TINY = {"width": 8, "latent_dim": 2, "mlp_layers": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_trainer(tmp_path, **kw) -> pl.Trainer:
    kw = {"accelerator": "cpu", "devices": 1, **kw}
    return pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def loader(x: torch.Tensor, batch_size: int, shuffle: bool = False, y: torch.Tensor | None = None) -> DataLoader:
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


# --- losses ---------------------------------------------------------------------------------------
def sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


@pytest.mark.parametrize("name", ["nonsaturating", "hinge"])
def test_losses_equal_their_closed_forms(name):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0.5, 2.0, size=50), rng.normal(-0.5, 2.0, size=70)
    if name == "nonsaturating":  # Goodfellow et al. 2014: log-loss of D; G maximises log D(G(z))
        want_d = -np.mean(np.log(sigmoid(real))) - np.mean(np.log(1.0 - sigmoid(fake)))
        want_g = -np.mean(np.log(sigmoid(fake)))
    else:  # Lim & Ye 2017
        want_d = np.mean(np.maximum(0.0, 1.0 - real)) + np.mean(np.maximum(0.0, 1.0 + fake))
        want_g = -np.mean(fake)
    loss = gan_loss(name)
    r, f = torch.tensor(real), torch.tensor(fake)
    assert loss.discriminator(r, f).item() == pytest.approx(want_d, rel=1e-10)
    assert loss.generator(f).item() == pytest.approx(want_g, rel=1e-10)


def test_losses_at_zero_logits():
    zero = torch.zeros(4)
    assert gan_loss("nonsaturating").discriminator(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert gan_loss("hinge").discriminator(zero, zero).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        gan_loss("wasserstein")


# --- nets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, stages", [((1, 8, 8), 1), ((1, 28, 28), 2), ((3, 32, 32), 3)])
def test_dcgan_pair_shapes(shape, stages):
    c, h, w = shape
    assert num_stages(h, w) == stages  # 8 -> 4; 28 -> 14 -> 7; 32 -> 16 -> 8 -> 4
    g, d = build_pair(DataInfo(shape, "image", levels=256), latent_dim=6, width=4, mlp_layers=1, spectral=True)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in g.modules()) == stages
    x = g(torch.randn(3, 6))
    assert x.shape == (3, *shape)
    assert x.min() >= 0 and x.max() <= 1
    assert d(x).shape == (3,)
    seed_h, seed_w = h // 2**stages, w // 2**stages
    assert d.features(x).shape == (3, 4 * 2**stages * seed_h * seed_w)


@pytest.mark.parametrize("info, bounded", [(DataInfo((2,), "vector"), False),
                                           (DataInfo((8, 8), "sequence", levels=17), True)])
def test_mlp_pair_for_other_continuous_data(info, bounded):
    torch.manual_seed(0)  # the weights: not whatever state earlier tests left the global generator in
    g, d = build_pair(info, latent_dim=3, width=16, mlp_layers=2, spectral=False)
    # a wide latent spread: an unbounded output leaves [0, 1] surely, a sigmoid-bounded one never does (with
    # N(0, 1) codes a small random net's outputs can all land in [0, 1] by chance)
    x = g(100 * torch.randn(200, 3))
    assert x.shape == (200, *info.shape)
    assert d(x).shape == (200,) and d.features(x).shape == (200, 16)
    assert bool(((x >= 0) & (x <= 1)).all()) == bounded
    with pytest.raises(ValueError, match="continuous"):
        build_pair(DataInfo((64,), "sequence", vocab_size=10), 3, 16, 2, False)


def test_spectral_norm_gives_unit_largest_singular_value():
    torch.manual_seed(0)
    info = DataInfo((1, 28, 28), "image", levels=256)
    _, d = build_pair(info, latent_dim=4, width=4, mlp_layers=1, spectral=True)
    x = torch.rand(4, 1, 28, 28)
    for _ in range(100):  # each training forward runs one power iteration; converge it (5 left 6% error)
        d(x)
    d.eval()
    layers = [m for m in d.modules() if isinstance(m, SpectralNorm)]
    assert len(layers) == 4  # 3x3 conv, two strided convs, linear head
    for m in layers:
        assert torch.linalg.svdvals(m.weight.flatten(1))[0].item() == pytest.approx(1.0, abs=1e-2)
        assert torch.linalg.matrix_norm(m.layer.weight.flatten(1), ord=2).item() != pytest.approx(1.0, abs=0.1)
    # the map the head applies (its Jacobian) is itself of spectral norm 1
    jac = torch.autograd.functional.jacobian(d.head, torch.zeros(d.head.layer.in_features))
    assert torch.linalg.matrix_norm(jac.reshape(1, -1), ord=2).item() == pytest.approx(1.0, abs=1e-2)

    _, plain = build_pair(info, latent_dim=4, width=4, mlp_layers=1, spectral=False)
    assert not any(isinstance(m, SpectralNorm) for m in plain.modules())


# --- training schedule ----------------------------------------------------------------------------
class RecordSteps(pl.Callback):
    """Names each optimizer.step as it happens, through torch's own step hooks."""

    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        for name, opt in zip("GD", trainer.optimizers):
            opt.register_step_post_hook(lambda *_, name=name: self.steps.append(name))


@pytest.mark.parametrize("n_critic", [1, 3])
def test_n_critic_discriminator_steps_per_generator_step(tmp_path, n_critic):
    model = GAN({**TINY, "n_critic": n_critic, "ema_decay": 0.0}, VECTOR)
    rec = RecordSteps()
    make_trainer(tmp_path, max_epochs=2, callbacks=[rec]).fit(model, loader(torch.randn(40, 2), 8))  # 2 x 5 batches
    expected = []
    for d_step in range(1, 11):
        expected += ["D"] + (["G"] if d_step % n_critic == 0 else [])
    assert rec.steps == expected
    opt_g, opt_d = model.trainer.optimizers  # Adam's own step counters agree
    assert int(next(iter(opt_d.state.values()))["step"]) == 10
    assert int(next(iter(opt_g.state.values()))["step"]) == 10 // n_critic


def test_ttur_optimisers_have_their_own_rates_and_betas():
    model = GAN({**TINY, "lr_g": 1e-4, "lr_d": 4e-4, "beta1_g": 0.0, "beta2_g": 0.9, "beta1_d": 0.5, "beta2_d": 0.99}, VECTOR)
    opt_g, opt_d = model.configure_optimizers()
    assert (opt_g.defaults["lr"], opt_g.defaults["betas"]) == (1e-4, (0.0, 0.9))
    assert (opt_d.defaults["lr"], opt_d.defaults["betas"]) == (4e-4, (0.5, 0.99))
    assert {id(p) for p in opt_g.param_groups[0]["params"]} == {id(p) for p in model.generator.parameters()}
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {id(p) for p in model.discriminator.parameters()}


def test_ema_decay_warms_up_to_its_setting():
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.9, 10_000) == 0.9


# --- EMA of G -------------------------------------------------------------------------------------
def closed_form_ema(history, decay):
    """decay^T theta_0 + sum_{i=1..T} (1 - decay) decay^(T-i) theta_i, in float64; `decay` may be a list
    (d_1..d_T, one per step): prod_j d_j theta_0 + sum_i (1 - d_i) prod_{j>i} d_j theta_i."""
    T = len(history) - 1
    d = [decay] * T if isinstance(decay, float) else list(decay)
    after = lambda i: math.prod(d[i:])  # noqa: E731  (prod of d_{i+1}..d_T, 0-based list)
    return after(0) * history[0] + sum((1 - d[i - 1]) * after(i) * history[i] for i in range(1, T + 1))


def test_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    current = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = copy.deepcopy(current)
    flat = lambda m: torch.cat([p.detach().double().flatten() for p in m.parameters()])  # noqa: E731
    history = [flat(current)]
    for _ in range(6):
        with torch.no_grad():
            for p in current.parameters():
                p.add_(torch.randn_like(p))
        current(torch.randn(5, 3))  # moves BatchNorm's running statistics
        history.append(flat(current))
        ema_update_(average, current, 0.7)
    torch.testing.assert_close(flat(average), closed_form_ema(history, 0.7), rtol=1e-5, atol=1e-6)
    assert torch.equal(average[1].running_mean, current[1].running_mean)


class RecordGenerator(pl.Callback):
    def __init__(self):
        self.history = []

    def _record(self, pl_module):
        self.history.append(torch.cat([p.detach().double().flatten() for p in pl_module.generator.parameters()]))

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._record(pl_module)


def test_ema_generator_follows_the_closed_form_and_is_sampled(tmp_path):
    model = GAN({**TINY, "ema_decay": 0.9, "lr_g": 1e-2}, VECTOR)
    rec = RecordGenerator()
    make_trainer(tmp_path, max_epochs=1, callbacks=[rec]).fit(model, loader(torch.randn(48, 2), 8))
    assert len(rec.history) == 7  # initial weights + 6 generator steps
    ema = torch.cat([p.double().flatten() for p in model.generator_ema.parameters()])
    # warm-up: step t uses min(0.9, (1 + t) / (10 + t)) = 2/11, 3/12, ..., 7/16
    decays = [(1 + t) / (10 + t) for t in range(1, 7)]
    torch.testing.assert_close(ema, closed_form_ema(rec.history, decays), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema, rec.history[-1])

    torch.manual_seed(5)
    z = torch.randn(10, 2)
    torch.manual_seed(5)
    torch.testing.assert_close(model.sample(10), model.generator_ema(z))


# --- the contract, checkpoints, DDP ---------------------------------------------------------------
def test_contract_attributes_and_config():
    assert family_class("gan") is GAN
    assert GAN.log_prob_kind is None and not GAN.has_log_prob() and GAN.has_encoder()
    assert GAN({}, VECTOR).sample_quality_every_n_epochs() == GAN.Config().fid_every_n_epochs
    cfg = GAN.Config()
    assert isinstance(cfg.max_epochs, int) and cfg.seed == 0
    with pytest.raises(ValueError, match="n_critic"):
        GAN({"n_critic": 0}, VECTOR)
    with pytest.raises(ValueError, match="loss"):
        GAN({"loss": "wasserstein"}, VECTOR)


def test_checkpoint_round_trip_and_image_contract(tmp_path):
    model = GAN({"width": 4, "latent_dim": 3, "loss": "nonsaturating", "conditional": False}, DIGITS)
    trainer = make_trainer(tmp_path, max_epochs=1)
    images = torch.rand(32, 1, 8, 8)
    trainer.fit(model, loader(images, 8), loader(images[:16], 8))
    assert {"train/loss_d", "train/loss_g", "train/loss", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    loaded = GAN.load_from_checkpoint(path, weights_only=True)
    assert loaded.config == model.config and loaded.info == model.info
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert int(loaded.d_steps) == 4

    torch.manual_seed(1)
    s = loaded.sample(20)
    torch.manual_seed(1)
    torch.testing.assert_close(s, model.sample(20))
    assert s.shape == (20, 1, 8, 8) and s.min() >= 0 and s.max() <= 1
    assert loaded.encode(images).shape == (32, 4 * 2 * 4 * 4)
    torch.testing.assert_close(loaded.anomaly_score(images), -loaded.discriminator(images))


def test_ddp_spawn_two_processes(tmp_path):
    model = GAN({**TINY, "n_critic": 2}, VECTOR)
    before = [p.detach().clone() for p in model.generator.parameters()]
    x = torch.randn(32, 2)
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1)
    trainer.fit(model, loader(x, 4), loader(x[:8], 4))
    assert trainer.state.finished
    assert int(model.d_steps) == 4  # each rank sees 16 of the 32 examples: 4 batches of 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


# --- does it learn? -------------------------------------------------------------------------------
# TTUR (D twice as fast) and two D steps per G step; no spectral norm: on 2-D toys it slows D down a lot
TOY_CFG = {"width": 64, "latent_dim": 4, "mlp_layers": 2, "loss": "nonsaturating", "spectral_norm": False,
           "lr_g": 1e-3, "lr_d": 2e-3, "beta2_g": 0.9, "beta2_d": 0.9, "n_critic": 2, "ema_decay": 0.0}


def nearest_centre(s: np.ndarray) -> tuple:
    """(index of the nearest of the 8 centres, distance to it) for each 2-D point."""
    angles = np.arange(8) * 2 * np.pi / 8
    centres = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    dist = np.linalg.norm(s[:, None, :] - centres[None], axis=-1)
    return dist.argmin(axis=1), dist.min(axis=1)


def test_eight_gaussians_modes_are_covered(tmp_path):
    torch.manual_seed(0)
    x, _ = eight_gaussians(4096, np.random.default_rng(0))
    model = GAN(TOY_CFG, VECTOR)
    data = loader(torch.tensor(x, dtype=torch.float32), 512, shuffle=True)
    make_trainer(tmp_path, max_epochs=100).fit(model, data)  # 800 D steps, 400 G steps

    nearest, dist = nearest_centre(model.sample(2000).numpy())
    near = dist < 3 * EIGHT_GAUSSIANS_STD
    modes_hit = np.unique(nearest[near])
    assert len(modes_hit) >= 7, f"modes covered: {modes_hit}"
    assert near.mean() > 0.6, f"only {near.mean():.2f} of samples near a mode"


# --- conditional: P(X, Y) -------------------------------------------------------------------------
def weight_and_bias(layer: nn.Module):
    """The weight a (possibly spectrally normalised) linear layer runs with, and its bias, in float64 numpy."""
    bias = (layer.layer if isinstance(layer, SpectralNorm) else layer).bias
    as_np = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    return as_np(layer.weight), as_np(bias)


@pytest.mark.parametrize("info", [DataInfo((1, 8, 8), "image", levels=17, num_classes=10),
                                  DataInfo((2,), "vector", num_classes=8)])
@pytest.mark.parametrize("spectral", [True, False])
def test_projection_discriminator_equals_its_closed_form(info, spectral):
    """D(x, y) = w . phi(x) + b + v_y . phi(x) (Miyato & Koyama 2018, eq. 3), in float64 numpy."""
    torch.manual_seed(0)
    k = info.num_classes
    g, d = build_pair(info, latent_dim=3, width=8, mlp_layers=2, spectral=spectral, num_classes=k)
    assert isinstance(d, ProjectionDiscriminator)
    d.eval()  # no power iteration between the forwards compared below
    with torch.no_grad():
        for p in d.parameters():  # away from the N(0, 0.02) init, so both terms matter
            p.copy_(torch.randn_like(p))
    y = torch.randint(0, k, (40,))
    x = g(torch.randn(40, 3), y).detach()
    assert x.shape == (40, *info.shape)
    phi = d.features(x).detach().double().numpy()
    w, b = weight_and_bias(d.head)
    v, no_bias = weight_and_bias(d.embed)
    assert no_bias is None and v.shape == (k, phi.shape[1])
    want = phi @ w[0] + b[0] + np.einsum("bf,bf->b", v[y.numpy()], phi)
    np.testing.assert_allclose(d(x, y).detach().double().numpy(), want, rtol=1e-4, atol=1e-4)
    every = (phi @ w[0] + b[0])[:, None] + phi @ v.T  # all classes at once
    np.testing.assert_allclose(d.class_logits(x).detach().double().numpy(), every, rtol=1e-4, atol=1e-4)


def test_conditional_contract():
    model = GAN(TINY, EIGHT)
    assert model.conditional and model.num_classes == 8
    assert not model.can_classify() and not GAN.has_log_prob()
    with pytest.raises(NotImplementedError):
        model.classify(torch.zeros(3, 2))
    with pytest.raises(NotImplementedError):
        model.log_prob(torch.zeros(3, 2))
    assert model.sample(6, torch.tensor([0, 1, 2, 3, 4, 7])).shape == (6, 2)
    assert model.sample(6).shape == (6, 2)  # y ~ p(y)
    with pytest.raises(ValueError, match="labels"):
        model.sample(2, torch.tensor([0, 8]))
    unconditional = GAN({**TINY, "conditional": False}, EIGHT)
    assert not unconditional.conditional and not unconditional.can_classify()
    assert not isinstance(unconditional.discriminator, ProjectionDiscriminator)
    with pytest.raises(ValueError, match="without labels"):
        unconditional.sample(2, torch.tensor([0, 1]))


def test_conditional_fakes_draw_classes_from_the_prior():
    model = GAN(TINY, EIGHT)
    model.set_class_prior(torch.tensor([2] * 30 + [5] * 10))
    torch.manual_seed(0)
    y = model.fake_labels(4000)
    # p(2) = 3/4, p(5) = 1/4 and nothing else; binomial sd of the share is 0.007
    assert set(y.tolist()) == {2, 5}
    assert (y == 2).float().mean().item() == pytest.approx(0.75, abs=0.03)
    g = torch.Generator().manual_seed(1)  # the seeded draw of validation repeats itself
    assert torch.equal(model.fake_labels(50, g), model.fake_labels(50, torch.Generator().manual_seed(1)))


def test_conditional_checkpoint_round_trip(tmp_path):
    model = GAN({"width": 4, "latent_dim": 3, "conditional": True}, DIGITS)
    images, labels = torch.rand(32, 1, 8, 8), torch.arange(32) % 10
    model.set_class_prior(labels[:30])  # not uniform: 0 and 1 are a little rarer
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, loader(images, 8, y=labels), loader(images[:16], 8, y=labels[:16]))
    assert {"train/loss_d", "train/loss_g", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    loaded = GAN.load_from_checkpoint(path, weights_only=True)
    assert loaded.config == model.config and loaded.info == model.info and loaded.conditional
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert {"label_log_prior", "generator.embed.weight", "discriminator.embed.layer.weight"} <= set(state)
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert not loaded.can_classify()

    want = torch.tensor([3, 3, 0, 9, 5])
    torch.manual_seed(1)
    s = loaded.sample(5, want)
    torch.manual_seed(1)
    torch.testing.assert_close(s, model.sample(5, want))
    assert s.shape == (5, 1, 8, 8) and s.min() >= 0 and s.max() <= 1
    # anomaly score: -max_y D(x, y), against one D(x, y) pass per class
    loaded.discriminator.eval()
    per_class = torch.stack([loaded.discriminator(images, torch.full((32,), c)) for c in range(10)], 1)
    torch.testing.assert_close(loaded.anomaly_score(images), -per_class.max(1).values)
    assert loaded.encode(images).shape == (32, 4 * 2 * 4 * 4)


def test_conditional_losses_reach_every_parameter():
    """What plain DDP (find_unused_parameters=False) needs: each player's loss gives every parameter of G and D,
    the class embeddings included, a gradient."""
    model = GAN(TINY, EIGHT)
    x, y = torch.randn(16, 2), torch.arange(16) % 8

    def d_loss():
        fake, y_fake = model.fakes(16)
        return model.discriminator_loss(x, fake, y, y_fake)

    for loss in (d_loss, lambda: model.loss.generator(model.critic(*model.fakes(16)))):
        model.zero_grad(set_to_none=True)
        loss().backward()
        assert all(p.grad is not None for p in model.generator.parameters())
        assert all(p.grad is not None for p in model.discriminator.parameters())


@pytest.mark.slow
def test_conditional_ddp_spawn_two_processes(tmp_path):
    """The conditional pair under ddp_spawn (the fast suite runs the unconditional one)."""
    model = GAN({**TINY, "n_critic": 2}, EIGHT)
    model.set_class_prior(torch.arange(32) % 8)
    before = [p.detach().clone() for p in model.generator.parameters()]
    x, y = torch.randn(32, 2), torch.arange(32) % 8
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1)
    trainer.fit(model, loader(x, 4, y=y), loader(x[:8], 4, y=y[:8]))
    assert trainer.state.finished and int(model.d_steps) == 4
    assert not torch.equal(before[-1], model.generator.embed.weight)
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


def test_eight_gaussians_samples_land_on_the_requested_component(tmp_path):
    """Issue 10: >= 95% of the samples asked for component c fall nearest to centre c, for every c."""
    torch.manual_seed(0)
    x, c = eight_gaussians(4096, np.random.default_rng(0))
    model = GAN(TOY_CFG, EIGHT)
    model.set_class_prior(torch.as_tensor(c))
    data = loader(torch.tensor(x, dtype=torch.float32), 512, shuffle=True, y=torch.as_tensor(c))
    make_trainer(tmp_path, max_epochs=80).fit(model, data)  # 640 D steps, 320 G steps

    asked = torch.arange(8).repeat_interleave(250)
    nearest, _ = nearest_centre(model.sample(len(asked), asked).numpy())
    share = np.array([(nearest[asked.numpy() == k] == k).mean() for k in range(8)])
    assert share.min() >= 0.95, f"share nearest the requested centre, per class: {share.round(3)}"


# --- semi-supervised: the (K+1)-class discriminator (Salimans et al. 2016, section 5) ---------------
def k_plus_one_by_hand(logits: np.ndarray, y: np.ndarray, fake_logits: np.ndarray) -> dict:
    """Every term straight from the definition, in float64: D(x) = Z / (Z + 1), Z = sum_k exp l_k."""
    z_real, z_fake = np.exp(logits).sum(1), np.exp(fake_logits).sum(1)
    d_real, one_minus_d_fake = z_real / (z_real + 1), 1 / (z_fake + 1)  # 1 - Z / (Z + 1), without cancellation
    labelled = y != UNLABELLED
    p_y = np.exp(logits[labelled]) / np.exp(logits[labelled]).sum(1, keepdims=True)
    supervised = -np.log(p_y[np.arange(labelled.sum()), y[labelled]]).mean() if labelled.any() else 0.0
    return {"real": -np.log(d_real), "fake": -np.log(one_minus_d_fake), "supervised": supervised,
            "total": supervised - np.log(d_real).mean() - np.log(one_minus_d_fake).mean()}


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])  # 300: Z from e^-300 to e^300, far outside float32
def test_k_plus_one_losses_equal_the_direct_computation(scale):
    rng = np.random.default_rng(int(scale))
    logits, fake = rng.uniform(-scale, scale, size=(40, 10)), rng.uniform(-scale, scale, size=(30, 10))
    logits[0], fake[0] = -scale, scale  # all logits very negative / very positive
    y = np.where(rng.random(40) < 0.3, rng.integers(0, 10, 40), UNLABELLED)
    want = k_plus_one_by_hand(logits, y, fake)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k_plus_one_real(t(logits)).double().numpy(), want["real"], **tol)
    np.testing.assert_allclose(k_plus_one_fake(t(fake)).double().numpy(), want["fake"], **tol)
    yt = torch.tensor(y)
    assert float(supervised_cross_entropy(t(logits), yt)) == pytest.approx(want["supervised"], rel=1e-5, abs=1e-5)
    assert float(k_plus_one_discriminator(t(logits), yt, t(fake))) == pytest.approx(want["total"], rel=1e-5, abs=1e-4)


def test_supervised_term_without_labels_is_zero_but_keeps_the_graph():
    logits = torch.randn(5, 3, requires_grad=True)
    loss = supervised_cross_entropy(logits, torch.full((5,), UNLABELLED))
    loss.backward()
    assert float(loss) == 0.0 and logits.grad is not None and not logits.grad.any()


def test_feature_matching_is_the_squared_distance_of_the_means():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 3, 2, 2)), rng.normal(1.0, 2.0, size=(30, 3, 2, 2))
    want = ((real.reshape(20, -1).mean(0) - fake.reshape(30, -1).mean(0)) ** 2).mean()
    assert float(feature_matching(torch.tensor(real), torch.tensor(fake))) == pytest.approx(want, rel=1e-12)


def test_class_feature_matching_equals_the_per_class_means():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(12, 5)), rng.normal(size=(9, 5))
    probs = rng.dirichlet(np.ones(3), size=12)
    y_fake = np.array([0, 0, 2, 2, 2, 0, 0, 2, 0])  # class 1 has no fake: left out
    real_means = probs.T @ real / probs.sum(0)[:, None]
    want = np.mean([((real_means[k] - fake[y_fake == k].mean(0)) ** 2).mean() for k in (0, 2)])
    got = class_feature_matching(torch.tensor(real), torch.tensor(probs), torch.tensor(fake), torch.tensor(y_fake))
    assert float(got) == pytest.approx(want, rel=1e-12)
    logits, y = torch.randn(4, 3), torch.tensor([UNLABELLED, 2, UNLABELLED, 0])
    p = class_responsibilities(logits, y)
    torch.testing.assert_close(p[[0, 2]], torch.softmax(logits[[0, 2]], 1))
    torch.testing.assert_close(p[[1, 3]], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))


def test_objective_auto_follows_the_labels():
    model = GAN(TINY, EIGHT)
    assert not model.can_classify()
    model.set_class_prior(torch.tensor([0, 1, UNLABELLED, 7]))
    assert model.can_classify() and bool(model.k_plus_one)
    torch.testing.assert_close(model.label_log_prior.exp(), torch.tensor([1 / 3, 1 / 3, 0, 0, 0, 0, 0, 1 / 3],
                                                                         dtype=torch.float64))
    model.set_class_prior(torch.arange(8))  # every label: back to the projection GAN
    assert not model.can_classify()
    assert model.uses_k_plus_one(torch.tensor([3, UNLABELLED])) and model.can_classify()  # a batch with hidden labels
    assert GAN({**TINY, "objective": "k_plus_one"}, EIGHT).can_classify()  # (K+1) with every label
    projection = GAN({**TINY, "objective": "projection"}, EIGHT)
    with pytest.raises(ValueError, match="projection"):
        projection.set_class_prior(torch.tensor([0, UNLABELLED]))
    with pytest.raises(ValueError, match="projection"):
        projection.uses_k_plus_one(torch.tensor([0, UNLABELLED]))
    with pytest.raises(ValueError, match="objective"):
        GAN({**TINY, "objective": "k_plus_one", "conditional": False}, EIGHT)
    with pytest.raises(ValueError, match="g_class_fm"):
        GAN({"g_class_fm": -1.0}, EIGHT)


@pytest.mark.parametrize("hidden", [False, True])
def test_best_fid_checkpoint_is_the_model_unless_the_discriminator_classifies(tmp_path, hidden):
    """The train stage's `BestSampleQuality` keeps the best-FID checkpoint for the projection GAN; for the
    (K+1) one (hidden labels) it logs the same FID curve but keeps no best checkpoint: the last weights
    are the classifier."""
    from pipeline.callbacks import BestSampleQuality
    from pipeline.evaluation.featnet import IdentityFeatures

    x, y = eight_gaussians(64, np.random.default_rng(0))
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    train_y = torch.where(torch.arange(64) % 2 == 0, y, torch.full_like(y, UNLABELLED)) if hidden else y
    model = GAN(TINY, EIGHT)
    model.set_class_prior(train_y)
    assert model.can_classify() == hidden and model.selects_on_sample_quality() == (not hidden)
    best = tmp_path / "best.ckpt"
    fid = BestSampleQuality(IdentityFeatures(2), x, best if model.selects_on_sample_quality() else None,
                            every_n_epochs=1, n=64)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[fid])
    trainer.fit(model, loader(x, 16, y=train_y), loader(x, 32, y=y))
    assert math.isfinite(float(trainer.callback_metrics["val/fid"]))
    assert best.is_file() == (not hidden)


def test_classify_rows_are_log_probabilities_of_the_class_logits():
    model = GAN({**TINY, "objective": "k_plus_one"}, DIGITS)
    with torch.no_grad():
        for p in model.discriminator.parameters():  # away from the N(0, 0.02) init: logits of several units
            p.copy_(3 * torch.randn_like(p))
    x = torch.rand(30, 1, 8, 8)
    log_p = model.classify(x)
    assert log_p.shape == (30, 10) and bool((log_p <= 0).all())
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(30))
    model.discriminator.eval()
    torch.testing.assert_close(log_p, torch.log_softmax(model.discriminator.class_logits(x), 1))
    torch.testing.assert_close(model.forward(x), log_p.exp())  # the pyfunc serves p(y | x)
    torch.testing.assert_close(model.anomaly_score(x), -torch.logsumexp(model.discriminator.class_logits(x), 1))


def test_k_plus_one_losses_reach_every_parameter():
    """Plain DDP (find_unused_parameters=False): each player's (K+1) loss gives every parameter of G and D a
    gradient, the class layers included when the cross-entropy term of G has weight 0."""
    model = GAN({**TINY, "objective": "k_plus_one"}, EIGHT)
    x, y = torch.randn(16, 2), torch.tensor([0, 3] + [UNLABELLED] * 14)
    losses = (lambda: model.k_plus_one_discriminator_loss(x, y, model.fakes(16)[0]),
              lambda: model.k_plus_one_generator_loss(x, y))
    for loss in losses:
        model.zero_grad(set_to_none=True)
        loss().backward()
        assert all(p.grad is not None for p in model.generator.parameters())
        assert all(p.grad is not None for p in model.discriminator.parameters())


def test_k_plus_one_checkpoint_keeps_the_objective(tmp_path):
    model = GAN({**TINY, "n_critic": 2}, EIGHT)
    x, y = torch.randn(32, 2), torch.where(torch.arange(32) < 8, torch.arange(32) % 8, UNLABELLED)
    model.set_class_prior(y)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, loader(x, 8, y=y), loader(x[:16], 8, y=torch.arange(16) % 8))
    assert {"train/loss_d", "train/loss_g", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    loaded = GAN.load_from_checkpoint(path, weights_only=True)
    assert loaded.can_classify()
    torch.testing.assert_close(loaded.classify(x), model.classify(x))
    # a checkpoint written before the (K+1) objective existed has no `k_plus_one`: the projection GAN
    old = torch.load(path, weights_only=True)
    del old["state_dict"]["k_plus_one"]
    torch.save(old, tmp_path / "old.ckpt")
    assert not GAN.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).can_classify()


def test_few_labels_on_eight_gaussians_classify_well_above_chance(tmp_path):
    """Two labels per component of 8 Gaussians, every other label hidden: the (K+1) discriminator's classifier
    names the component of fresh points far above chance (1/8), and G still samples the component asked for."""
    torch.manual_seed(0)
    x, c = eight_gaussians(2048, np.random.default_rng(0))
    c = torch.as_tensor(c)
    labelled = torch.cat([torch.nonzero(c == k)[:2, 0] for k in range(8)])
    y = torch.full_like(c, UNLABELLED)
    y[labelled] = c[labelled]
    model = GAN(TOY_CFG, EIGHT)
    model.set_class_prior(y)
    data = loader(torch.tensor(x, dtype=torch.float32), 256, shuffle=True, y=y)
    make_trainer(tmp_path, max_epochs=40).fit(model, data)  # 320 D steps, 160 G steps

    x_test, c_test = eight_gaussians(2000, np.random.default_rng(1))
    accuracy = (model.classify(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy() == c_test).mean()
    assert accuracy > 0.8, f"accuracy {accuracy:.3f} (chance 0.125)"
    asked = torch.arange(8).repeat_interleave(100)
    nearest, _ = nearest_centre(model.sample(len(asked), asked).numpy())
    assert (nearest == asked.numpy()).mean() > 0.5
