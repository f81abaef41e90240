"""Discriminator, hinge / LeCam and DiffAugment (SPEC "discriminator")."""

import pytest
import torch

from models.losses.diffaugment import diff_augment, rand_cutout, rand_translation
from models.losses.discriminator import (
    BatchNormLocal,
    DinoDiscriminator,
    LeCamEMA,
    generator_adv_loss,
    hinge_d_loss,
    lecam_regularizer,
)

TINY_BACKBONE = dict(
    backbone_name="vit_tiny_patch16_224",
    backbone="random-untrained",
    image_size=32,
    feature_blocks=(0, 1),
    model_kwargs={"depth": 2},
)


def test_hinge_and_generator_loss_vs_hand_computation():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1; release halves the sum
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_adv_loss(fake).item() == pytest.approx(1 / 3)
    assert generator_adv_loss(real).item() == pytest.approx(-0.5)


def test_lecam_per_logit_variant_vs_hand_computation_and_ema():
    real = torch.tensor([1.0, -0.5])
    fake = torch.tensor([0.0, -2.0])
    ema = LeCamEMA(decay=0.9, variant="per_logit")
    ema.update(real, fake)  # first update copies the means: 0.25, -1.0
    assert ema.ema_real.item() == pytest.approx(0.25) and ema.ema_fake.item() == pytest.approx(-1.0)
    # relu(real - ema_fake)^2 = [4, 0.25] -> 2.125; relu(ema_real - fake)^2 = [0.0625, 5.0625] -> 2.5625
    reg = lecam_regularizer(real, fake, ema.ema_real, ema.ema_fake)
    assert reg.item() == pytest.approx(2.125 + 2.5625)
    ema.update(torch.tensor([1.25]), torch.tensor([0.0]))
    assert ema.ema_real.item() == pytest.approx(0.9 * 0.25 + 0.1 * 1.25)
    assert ema.ema_fake.item() == pytest.approx(0.9 * -1.0)
    assert set(dict(ema.named_buffers())) == {"ema_real", "ema_fake", "num_updates"}  # checkpointed


def test_vit_s_head_parameter_count():
    disc = DinoDiscriminator(backbone="random-untrained")  # vit_small_patch16_224.dino layout
    trainable = sum(p.numel() for p in disc.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in disc.trainable_parameters()) == 7_386_245
    assert len(disc.heads) == 5 and disc.features.channels == 384
    assert not any(p.requires_grad for p in disc.features.parameters())


def test_batchnorm_local_normalises_each_group():
    bn = BatchNormLocal(3, virtual_batch=4)
    x = torch.randn(8, 3, 5) + torch.arange(8.0).view(8, 1, 1) * 10
    y = bn(x)
    for group in (y[:4], y[4:]):
        assert group.mean(dim=(0, 2)).abs().max() < 1e-5
        assert group.var(dim=(0, 2), unbiased=False).sub(1).abs().max() < 1e-3


def test_discriminator_forward_backward_trains_heads_only():
    torch.manual_seed(0)
    disc = DinoDiscriminator(**TINY_BACKBONE, virtual_batch=2)
    images = torch.rand(4, 3, 48, 48, requires_grad=True)
    logits = disc(images)
    assert logits.shape == (4, 3 * 4)  # embedding + 2 blocks, 2x2 tokens at 32 px
    hinge_d_loss(logits, -logits).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.trainable_parameters())
    assert all(p.grad is None and not p.requires_grad for p in disc.features.parameters())
    disc.train()
    assert not disc.features.net.training  # the frozen backbone stays in eval


def test_diffaugment_shapes_gradients_and_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x * 2 - 1, "color,translation,cutout", 1.0, generator=g)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None
    ones = torch.ones(64, 1, 16, 16)
    erased = 1 - rand_cutout(ones, torch.Generator().manual_seed(1)).mean()
    assert 0.1 < erased.item() <= 0.25  # an 8x8 square, clipped at the border
    shifted = rand_translation(ones, torch.Generator().manual_seed(2))
    assert shifted.min() == 0 or torch.equal(shifted, ones)
    assert set(shifted.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, "color,blur")


def test_bf16_backbone_with_fp32_heads():
    disc = DinoDiscriminator(**TINY_BACKBONE, virtual_batch=2)
    disc.features.to(torch.bfloat16)  # as an engine with bf16 might leave it
    logits = disc(torch.rand(2, 3, 32, 32))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
