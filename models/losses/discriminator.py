"""DINO-feature discriminator, hinge GAN loss and LeCam regularisation (SPEC "discriminator").

A frozen DINO ViT-S/16 (timm `vit_small_patch16_224.dino`) sees the (DiffAugmented) image brought to
224 px (release `discriminator_dino.py`: a random 224 crop with probability 0.5 when the image is
larger, else an area resize; bicubic when smaller); token features are taken after the patch
embedding (with positions) and after blocks 2, 5, 8 and 11. Readout (release): the CLS token is
added to every patch token, then the prefix tokens are dropped. One small trainable head per feature
map treats the patch tokens as a 1-d sequence: a 1x1 block, then a residual block with a kernel-9
conv (each block: spectral-norm conv, local batch norm, LeakyReLU 0.2), then a 1x1 conv to one logit
per token. For ViT-S (384 channels) that is 1,477,249 parameters per head, 7,386,245 for the five
(SPEC: about 7.4M).
"""

from __future__ import annotations

import math
import random
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.losses.diffaugment import DEFAULT_POLICY, RANGES, augment_images, parse_policy
from models.losses.pretrained_weights import PRETRAINED, FrozenNetwork, create_timm_backbone, metric_suffix

DEFAULT_BACKBONE = "vit_small_patch16_224.dino"
DEFAULT_FEATURE_BLOCKS = (2, 5, 8, 11)
LEAKY_SLOPE = 0.2
BN_EPS = 1e-6  # release DinoDisc norm_eps
InputMode = Literal["release", "bilinear"]  # random-crop-or-area (release) | antialiased bilinear resize
LecamVariant = Literal["release", "per_logit"]
INPUT_MODES = get_args(InputMode)
LECAM_VARIANTS = get_args(LecamVariant)


