"""DINO-feature discriminator, hinge GAN loss and LeCam regularisation (SPEC "discriminator").

A frozen DINO ViT-S/16 (timm `vit_small_patch16_224.dino`) sees the (DiffAugmented) image resized to
224 px; token features are taken after the patch embedding (with positions) and after blocks
2, 5, 8 and 11, prefix tokens dropped. One small trainable head per feature map treats the patch
tokens as a 1-d sequence: a 1x1 block, then a residual block with a kernel-9 conv (each block:
spectral-norm conv, local batch norm, LeakyReLU 0.2), then a 1x1 conv to one logit per token. For
ViT-S (384 channels) that is 1,477,249 parameters per head, 7,386,245 for the five (SPEC: about 7.4M).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.losses.diffaugment import DEFAULT_POLICY, diff_augment, parse_policy
from models.losses.pretrained_weights import (
    PRETRAINED, FrozenNetwork, create_timm_backbone, metric_suffix)

DEFAULT_BACKBONE = "vit_small_patch16_224.dino"
DEFAULT_FEATURE_BLOCKS = (2, 5, 8, 11)
LEAKY_SLOPE = 0.2


class BatchNormLocal(nn.Module):
    """Batch norm over groups of at most `virtual_batch` samples, always with the statistics of the
    current group (no running statistics), so real and fake batches are normalised separately and the
    result does not depend on the global batch size or on other ranks."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
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
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                     padding_mode="circular")
    return spectral_norm(conv)


class ConvNormAct(nn.Sequential):
    def __init__(self, channels: int, kernel_size: int, virtual_batch: int):
        super().__init__(spectral_conv1d(channels, channels, kernel_size),
                         BatchNormLocal(channels, virtual_batch), nn.LeakyReLU(LEAKY_SLOPE))


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

    def __init__(self, model_name: str = DEFAULT_BACKBONE, backbone: str = PRETRAINED,
                 weights_path: str | None = None, image_size: int = 224,
                 feature_blocks: tuple[int, ...] = DEFAULT_FEATURE_BLOCKS, use_embedding: bool = True,
                 model_kwargs: dict | None = None):
        super().__init__()
        kwargs = {"img_size": image_size, "num_classes": 0, **(model_kwargs or {})}
        self.net = create_timm_backbone(model_name, backbone, weights_path, "disc_backbone_weights",
                                        **kwargs)
        depth = len(self.net.blocks)
        if not feature_blocks or max(feature_blocks) >= depth or min(feature_blocks) < 0:
            raise ValueError(f"disc feature_blocks {list(feature_blocks)} must lie in [0, {depth}) "
                             f"for {model_name}")
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

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images in [0, 1] -> list of [B, C, N] patch-token features (gradients reach the images)."""
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        net = self.net
        x = ((x - self.mean.float()) / self.std.float()).to(self.dtype)
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
        features = [x] if self.use_embedding else []
        for index, block in enumerate(net.blocks[: self.feature_blocks[-1] + 1]):
            x = block(x)
            if index in self.feature_blocks:
                features.append(x)
        return [f[:, self.num_prefix_tokens:].transpose(1, 2) for f in features]


class DinoDiscriminator(nn.Module):
    """Frozen ViT features + one trainable head per feature; returns [B, total tokens] logits.

    Only `heads` is trainable: give `heads.parameters()` (== `trainable_parameters()`) to the optimiser.
    """

    def __init__(self, backbone_name: str = DEFAULT_BACKBONE, backbone: str = PRETRAINED,
                 weights_path: str | None = None, image_size: int = 224,
                 feature_blocks: tuple[int, ...] = DEFAULT_FEATURE_BLOCKS, use_embedding: bool = True,
                 diffaug_policy: str = DEFAULT_POLICY, virtual_batch: int = 8,
                 model_kwargs: dict | None = None):
        super().__init__()
        self.features = FrozenViTFeatures(backbone_name, backbone, weights_path, image_size,
                                          tuple(feature_blocks), use_embedding, model_kwargs)
        self.heads = nn.ModuleList(DiscriminatorHead(self.features.channels, virtual_batch)
                                   for _ in range(self.features.num_features))
        self.diffaug_policy = diffaug_policy
        parse_policy(diffaug_policy)
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

    def forward(self, images: torch.Tensor, augment: bool = True) -> torch.Tensor:
        """images in [0, 1] -> logits [B, sum of token counts over features]."""
        x = images
        if augment and self.diffaug_policy:
            x = (diff_augment(x * 2 - 1, self.diffaug_policy) + 1) / 2  # DiffAugment works in [-1, 1]
        feats = self.features(x)
        head_dtype = self.heads[0].to_logit.bias.dtype  # heads and backbone may differ in dtype
        self._match_spectral_norm_buffers(head_dtype)
        return torch.cat([head(f.to(head_dtype)) for head, f in zip(self.heads, feats)], dim=1).float()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake)) (SPEC "discriminator")."""
    return -logits_fake.mean()


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                      ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2),
    the one-sided form of the LeCam reference implementation."""
    return (F.relu(logits_real - ema_fake).pow(2).mean()
            + F.relu(ema_real - logits_fake).pow(2).mean())


class LeCamEMA(nn.Module):
    """EMAs of the mean real and fake logits (buffers, so they are checkpointed with the loss).
    The first update copies the batch means (no bias toward 0)."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        if int(self.num_updates) == 0:
            self.ema_real.copy_(real)
            self.ema_fake.copy_(fake)
        else:
            self.ema_real.lerp_(real, 1 - self.decay)
            self.ema_fake.lerp_(fake, 1 - self.decay)
        self.num_updates += 1
