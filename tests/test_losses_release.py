"""Issue 13: the tokenizer's training losses behave as the release's (Kwai-Kolors/ResTok e0059cb)
by default, with switches for the alternatives; one test per row of the issue's table.

Values here are derived from the release's definitions; tests/test_losses_official.py compares
with outputs of the authors' code (tests/fixtures/official/losses_tiny*).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from configs.loading import load_config
from models.losses.diffaugment import diff_augment, parse_policy
from models.losses.discriminator import DinoDiscriminator, LeCamEMA, hinge_d_loss
from models.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig

TINY_BACKBONE = {
    "backbone_name": "vit_tiny_patch16_224",
    "backbone": "random-untrained",
    "image_size": 32,
    "feature_blocks": (0, 1),
    "model_kwargs": {"depth": 2},
}
RELEASE_PRESETS = ("imagenet256-restok-l", "official-restok-l", "official-har-l", "official-vanilla-l")


def _tokens(disc, images):
    """The backbone's token sequence after the patch embedding (CLS first), as the release reads it."""
    net = disc.features.net
    x = (images - disc.features.mean) / disc.features.std
    return net.norm_pre(net._pos_embed(net.patch_embed(x)))


def test_readout_adds_cls_to_every_patch_token():
    torch.manual_seed(0)
    disc = DinoDiscriminator(**TINY_BACKBONE, virtual_batch=2)
    images = torch.rand(2, 3, 32, 32)
    tokens = _tokens(disc, images)
    first = disc.features(images)[0]  # embedding-level feature map [B, C, N]
    torch.testing.assert_close(first, (tokens[:, 1:] + tokens[:, :1]).transpose(1, 2))
    off = DinoDiscriminator(**TINY_BACKBONE, virtual_batch=2, cls_readout=False)
    off.load_state_dict(disc.state_dict())
    torch.testing.assert_close(off.features(images)[0], tokens[:, 1:].transpose(1, 2))


def test_input_random_crop_or_area_resize():
    disc = DinoDiscriminator(**TINY_BACKBONE, virtual_batch=2)
    images = torch.rand(2, 3, 40, 48)
    seen = set()
    for seed in range(12):
        random.seed(seed)
        torch.manual_seed(seed)
        out = disc.features.resize_input(images)
        random.seed(seed)
        torch.manual_seed(seed)
        if random.random() <= 0.5:  # the release's order: python coin, then torch top, left
            top = int(torch.randint(0, 40 - 32 + 1, (1,)))
            left = int(torch.randint(0, 48 - 32 + 1, (1,)))
            expected, kind = images[..., top : top + 32, left : left + 32], "crop"
        else:
            expected, kind = F.interpolate(images, size=(32, 32), mode="area"), "area"
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        seen.add(kind)
    assert seen == {"crop", "area"}
    small = torch.rand(2, 3, 24, 24)  # smaller than the backbone input: bicubic up
    torch.testing.assert_close(
        disc.features.resize_input(small), F.interpolate(small, size=(32, 32), mode="bicubic")
    )
    with pytest.raises(ValueError, match="disc_input_mode"):
        DinoDiscriminator(**TINY_BACKBONE, input_mode="nearest")


def test_diffaugment_release_policy_probability_and_range():
    from models.losses.diffaugment import augment_images

    assert parse_policy("color,translation,cutout_0.2") == ["color", "translation", "cutout_0.2"]
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        parse_policy("cutout_1.5")
    ones = torch.ones(64, 1, 20, 20)
    erased = 1 - diff_augment(ones, "cutout_0.2", prob=1.0, generator=torch.Generator().manual_seed(0))
    assert 0 < erased.mean() <= 0.04 + 1e-6  # a 4x4 square of 20x20, clipped at the border
    # Each group runs with probability 0.5, one draw per group for the whole batch.
    x = torch.rand(2, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    applied = [not torch.equal(diff_augment(x, "translation", generator=g), x) for _ in range(400)]
    assert 0.4 < sum(applied) / 400 < 0.6
    # In [0, 1] space the cutout fill is black (0); the [-1, 1] variant fills mid-grey.
    img = torch.full((1, 3, 10, 10), 0.8)
    unit = augment_images(img, "cutout", 1.0, "unit", torch.Generator().manual_seed(2))
    signed = augment_images(img, "cutout", 1.0, "signed", torch.Generator().manual_seed(2))
    assert sorted(round(v, 4) for v in unit.unique().tolist()) == [0.0, 0.8]
    assert sorted(round(v, 4) for v in signed.unique().tolist()) == [0.5, 0.8]
    cfg = TokenizerLossConfig()
    assert (cfg.disc_diffaug, cfg.disc_diffaug_prob, cfg.disc_diffaug_range) == (
        "color,translation,cutout_0.2",
        0.5,
        "unit",
    )


def test_lecam_release_batch_means_previous_ema_from_zero():
    ema = LeCamEMA()
    assert ema.decay == 0.999 and ema.variant == "release"
    steps = [
        (torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])),
        (torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0])),
    ]
    er = ef = 0.0
    for real, fake in steps:
        r, f = real.mean().item(), fake.mean().item()
        expected = max(r - ef, 0) ** 2 + max(er - f, 0) ** 2  # EMAs of the previous steps
        assert ema.loss(real, fake).item() == pytest.approx(expected)
        er, ef = er * 0.999 + r * 0.001, ef * 0.999 + f * 0.001
        assert ema.ema_real.item() == pytest.approx(er) and ema.ema_fake.item() == pytest.approx(ef)
    cfg = TokenizerLossConfig()
    assert (cfg.lecam_ema_decay, cfg.lecam_variant) == (0.999, "release")


