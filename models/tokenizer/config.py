"""Tokenizer configuration (a plain dataclass; configs/schema.py embeds it as `tokenizer`).

Defaults are our clean training variant of ResTok-L. `official_tokenizer_config()` returns the
release's behaviour (SPEC.md; fixtures/official/NOTES.md quirks #1-#12), needed to load its weights.
"""

from dataclasses import dataclass, field
from typing import Literal, get_args

from models.registry import vit_size

# Choices are declared once, as the fields' types (the config loader validates them).
VfAlign = Literal["none", "encoder", "decoder", "both"]
MergeOp = Literal["nearest", "avg"]
MergeLayout = Literal["width", "alternate"]
LatentInit = Literal["pool", "learned"]
# Which modules get the trunc-normal(init_std) init: "release" (restok.py `self.apply` before the
# VF heads exist): encoder, decoder and the pixel CNN, VF heads at PyTorch's default; "vit":
# encoder, decoder and VF heads, pixel CNN at PyTorch's default.
InitScheme = Literal["release", "vit"]
VF_CHOICES = get_args(VfAlign)
MERGE_OPS = get_args(MergeOp)
MERGE_LAYOUTS = get_args(MergeLayout)
LATENT_INITS = get_args(LatentInit)
INIT_SCHEMES = get_args(InitScheme)


