"""Named model sizes in one place (like DiT's and LlamaGen's tables).

Tokenizer ViT sizes follow SPEC.md "ViT blocks / sizes"; generator sizes follow LlamaGen's GPT table.
Presets refer to these names; explicit width/depth/heads in a config override nothing silently:
the registry is the only source of the numbers.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int


# SPEC.md: small 512/6/8, base 768/12/12, large 1024/24/16. "tiny" is the fixture size
# (NOTES.md: width 64, depth 4, heads 4); "nano" is a CPU size for minute-long runs.
VIT_SIZES: dict[str, ViTSize] = {
    "nano": ViTSize(width=32, depth=2, heads=2),
    "tiny": ViTSize(width=64, depth=4, heads=4),
    "small": ViTSize(width=512, depth=6, heads=8),
    "base": ViTSize(width=768, depth=12, heads=12),
    "large": ViTSize(width=1024, depth=24, heads=16),
}


@dataclass(frozen=True)
class GPTSize:
    dim: int
    n_layer: int
    n_head: int


# LlamaGen GPT table (B/L/XL/XXL); "tiny" is the fixture size (NOTES.md: dim 64, 2 layers, 4 heads).
GPT_SIZES: dict[str, GPTSize] = {
    "tiny": GPTSize(dim=64, n_layer=2, n_head=4),
    "small": GPTSize(dim=128, n_layer=4, n_head=4),
    "B": GPTSize(dim=768, n_layer=12, n_head=12),
    "L": GPTSize(dim=1024, n_layer=24, n_head=16),
    "XL": GPTSize(dim=1280, n_layer=36, n_head=20),
    "XXL": GPTSize(dim=1536, n_layer=48, n_head=24),
}


def vit_size(name: str) -> ViTSize:
    if name not in VIT_SIZES:
        raise KeyError(f"unknown ViT size {name!r}; valid: {sorted(VIT_SIZES)}")
    return VIT_SIZES[name]


def gpt_size(name: str) -> GPTSize:
    if name not in GPT_SIZES:
        raise KeyError(f"unknown GPT size {name!r}; valid: {sorted(GPT_SIZES)}")
    return GPT_SIZES[name]
