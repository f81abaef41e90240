"""Generator configuration (plain dataclasses; configs/schema.py embeds `GeneratorConfig` as `generator`).

Release-compatibility switches (NOTES.md quirks 15-19) are ordinary fields here; the release values are
set by `official_generator_config` / `official_sampling_config`. Width/depth/heads come only from
models.registry.GPT_SIZES via `size`.
"""

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

# SPEC "HAR generator": ResTok-L emits 128 tokens in levels [1,1,2,4,8,16,32,64]; 4 next-token steps.
RESTOK_L_LEVELS = [1, 1, 2, 4, 8, 16, 32, 64]

# Choices are declared once, as the fields' types (the config loader validates them).
GroupOrder = Literal["real_first", "interleaved"]
CfgSchedule = Literal["constant", "step", "linear"]
GROUP_ORDERS = get_args(GroupOrder)
CFG_SCHEDULES = get_args(CfgSchedule)


@dataclass
class GeneratorConfig:
    size: str = "L"  # models.registry.GPT_SIZES
    har: bool = True  # False = vanilla AR (plain causal, one token per step)
    # Vocabulary and level layout come from the tokenizer (never hard-coded); the pipeline fills
    # these from the tokenizer manifest.
    vocab_size: int = 8192
    levels: list[int] = field(default_factory=lambda: list(RESTOK_L_LEVELS))
    ar_tokens: int = 4  # next-token-predicted prefix; must end on a level boundary (paper Sec. 4)
    num_classes: int = 1000  # class table has num_classes + 1 rows, the null class = num_classes
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    norm_eps: float = 1e-5  # NOTES.md quirk 14
    rope_base: float = 10000.0
    init_std: float = 0.02  # N(0, 0.02) everywhere except the zero-initialised output layer
    ffn_multiple_of: int = 256  # SwiGLU hidden = int(8*dim/3) rounded up to this multiple
    # HAR group input order (quirk 15): "real_first" = previous level's real tokens, then mask
    # tokens (the release); "interleaved" = real and mask tokens alternate.
    har_group_order: GroupOrder = "real_first"
    # Rows of the mask-token table. None = exactly the rows the layout reads (63 for 128 tokens);
    # the release allocates block_size - 1 rows (127) of which only 63 are ever read (quirk 16).
    special_rows: int | None = None

    @property
    def block_size(self) -> int:
        return sum(self.levels)


@dataclass
class SamplingConfig:
    """Sampler arguments (SPEC "sampling"); `sample(gpt, labels, **asdict(cfg))` accepts these."""

    cfg_scale: float = 3.75
    cfg_schedule: CfgSchedule = "step"
    start_ratio: float = 0.25  # step schedule: full scale from this fraction of the passes on
    min_cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    # Quirk 19: below the window the release's step schedule returns 1.0001, not 1.0.
    release_cfg_floor: bool = False


def official_generator_config(
    vanilla: bool = False,
    size: str = "L",
    *,
    vocab_size: int = 8192,
    levels: list[int] | None = None,
    ar_tokens: int = 4,
    num_classes: int = 1000,
) -> GeneratorConfig:
    """The release's generator (HAR-L or vanilla GPT-L by default) with its quirks switched on."""
    levels = list(RESTOK_L_LEVELS if levels is None else levels)
    return GeneratorConfig(
        size=size,
        har=not vanilla,
        vocab_size=vocab_size,
        levels=levels,
        ar_tokens=ar_tokens,
        num_classes=num_classes,
        class_dropout=0.1,
        token_dropout=0.1,
        resid_dropout=0.1,
        ffn_dropout=0.1,
        attn_dropout=0.0,
        har_group_order="real_first",
        # Release formula (NOTES.md "Tiny generator"): (ar-1) + sum of HAR levels = block_size - 1.
        special_rows=None if vanilla else sum(levels) - 1,
    )


def official_sampling_config(**overrides) -> SamplingConfig:
    """The release's published recipe (SPEC "sampling"): CFG 3.75, step schedule from 0.25, top-p 0.95."""
    base = SamplingConfig(
        cfg_scale=3.75,
        cfg_schedule="step",
        start_ratio=0.25,
        min_cfg_scale=1.0,
        temperature=1.0,
        top_k=0,
        top_p=0.95,
        release_cfg_floor=True,
    )
    return replace(base, **overrides)