@dataclass
class TokenizerConfig:
    # ViT size names from models.registry.VIT_SIZES (SPEC "sizes").
    encoder_size: str = "large"
    decoder_size: str = "large"
    image_size: int = 256
    # Pixel CNN (SPEC "CNN encoder"/"CNN decoder"): one stage per multiplier, x2 down/up between.
    pixel_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    cnn_norm_groups: int = 32
    # NOTES #3: release applies the 1x1 shortcut (out->out) to the branch output (h + W.h);
    # False = a normal shortcut on the block input (in->out).
    cnn_shortcut_on_branch: bool = False
    # NOTES #1: the release returns the raw decoder output (not de-normalised); the loss is MSE
    # against [0,1] images, so the network learns [0,1] directly. True adds mean/std back.
    denormalize_output: bool = False
    # Latent hierarchy (SPEC "latent levels"); sum(levels) = number of tokens.
    levels: list[int] = field(default_factory=lambda: [1, 1, 2, 4, 8, 16, 32, 64])
    latent_hierarchy: bool = True  # False: all latents one mask level (paper Tab. 2 #1)
    # SPEC "encoder mask": True = the level mask (the release always builds it, also at S = 1);
    # False = full bidirectional encoder attention, as TiTok (ablation-titok-full-attention).
    encoder_mask: bool = True
    latent_init: LatentInit = "pool"  # pool (Alg. 1, release) | learned (TiTok-style queries)
    residual_latent: bool = True  # Alg. 1 subtracts each level before pooling the next
    codebook_size: int = 8192
    code_dim: int = 8
    commitment: float = 0.25
    # Codebook entropy penalty (MaskGIT/MAGVIT-style; SPEC "quantizer": the release has none, so
    # 0 = off). Adds w * (mean per-token entropy - entropy of the batch-mean assignment) over the
    # soft assignments softmax(cos / T); keeps tiny CPU models from collapsing onto a few codes.
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.05
    # Image scales S (SPEC "scales"); 1 = TiTok-style baseline, no merging.
    num_scales: int = 4
    merge_op: MergeOp = "avg"  # nearest (release, NOTES #7) | avg (paper Fig. 2c)
    merge_factor: int = 2  # tokens per merged token at each merge (paper Tab. 3 pooling factor)
    merge_layout: MergeLayout = (
        "alternate"  # width (release: 16x16->16x8->16x4) | alternate (halve longer side)
    )
    residual_image: bool = True
    # NOTES #10: release reshapes (B,N,W)->(B,W,N,1) without permute before conv_out.
    legacy_reshape: bool = False
    rope_theta: float = 10000.0
    # Trunc-normal std of the ViT-side linear/conv weights (release 0.02, tuned for width ~1024).
    # At width 32 it shrinks every layer's output ~10x, so CPU presets use ~width^-0.5.
    init_std: float = 0.02
    init_scheme: InitScheme = "vit"  # INIT_SCHEMES; the release (and imagenet256-restok-l) uses "release"
    # Nested token dropout (SPEC "nested dropout"): keep all with prob 1 - p, else a level
    # boundary >= min_tokens with weights doubling towards longer lengths (1,2,4,8,16 for 128).
    nested_dropout: bool = True
    nested_dropout_prob: float = 0.2
    min_tokens: int = 4
    # VF alignment (SPEC "VF alignment"): projection heads only; the teacher is in models/losses.
    vf_align: VfAlign = "both"
    vf_feature_dim: int = 1024
    # Activation checkpointing per ViT block (encoder and decoder) and per pixel-CNN res block:
    # a block's activations are recomputed in the backward instead of kept, so a larger batch
    # fits in the same memory (about one extra forward per step).
    activation_checkpointing: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.levels)

    def validate(self) -> "TokenizerConfig":
        """Raise ValueError naming the first bad field."""

        def bad(name, why):
            raise ValueError(f"TokenizerConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("encoder_size", "decoder_size"):
            try:
                vit_size(getattr(self, name))
            except KeyError as exc:
                bad(name, exc.args[0])
        for name, choices in (
            ("vf_align", VF_CHOICES),
            ("merge_op", MERGE_OPS),
            ("merge_layout", MERGE_LAYOUTS),
            ("latent_init", LATENT_INITS),
            ("init_scheme", INIT_SCHEMES),
        ):
            if getattr(self, name) not in choices:
                bad(name, f"choose one of {list(choices)}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            bad("image_size", f"must be divisible by the CNN downsampling {down}")
        if self.merge_factor < 2 or self.merge_factor & (self.merge_factor - 1):
            bad("merge_factor", "must be a power of two >= 2")
        if self.num_scales < 1:
            bad("num_scales", "must be >= 1")
        if not self.levels or any(n < 1 for n in self.levels):
            bad("levels", "must be positive token counts")
        if not 0 < self.min_tokens <= self.num_tokens:
            bad("min_tokens", f"must be in 1..{self.num_tokens}")
        return self


def official_tokenizer_config(
    size: str = "large",
    image_size: int = 256,
    num_tokens: int = 128,
    codebook_size: int = 8192,
    pixel_channels: int = 128,
    vf: bool = False,
) -> TokenizerConfig:
    """The release's behaviour (commit e0059cb): every NOTES.md quirk switched on.

    vf=True adds the training-time VF heads (vf_proj, vf_proj_dec, decoder.feat_mask_token).
    """
    return TokenizerConfig(
        encoder_size=size,
        decoder_size=size,
        image_size=image_size,
        pixel_channels=pixel_channels,
        codebook_size=codebook_size,
        levels=levels_for(num_tokens),
        cnn_shortcut_on_branch=True,
        denormalize_output=False,
        merge_op="nearest",
        merge_layout="width",
        merge_factor=2,
        num_scales=4,
        legacy_reshape=True,
        vf_align="both" if vf else "none",
        init_scheme="release",
    )


def levels_for(num_tokens: int) -> list[int]:
    """[1, 1, 2, 4, ..., N/2] for a power-of-two token count N (SPEC "latent levels")."""
    if num_tokens < 2 or num_tokens & (num_tokens - 1):
        raise ValueError(f"num_tokens={num_tokens} must be a power of two >= 2")
    levels, n = [1], 1
    while n < num_tokens:
        levels.append(n)
        n *= 2
    return levels


def tokenizer_config_for(name: str) -> TokenizerConfig:
    """Named presets: release compatibility, the fixture model, clean S/B/L and a CPU model."""
    presets = {
        # Release ResTok-L as the inference configs build it (no VF heads).
        "official-l": lambda: official_tokenizer_config("large"),
        "official-l-vf": lambda: official_tokenizer_config("large", vf=True),
        # NOTES "Tiny tokenizer": 128 px, 8x8 grid, 32 tokens, codebook 64, pixel width 32.
        "tiny-fixture": lambda: official_tokenizer_config(
            "tiny", image_size=128, num_tokens=32, codebook_size=64, pixel_channels=32
        ),
        "restok-s": lambda: TokenizerConfig(encoder_size="small", decoder_size="small"),
        "restok-b": lambda: TokenizerConfig(encoder_size="base", decoder_size="base"),
        "restok-l": lambda: TokenizerConfig(),
        # Minute-long CPU training at 32 px: 8x8 grid, 16 tokens, S = 2 on a 2-block ViT.
        "cpu-nano": lambda: TokenizerConfig(
            encoder_size="nano",
            decoder_size="nano",
            image_size=32,
            pixel_channels=16,
            channel_mult=[1, 2, 2],
            num_res_blocks=1,
            z_channels=32,
            cnn_norm_groups=8,
            levels=[1, 1, 2, 4, 8],
            codebook_size=256,
            num_scales=2,
            vf_align="none",
            vf_feature_dim=32,
            init_std=0.18,
            entropy_weight=0.1,
        ),
    }
    if name not in presets:
        raise KeyError(f"unknown tokenizer preset {name!r}; valid: {sorted(presets)}")
    return presets[name]()


__all__ = ["TokenizerConfig", "levels_for", "official_tokenizer_config", "tokenizer_config_for"]
