"""Vision-foundation (VF) alignment loss (SPEC "VF alignment"; paper Sec. 3.4, Eq. 1-3).

A frozen timm teacher (default DINOv3 ViT-L/16, `vit_large_patch16_dinov3.lvd1689m`) sees the input
image at the configured resolution (256 px) with its own normalisation and gives a CLS token and
patch tokens. The tokenizer provides (aux of its forward):
  * `vf_enc_feat` [B, D]: projected, mean-pooled coarsest image tokens -> compared with the CLS token;
  * `vf_dec_feat` [B, h*w, D]: projected feature-mask-token branch -> compared per location with the
    patch tokens (the teacher grid is resampled to h x w if it differs).
Each term is a hinge on the cosine similarity. Two margin conventions (SPEC row says they differ):
  * "release": relu(1 - m - cos), m = 0.25 (cosine target 0.75);
  * "paper":   relu(delta - cos), delta = 0.85 (Eq. 1-2 as printed).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from models.losses.pretrained_weights import PRETRAINED, FrozenNetwork, create_timm_backbone, metric_suffix

DEFAULT_TEACHER = "vit_large_patch16_dinov3.lvd1689m"
MarginConvention = Literal["release", "paper"]
MARGIN_CONVENTIONS = get_args(MarginConvention)


def cosine_target(margin: float, convention: str = "release") -> float:
    """The cosine similarity above which a term is zero."""
    if convention == "release":
        return 1.0 - margin
    if convention == "paper":
        return margin
    raise ValueError(f"vf margin convention {convention!r} is not one of {list(MARGIN_CONVENTIONS)}")


def margin_cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, margin: float, convention: str = "release"
) -> torch.Tensor:
    """mean(relu(target - cos(student, teacher))) over all leading dims; features on the last dim."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return F.relu(cosine_target(margin, convention) - cos).mean()


def resample_patch_grid(
    patches: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """[B, h*w, D] teacher tokens on `grid` -> [B, H*W, D] on `target_grid` (bilinear)."""
    if tuple(grid) == tuple(target_grid):
        return patches
    b, n, d = patches.shape
    image = patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    image = F.interpolate(image, size=target_grid, mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


class VFTeacher(FrozenNetwork):
    """Frozen timm ViT returning (cls [B, D], patches [B, h*w, D], grid (h, w)) for images in [0, 1].

    Prefix tokens (CLS + DINOv3's 4 register tokens) are split off with timm's `num_prefix_tokens`;
    the CLS token is the first prefix token.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_TEACHER,
        backbone: str = PRETRAINED,
        weights_path: str | None = None,
        image_size: int = 256,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        kwargs = {"img_size": image_size, "num_classes": 0, **(model_kwargs or {})}
        self.net = create_timm_backbone(model_name, backbone, weights_path, "vf_teacher_weights", **kwargs)
        self.model_name, self.backbone, self.image_size = model_name, backbone, image_size
        self.name = "vf" + metric_suffix(backbone)
        self.num_prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 1))
        if getattr(self.net, "cls_token", None) is None or self.num_prefix_tokens < 1:
            raise ValueError(f"VF teacher {model_name} has no CLS token; the encoder term needs one")
        self.patch_size = tuple(self.net.patch_embed.patch_size)
        self.feature_dim = int(self.net.num_features)
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        tokens = self.net.forward_features(((x - self.mean.float()) / self.std.float()).to(self.dtype))
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        return tokens[:, 0], tokens[:, self.num_prefix_tokens :], grid


class VFAlignLoss(FrozenNetwork):
    """L_vf = w_enc * L_enc + w_dec * L_dec (paper Eq. 3); terms whose feature is absent are skipped."""

    def __init__(
        self,
        teacher: VFTeacher,
        margin: float = 0.25,
        convention: str = "release",
        enc_weight: float = 1.0,
        dec_weight: float = 1.0,
    ):
        super().__init__()
        cosine_target(margin, convention)  # validates the convention
        self.net = teacher
        self.margin, self.convention = margin, convention
        self.enc_weight, self.dec_weight = enc_weight, dec_weight

    @property
    def name(self) -> str:
        return self.net.name

    def forward(
        self,
        images: torch.Tensor,
        vf_enc_feat: torch.Tensor | None = None,
        vf_dec_feat: torch.Tensor | None = None,
    ):
        """Returns (weighted total, {"enc": L_enc, "dec": L_dec} for the terms computed)."""
        terms: dict[str, torch.Tensor] = {}
        if vf_enc_feat is None and vf_dec_feat is None:
            return images.new_zeros(()), terms
        for feat in (vf_enc_feat, vf_dec_feat):
            if feat is not None and feat.shape[-1] != self.net.feature_dim:
                raise ValueError(
                    f"VF feature width {feat.shape[-1]} != teacher {self.net.model_name} "
                    f"width {self.net.feature_dim} (tokenizer vf_feature_dim)"
                )
        cls, patches, grid = self.net(images)
        total = images.new_zeros((), dtype=torch.float32)
        if vf_enc_feat is not None:
            terms["enc"] = margin_cosine_loss(vf_enc_feat, cls, self.margin, self.convention)
            total = total + self.enc_weight * terms["enc"]
        if vf_dec_feat is not None:
            side = math.isqrt(vf_dec_feat.shape[1])
            if side * side != vf_dec_feat.shape[1]:
                raise ValueError(f"vf_dec_feat has {vf_dec_feat.shape[1]} locations, not a square grid")
            target = resample_patch_grid(patches, grid, (side, side))
            terms["dec"] = margin_cosine_loss(vf_dec_feat, target, self.margin, self.convention)
            total = total + self.dec_weight * terms["dec"]
        return total, terms