class BatchNormLocal(nn.Module):
    """Batch norm over groups of at most `virtual_batch` samples, always with the statistics of the
    current group (no running statistics), so real and fake batches are normalised separately and the
    result does not depend on the global batch size or on other ranks."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = BN_EPS):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, L]
        groups = math.ceil(x.size(0) / self.virtual_batch)
        normed = []
        for chunk in x.tensor_split(groups, dim=0):
            mean = chunk.mean(dim=(0, 2), keepdim=True)
            var = chunk.var(dim=(0, 2), unbiased=False, keepdim=True)
            normed.append((chunk - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(normed, 0) * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    # Circular padding: the raster token sequence is treated as a ring, so every token sees 9 others.
    conv = nn.Conv1d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"
    )
    return spectral_norm(conv)


class ConvNormAct(nn.Sequential):
    def __init__(self, channels: int, kernel_size: int, virtual_batch: int):
        super().__init__(
            spectral_conv1d(channels, channels, kernel_size),
            BatchNormLocal(channels, virtual_batch),
            nn.LeakyReLU(LEAKY_SLOPE),
        )


class DiscriminatorHead(nn.Module):
    """[B, C, N] token features -> [B, N] logits."""

    def __init__(self, channels: int, virtual_batch: int = 8):
        super().__init__()
        self.pointwise = ConvNormAct(channels, 1, virtual_batch)
        self.residual = ConvNormAct(channels, 9, virtual_batch)
        self.to_logit = spectral_conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(x)
        x = (x + self.residual(x)) / math.sqrt(2)  # variance-preserving residual
        return self.to_logit(x).squeeze(1)


class FrozenViTFeatures(FrozenNetwork):
    """Token features of a frozen timm VisionTransformer: embedding output and chosen block outputs."""

    def __init__(
        self,
        model_name: str = DEFAULT_BACKBONE,
        backbone: str = PRETRAINED,
        weights_path: str | None = None,
        image_size: int = 224,
        feature_blocks: tuple[int, ...] = DEFAULT_FEATURE_BLOCKS,
        use_embedding: bool = True,
        model_kwargs: dict | None = None,
        cls_readout: bool = True,
        input_mode: str = "release",
    ):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"disc_input_mode {input_mode!r} is not one of {list(INPUT_MODES)}")
        self.cls_readout, self.input_mode = cls_readout, input_mode
        kwargs = {"img_size": image_size, "num_classes": 0, **(model_kwargs or {})}
        self.net = create_timm_backbone(model_name, backbone, weights_path, "disc_backbone_weights", **kwargs)
        depth = len(self.net.blocks)
        if not feature_blocks or max(feature_blocks) >= depth or min(feature_blocks) < 0:
            raise ValueError(
                f"disc feature_blocks {list(feature_blocks)} must lie in [0, {depth}) for {model_name}"
            )
        self.feature_blocks = tuple(sorted(feature_blocks))
        self.use_embedding = use_embedding
        self.image_size = image_size
        self.channels = int(self.net.embed_dim)
        self.num_prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 1))
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def num_features(self) -> int:
        return len(self.feature_blocks) + int(self.use_embedding)

    def resize_input(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, S, S]. "release": when both sides exceed S, one random S crop for the
        whole batch with probability 0.5 (python `random`, then torch.randint for top and left, as
        torchvision RandomCrop), else an area resize; bicubic when smaller."""
        size = self.image_size
        h, w = x.shape[-2:]
        if self.input_mode == "bilinear":
            if (h, w) == (size, size):
                return x
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if h > size and w > size and random.random() <= 0.5:
            top = int(torch.randint(0, h - size + 1, size=(1,)))
            left = int(torch.randint(0, w - size + 1, size=(1,)))
            return x[..., top : top + size, left : left + size]
        return F.interpolate(x, size=(size, size), mode="area" if h > size else "bicubic")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images in [0, 1] -> list of [B, C, N] patch-token features (gradients reach the images)."""
        x = images.float()
        x = self.resize_input((x - self.mean.float()) / self.std.float()).to(self.dtype)
        net = self.net
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
        features = [x] if self.use_embedding else []
        for index, block in enumerate(net.blocks[: self.feature_blocks[-1] + 1]):
            x = block(x)
            if index in self.feature_blocks:
                features.append(x)
        if self.cls_readout:  # release readout: CLS added to every patch token
            return [(f[:, self.num_prefix_tokens :] + f[:, :1]).transpose(1, 2) for f in features]
        return [f[:, self.num_prefix_tokens :].transpose(1, 2) for f in features]


class DinoDiscriminator(nn.Module):
    """Frozen ViT features + one trainable head per feature; returns [B, total tokens] logits.

    Only `heads` is trainable: give `heads.parameters()` (== `trainable_parameters()`) to the optimiser.
    """

    def __init__(
        self,
        backbone_name: str = DEFAULT_BACKBONE,
        backbone: str = PRETRAINED,
        weights_path: str | None = None,
        image_size: int = 224,
        feature_blocks: tuple[int, ...] = DEFAULT_FEATURE_BLOCKS,
        use_embedding: bool = True,
        diffaug_policy: str = DEFAULT_POLICY,
        virtual_batch: int = 8,
        model_kwargs: dict | None = None,
        cls_readout: bool = True,
        input_mode: str = "release",
        diffaug_prob: float = 0.5,
        diffaug_range: str = "unit",
    ):
        super().__init__()
        self.features = FrozenViTFeatures(
            backbone_name,
            backbone,
            weights_path,
            image_size,
            tuple(feature_blocks),
            use_embedding,
            model_kwargs,
            cls_readout,
            input_mode,
        )
        self.heads = nn.ModuleList(
            DiscriminatorHead(self.features.channels, virtual_batch)
            for _ in range(self.features.num_features)
        )
        self.diffaug_policy, self.diffaug_prob, self.diffaug_range = (
            diffaug_policy,
            float(diffaug_prob),
            diffaug_range,
        )
        parse_policy(diffaug_policy)
        if diffaug_range not in RANGES:
            raise ValueError(f"disc_diffaug_range {diffaug_range!r} is not one of {list(RANGES)}")
        self.backbone = backbone
        self.name_suffix = metric_suffix(backbone)

    def trainable_parameters(self):
        return self.heads.parameters()

    def _match_spectral_norm_buffers(self, dtype: torch.dtype) -> None:
        """A DeepSpeed bf16 engine casts parameters only, leaving spectral norm's power-iteration
        vectors u, v in fp32; torch.mv needs them in the weight's dtype."""
        for name, buf in self.heads.named_buffers():
            if name.endswith(("._u", "._v")) and buf.dtype != dtype:
                module = self.heads.get_submodule(name.rsplit(".", 1)[0])
                setattr(module, name.rsplit(".", 1)[1], buf.to(dtype))

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment of images in [0, 1] (identity when the policy is empty)."""
        if not self.diffaug_policy:
            return images
        return augment_images(images, self.diffaug_policy, self.diffaug_prob, self.diffaug_range)

    def forward(self, images: torch.Tensor, augment: bool = True) -> torch.Tensor:
        """images in [0, 1] -> logits [B, sum of token counts over features]."""
        feats = self.features(self.augment(images) if augment else images)
        head_dtype = self.heads[0].to_logit.bias.dtype  # heads and backbone may differ in dtype
        self._match_spectral_norm_buffers(head_dtype)
        return torch.cat(
            [head(f.to(head_dtype)) for head, f in zip(self.heads, feats, strict=False)], dim=1
        ).float()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))) (release / taming-transformers)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake)) (SPEC "discriminator")."""
    return -logits_fake.mean()


def lecam_regularizer(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2).
    The release passes the batch means of the logits (so it is relu^2 of mean differences); the
    reference implementation passes the logits themselves (`LeCamEMA.variant`)."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCamEMA(nn.Module):
    """EMAs of the mean real and fake logits (buffers, so they are checkpointed with the loss).

    variant "release" (losses.py): EMAs start at 0, decay 0.999, the loss uses the EMAs of the
    previous steps (updated after it) on the batch-mean logits. "per_logit" (LeCam reference code):
    the first update copies the batch means, the EMAs are updated before the loss, which compares
    every logit.
    """

    def __init__(self, decay: float = 0.999, variant: str = "release"):
        super().__init__()
        if variant not in LECAM_VARIANTS:
            raise ValueError(f"lecam_variant {variant!r} is not one of {list(LECAM_VARIANTS)}")
        self.decay, self.variant = decay, variant
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        if self.variant == "per_logit" and int(self.num_updates) == 0:
            self.ema_real.copy_(real)
            self.ema_fake.copy_(fake)
        else:
            self.ema_real.copy_(self.ema_real * self.decay + real * (1 - self.decay))
            self.ema_fake.copy_(self.ema_fake * self.decay + fake * (1 - self.decay))
        self.num_updates += 1

    def loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The regulariser for this discriminator step; updates the EMAs (in the variant's order)."""
        if self.variant == "per_logit":
            self.update(logits_real, logits_fake)
            return lecam_regularizer(logits_real, logits_fake, self.ema_real, self.ema_fake)
        value = lecam_regularizer(
            logits_real.mean(), logits_fake.mean(), self.ema_real.clone(), self.ema_fake.clone()
        )
        self.update(logits_real, logits_fake)
        return value
