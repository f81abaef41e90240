"""ResTok tokenizer (SPEC "Tokenizer"): `ResTok(TokenizerConfig)` with encode/decode/decode_codes."""
from models.tokenizer.config import (TokenizerConfig, official_tokenizer_config,
                                     tokenizer_config_for)
from models.tokenizer.restok import ResTok

__all__ = ["ResTok", "TokenizerConfig", "official_tokenizer_config", "tokenizer_config_for"]
