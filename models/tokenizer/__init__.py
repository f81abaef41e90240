"""ResTok tokenizer (SPEC "Tokenizer"): `ResTok(TokenizerConfig)` with encode/decode/decode_codes.

Release weights: `convert_official_state_dict(sd, cfg)` with `official_tokenizer_config()` or
`tokenizer_config_from_official(release_yaml_dict)`.
"""

from models.tokenizer.config import (
    TokenizerConfig,
    official_tokenizer_config,
    tokenizer_config_for,
)
from models.tokenizer.official import (
    convert_official_state_dict,
    tokenizer_config_from_official,
)
from models.tokenizer.restok import ResTok

__all__ = [
    "ResTok",
    "TokenizerConfig",
    "convert_official_state_dict",
    "official_tokenizer_config",
    "tokenizer_config_for",
    "tokenizer_config_from_official",
]
