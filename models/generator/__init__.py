"""HAR generator and vanilla AR (LlamaGen-style GPT), samplers and release weight mapping."""

from models.generator.config import (
    GeneratorConfig,
    SamplingConfig,
    official_generator_config,
    official_sampling_config,
)
from models.generator.gpt import GPT, KVCache, ffn_hidden_dim
from models.generator.layout import Layout, build_layout, har_groups, layout_for
from models.generator.sampling import (
    SampleResult,
    cfg_value,
    draw,
    filter_logits,
    sample,
)

__all__ = [
    "GPT",
    "GeneratorConfig",
    "KVCache",
    "Layout",
    "SampleResult",
    "SamplingConfig",
    "build_layout",
    "cfg_value",
    "draw",
    "ffn_hidden_dim",
    "filter_logits",
    "har_groups",
    "layout_for",
    "official_generator_config",
    "official_sampling_config",
    "sample",
]
