"""The tokenizer's training objective (SPEC "loss"; paper Sec. 3.4 Eq. 3-4 and App. A.2).

L_G = 1.0 MSE + 1.0 LPIPS-VGG + 1.0 VQ + 1.0 VF + 0.5 GAN (GAN from step 20k);
L_D = 0.5 hinge + 0.001 LeCam (SPEC "discriminator"), trained from the same step.
Defaults follow the release (Kwai-Kolors/ResTok e0059cb, modeling/modules/losses.py); the switches
below name the alternatives (README "The paper and the released code").
The paper fixes lambda_gan = 0.5 (App. A.2) and mentions no adaptive GAN weight, so there is none.
A network whose weight is 0 is never built, so CPU runs with lpips/vf/gan off stay cheap.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.losses.diffaugment import DEFAULT_POLICY, ValueRange
from models.losses.discriminator import (
    DEFAULT_BACKBONE,
    DinoDiscriminator,
    InputMode,
    LeCamEMA,
    LecamVariant,
    generator_adv_loss,
    hinge_d_loss,
)
from models.losses.perceptual import LPIPS, pad_crop_resize
from models.losses.pretrained_weights import PRETRAINED, RANDOM_UNTRAINED, BackboneMode, metric_suffix
from models.losses.vf_align import DEFAULT_TEACHER, MarginConvention, VFAlignLoss, VFTeacher

logger = logging.getLogger(__name__)


@dataclass
class TokenizerLossConfig:
    # Weights (SPEC "loss"; paper App. A.2: lambda_mse = lambda_percp = lambda_vf = 1, lambda_gan = 0.5).
    mse_weight: float = 1.0
    lpips_weight: float = 1.0
    vq_weight: float = 1.0
    vf_weight: float = 1.0
    vf_enc_weight: float = 1.0  # lambda_enc, paper Eq. 3
    vf_dec_weight: float = 1.0  # lambda_dec, paper Eq. 3
    gan_weight: float = 0.5
    gan_start_step: int = 20000  # generator adversarial term and discriminator training start here
    # LPIPS-VGG (backbone: pretrained | random-untrained; empty path = normal download).
    lpips_backbone: BackboneMode = PRETRAINED
    lpips_vgg_weights: str = field(default="", metadata={"path": True})  # torchvision vgg16-397923af.pth
    lpips_linear_weights: str = field(
        default="", metadata={"path": True}
    )  # empty = v0.1 heads bundled with the lpips package
    # Release: in training both images are padded 15 px (replicate), randomly cropped and bicubic-
    # resized back before LPIPS (perceptual.pad_crop_resize); false = LPIPS on the images as they are.
    lpips_augment: bool = True
    # VF alignment (SPEC "VF alignment").
    vf_margin: float = 0.25  # release: m = 0.25 in relu(1 - m - cos)
    vf_margin_convention: MarginConvention = (
        "release"  # release: relu(1 - m - cos) | paper: relu(m - cos), m = 0.85
    )
    vf_teacher: str = DEFAULT_TEACHER  # any timm model name with a CLS token
    vf_teacher_backbone: BackboneMode = PRETRAINED
    vf_teacher_weights: str = field(
        default="", metadata={"path": True}
    )  # local .safetensors / .pth in timm format; empty = HF hub
    vf_teacher_resolution: int = 256
    vf_teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    # Discriminator (SPEC "discriminator").
    disc_backbone_name: str = DEFAULT_BACKBONE
    disc_backbone: BackboneMode = PRETRAINED
    disc_backbone_weights: str = field(default="", metadata={"path": True})
    disc_resolution: int = 224
    disc_feature_blocks: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    disc_backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    disc_diffaug: str = DEFAULT_POLICY  # release "color,translation,cutout_0.2"; empty = none
    disc_diffaug_prob: float = 0.5  # release: each op group applied with probability 0.5 (1 = always)
    disc_diffaug_range: ValueRange = "unit"  # unit: ops on [0, 1] images (release) | signed: on [-1, 1]
    disc_cls_readout: bool = True  # release: CLS token added to every patch token before the heads
    disc_input_mode: InputMode = "release"  # release: random 224 crop (p 0.5) or area resize | bilinear
    disc_virtual_batch: int = 8  # local batch-norm group size
    lecam_weight: float = 0.001
    lecam_ema_decay: float = 0.999  # release 0.999 (LeCam reference code: 0.99)
    # release: relu^2 of batch-mean logits vs EMAs from 0, previous EMA used | per_logit: reference
    # LeCam code (every logit, EMA updated first, started from the first batch)
    lecam_variant: LecamVariant = "release"


def _warn_if_random(what: str, mode: str, log_name: str) -> None:
    if mode == RANDOM_UNTRAINED:
        logger.warning(
            "%s backbone is '%s' (test mode): its values are logged as %s, not as the real loss",
            what,
            RANDOM_UNTRAINED,
            log_name,
        )


def _as_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached python floats with a single device sync."""
    device = next(v.device for v in values.values() if torch.is_tensor(v))
    stacked = torch.stack(
        [torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values.values()]
    )
    return dict(zip(values, stacked.tolist(), strict=False))