def test_hinge_is_halved():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.5, -3.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))


def test_lpips_pad_crop_resize_in_training(monkeypatch):
    from models.losses.perceptual import pad_crop_resize

    images, recon = torch.rand(2, 3, 20, 24), torch.rand(2, 3, 20, 24)
    random.seed(3)
    a, b = pad_crop_resize(images, recon)
    random.seed(3)
    top, bottom, left, right = (random.randrange(0, 16) for _ in range(4))
    padded = F.pad(images, (15, 15, 15, 15), mode="replicate")
    expected = F.interpolate(
        padded[:, :, top : 50 - bottom, left : 54 - right], size=(20, 24), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(a, expected)
    assert a.shape == b.shape == images.shape
    # TokenizerLoss feeds LPIPS the augmented pair in training, the plain pair in eval / when off.
    import models.losses.tokenizer_loss as tl

    calls = []
    monkeypatch.setattr(tl, "pad_crop_resize", lambda x, y: calls.append(1) or (x, y))
    off = {"vf_weight": 0.0, "gan_weight": 0.0, "vq_weight": 0.0, "lpips_backbone": "random-untrained"}
    loss = TokenizerLoss(TokenizerLossConfig(**off))
    loss.generator_loss(images, recon, {}, 0)
    assert calls == [1]
    loss.eval()
    loss.generator_loss(images, recon, {}, 0)
    TokenizerLoss(TokenizerLossConfig(**off, lpips_augment=False)).generator_loss(images, recon, {}, 0)
    assert calls == [1]


def test_ema_decay_warmup():
    from jobs.training.deepspeed_runtime import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9999, rank=0, warmup=True)
    assert ema.decay_at(0) == 0.0  # release: the first update copies the weights
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.9999
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(0)
    assert torch.equal(ema.shadow["weight"], model.weight)
    assert EMA(model, 0.9999, rank=0).decay_at(0) == 0.9999  # switch off: constant decay


def test_gradient_clipping_tokenizer_and_discriminator():
    # The release clips both: utils/train_utils.py clips model.parameters() before the tokenizer
    # step and loss_module.parameters() (the discriminator heads) before the discriminator step.
    from jobs.training.deepspeed_runtime import deepspeed_config

    cfg = load_config("imagenet256-restok-l")
    train = cfg.tokenizer_train
    for zero in (int(train.zero_stage), min(int(train.zero_stage), 2)):  # tokenizer, discriminator
        assert deepspeed_config(train, 16, zero)["gradient_clipping"] == 10.0


def test_init_release_scheme():
    from models.tokenizer import ResTok, tokenizer_config_for

    cfg = tokenizer_config_for("cpu-nano")
    cfg.vf_align, cfg.init_std = "both", 0.02
    cfg.init_scheme = "release"
    torch.manual_seed(0)
    model = ResTok(cfg)
    convs = [m for m in model.pixel_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    convs += [m for m in model.pixel_decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # trunc-normal(0.02) (truncated at +-2 absolute, as nn.init), zero bias
        assert conv.bias is None or not conv.bias.abs().any()
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert weights.mean().abs().item() < 1e-3
    # vf_proj keeps PyTorch's default (kaiming-uniform, bound 1/sqrt(fan_in)), not 0.02.
    vf = model.vf_proj.weight
    assert vf.abs().max() <= vf.shape[1] ** -0.5 and vf.std().item() == pytest.approx(
        (vf.shape[1] ** -0.5) / 3**0.5, rel=0.05
    )
    cfg.init_scheme = "vit"
    other = ResTok(cfg)
    assert other.vf_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    first = next(c for c in other.pixel_encoder.modules() if isinstance(c, torch.nn.Conv2d))
    assert first.weight.std().item() > 0.05  # PyTorch default for a 27-input conv: about 0.11


@pytest.mark.parametrize("preset", RELEASE_PRESETS)
def test_release_presets_use_the_release_losses(preset):
    cfg = load_config(preset)
    loss = cfg.tokenizer_train.loss
    assert cfg.tokenizer.init_scheme == "release"
    assert cfg.tokenizer_train.ema_warmup and cfg.generator_train.ema_warmup
    assert loss.lpips_augment and loss.disc_cls_readout and loss.disc_input_mode == "release"
    assert (loss.disc_diffaug, loss.disc_diffaug_prob, loss.disc_diffaug_range) == (
        "color,translation,cutout_0.2",
        0.5,
        "unit",
    )
    assert (loss.lecam_ema_decay, loss.lecam_variant, loss.lecam_weight) == (0.999, "release", 0.001)
    assert dict(loss.disc_backbone_kwargs) == {"act_layer": "gelu_tanh"}
    assert cfg.tokenizer_train.optim.grad_clip == 10.0


@pytest.mark.parametrize(
    "key",
    [
        "tokenizer.init_scheme",
        "tokenizer_train.loss.disc_input_mode",
        "tokenizer_train.loss.disc_diffaug_range",
        "tokenizer_train.loss.lecam_variant",
    ],
)
def test_bad_switch_values_are_rejected_naming_the_choices(key):
    from configs.loading import ConfigError

    with pytest.raises(ConfigError, match=rf"{key}='nope' is not valid; choose one of"):
        load_config("default", [f"{key}=nope"])
