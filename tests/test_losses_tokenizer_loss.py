"""TokenizerLoss: the combined objective (SPEC "loss"), tiny random networks, CPU."""

import pytest
import torch
from conftest import RANDOM_UNTRAINED_LOSS_NETS
from omegaconf import OmegaConf

from models.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig

OFF = dict(lpips_weight=0.0, vf_weight=0.0, gan_weight=0.0)
TINY = dict(**RANDOM_UNTRAINED_LOSS_NETS, gan_start_step=10)


def _batch(width=192, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=g)
    offset = torch.zeros(1, 3, 1, 1, requires_grad=True)  # stands in for the tokenizer's parameters
    recon = (images * 0.8 + 0.1) + offset
    aux = {
        "vq_loss": (offset**2).sum() + 0.125,
        "vf_enc_feat": torch.randn(2, width, generator=g).requires_grad_(),
        "vf_dec_feat": torch.randn(2, grid, width, generator=g).requires_grad_(),
    }
    return images, recon, aux, offset


def test_everything_off_builds_no_network():
    loss = TokenizerLoss(OmegaConf.structured(TokenizerLossConfig(**OFF)))  # DictConfig accepted
    assert loss.lpips is None and loss.vf is None and loss.discriminator is None
    assert sum(p.numel() for p in loss.parameters()) == 0
    images, recon, aux, _ = _batch()
    total, logs = loss.generator_loss(images, recon, aux, step=10**6)
    expected = torch.nn.functional.mse_loss(recon, images) + 0.125
    assert total.item() == pytest.approx(expected.item())
    assert set(logs) == {"mse", "vq", "total"} and isinstance(logs["total"], float)
    assert not loss.gan_active(10**6)
    d_total, d_logs = loss.discriminator_loss(images, recon, step=10**6)
    assert d_total.item() == 0.0 and d_logs == {}
    with pytest.raises(KeyError, match="vq_loss"):
        loss.generator_loss(images, recon, {}, step=0)


@pytest.fixture(scope="module")
def full_loss():
    torch.manual_seed(0)
    return TokenizerLoss(TokenizerLossConfig(**TINY))


def _frozen_params(loss):
    return (
        list(loss.lpips.parameters())
        + list(loss.vf.parameters())
        + list(loss.discriminator.features.parameters())
    )


def test_generator_loss_before_and_after_gan_start(full_loss):
    loss = full_loss
    assert "random-untrained" in loss.describe()
    images, recon, aux, offset = _batch()
    total, logs = loss.generator_loss(images, recon, aux, step=9)
    assert set(logs) == {
        "mse",
        "lpips_random_untrained",
        "vq",
        "vf_random_untrained",
        "vf_random_untrained_enc",
        "vf_random_untrained_dec",
        "total",
    }
    total.backward()
    assert offset.grad.abs().sum() > 0
    assert aux["vf_enc_feat"].grad.abs().sum() > 0 and aux["vf_dec_feat"].grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in _frozen_params(loss))

    images, recon, aux, offset = _batch(seed=1)
    total, logs = loss.generator_loss(images, recon, aux, step=10)
    assert "gen_adv_random_untrained" in logs
    parts = (
        logs["mse"]
        + logs["lpips_random_untrained"]
        + logs["vq"]
        + logs["vf_random_untrained"]
        + 0.5 * logs["gen_adv_random_untrained"]
    )
    assert logs["total"] == pytest.approx(parts, rel=1e-5)
    total.backward()
    assert offset.grad.abs().sum() > 0
    heads = list(loss.discriminator.trainable_parameters())
    assert all(p.grad is None and p.requires_grad for p in heads)  # G step leaves D untouched
    assert all(p.grad is None for p in _frozen_params(loss))


def test_discriminator_loss_trains_heads_with_lecam(full_loss):
    loss = full_loss
    images, recon, _, offset = _batch(seed=2)
    assert loss.discriminator_loss(images, recon, step=9)[1] == {}
    before = int(loss.lecam.num_updates)
    d_total, logs = loss.discriminator_loss(images, recon, step=10)
    assert int(loss.lecam.num_updates) == before + 1
    assert logs["disc_total_random_untrained"] == pytest.approx(
        logs["disc_hinge_random_untrained"] + 0.001 * logs["disc_lecam_random_untrained"], rel=1e-5
    )
    d_total.backward()
    assert all(p.grad is not None for p in loss.discriminator.trainable_parameters())
    assert offset.grad is None  # reconstructions are detached in the D step
    assert all(p.grad is None for p in _frozen_params(loss))
    for p in loss.discriminator.trainable_parameters():
        p.grad = None