class TokenizerLoss(nn.Module):
    """Generator and discriminator objectives of the tokenizer.

    Images and reconstructions are [B, 3, H, W] in [0, 1]. `aux` is the tokenizer forward's dict:
    `vq_loss` (scalar), optional `vf_enc_feat` [B, D] and `vf_dec_feat` [B, h*w, D].
    Optimise `discriminator.trainable_parameters()` with a separate optimiser (schema: disc_lr).
    Logged values are python floats; names of values from random-untrained networks say so.
    """

    def __init__(self, config: TokenizerLossConfig | Any | None = None):
        super().__init__()
        cfg = config if config is not None else TokenizerLossConfig()
        self.config = cfg
        self.lpips = self.vf = self.discriminator = self.lecam = None
        if cfg.lpips_weight > 0:
            self.lpips = LPIPS(
                cfg.lpips_backbone, cfg.lpips_vgg_weights or None, cfg.lpips_linear_weights or None
            )
            _warn_if_random("LPIPS VGG", cfg.lpips_backbone, self.lpips.name)
        if cfg.vf_weight > 0:
            teacher = VFTeacher(
                cfg.vf_teacher,
                cfg.vf_teacher_backbone,
                cfg.vf_teacher_weights or None,
                cfg.vf_teacher_resolution,
                dict(cfg.vf_teacher_kwargs),
            )
            self.vf = VFAlignLoss(
                teacher, cfg.vf_margin, cfg.vf_margin_convention, cfg.vf_enc_weight, cfg.vf_dec_weight
            )
            _warn_if_random(f"VF teacher {cfg.vf_teacher}", cfg.vf_teacher_backbone, self.vf.name)
        if cfg.gan_weight > 0:
            self.discriminator = DinoDiscriminator(
                cfg.disc_backbone_name,
                cfg.disc_backbone,
                cfg.disc_backbone_weights or None,
                cfg.disc_resolution,
                tuple(cfg.disc_feature_blocks),
                True,
                cfg.disc_diffaug,
                cfg.disc_virtual_batch,
                dict(cfg.disc_backbone_kwargs),
                bool(cfg.disc_cls_readout),
                cfg.disc_input_mode,
                float(cfg.disc_diffaug_prob),
                cfg.disc_diffaug_range,
            )
            self.lecam = LeCamEMA(cfg.lecam_ema_decay, cfg.lecam_variant)
            self.gan_suffix = metric_suffix(cfg.disc_backbone)
            _warn_if_random(
                f"discriminator {cfg.disc_backbone_name}", cfg.disc_backbone, "gen_adv" + self.gan_suffix
            )

    def describe(self) -> str:
        """One line per term, for the resolved-config printout at start."""
        cfg = self.config
        lines = [f"mse x{cfg.mse_weight}", f"vq x{cfg.vq_weight}"]
        if self.lpips is not None:
            lines.append(
                f"{self.lpips.name} (VGG, backbone {cfg.lpips_backbone}, augment "
                f"{cfg.lpips_augment}) x{cfg.lpips_weight}"
            )
        if self.vf is not None:
            lines.append(
                f"{self.vf.name}: teacher {cfg.vf_teacher} ({cfg.vf_teacher_backbone}) at "
                f"{cfg.vf_teacher_resolution}px, margin {cfg.vf_margin} "
                f"({cfg.vf_margin_convention}) x{cfg.vf_weight}"
            )
        if self.discriminator is not None:
            lines.append(
                f"gan: {cfg.disc_backbone_name} ({cfg.disc_backbone}) heads "
                f"{sum(p.numel() for p in self.discriminator.trainable_parameters()):,} "
                f"params, from step {cfg.gan_start_step} x{cfg.gan_weight}, "
                f"lecam x{cfg.lecam_weight} ({cfg.lecam_variant}, decay "
                f"{cfg.lecam_ema_decay}), diffaug '{cfg.disc_diffaug}' p={cfg.disc_diffaug_prob} "
                f"on {cfg.disc_diffaug_range}, input {cfg.disc_input_mode}, "
                f"cls readout {cfg.disc_cls_readout}"
            )
        return "\n".join(lines)

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms (and the discriminator step) run at `step`."""
        return self.discriminator is not None and step >= self.config.gan_start_step

    @contextlib.contextmanager
    def _discriminator_frozen(self):
        """The generator step backpropagates through D into the reconstruction only, so the
        discriminator's gradients are not polluted by the generator objective."""
        params = list(self.discriminator.trainable_parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags, strict=False):
                p.requires_grad_(flag)

    def generator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, aux: dict, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        mse = F.mse_loss(recon.float(), images.float())
        total = cfg.mse_weight * mse
        terms["mse"] = mse
        if self.lpips is not None:
            pair = (images, recon)
            if cfg.lpips_augment and self.training:  # release: augmented in training only
                pair = pad_crop_resize(images.float(), recon.float())
            perceptual = self.lpips(*pair).mean()
            total = total + cfg.lpips_weight * perceptual
            terms[self.lpips.name] = perceptual
        if cfg.vq_weight > 0:
            if "vq_loss" not in aux:
                raise KeyError(
                    f"vq_weight={cfg.vq_weight} but the tokenizer aux has no 'vq_loss' (keys: {sorted(aux)})"
                )
            total = total + cfg.vq_weight * aux["vq_loss"]
            terms["vq"] = aux["vq_loss"]
        if self.vf is not None:
            vf_total, vf_terms = self.vf(images, aux.get("vf_enc_feat"), aux.get("vf_dec_feat"))
            if vf_terms:
                total = total + cfg.vf_weight * vf_total
                terms[self.vf.name] = vf_total
                for key, value in vf_terms.items():
                    terms[f"{self.vf.name}_{key}"] = value
        if self.gan_active(step):
            with self._discriminator_frozen():
                adversarial = generator_adv_loss(self.discriminator(recon))
            total = total + cfg.gan_weight * adversarial
            terms["gen_adv" + self.gan_suffix] = adversarial
        terms["total"] = total
        return total, _as_floats(terms)

    def discriminator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge + LeCam on real images vs detached reconstructions. Before `gan_start_step` (or with
        gan off) returns a constant zero and empty logs: skip the D step when not gan_active(step)."""
        if not self.gan_active(step):
            return images.new_zeros((), dtype=torch.float32), {}
        # Release order of the random draws: augment real, augment fake, then the two forwards.
        real = self.discriminator.augment(images.detach())
        fake = self.discriminator.augment(recon.detach())
        logits_real = self.discriminator(real, augment=False)
        logits_fake = self.discriminator(fake, augment=False)
        hinge = hinge_d_loss(logits_real, logits_fake)
        lecam = self.lecam.loss(logits_real, logits_fake)
        total = hinge + self.config.lecam_weight * lecam
        s = self.gan_suffix
        logs = {
            f"disc_hinge{s}": hinge,
            f"disc_lecam{s}": lecam,
            f"logits_real{s}": logits_real.mean(),
            f"logits_fake{s}": logits_fake.mean(),
            f"disc_total{s}": total,
        }
        return total, _as_floats(logs)
