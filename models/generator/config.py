"""Generator configuration (a plain dataclass; configs/schema.py embeds it as `generator`)."""
from dataclasses import dataclass, field


@dataclass
class GeneratorConfig:
    size: str = "L"  # models.registry.GPT_SIZES
    har: bool = True  # False = vanilla AR (plain causal, one token per step)
    # Vocabulary and level layout come from the tokenizer (never hard-coded); the pipeline fills
    # these from the tokenizer manifest.
    vocab_size: int = 8192
    levels: list[int] = field(default_factory=lambda: [1, 1, 2, 4, 8, 16, 32, 64])
    ar_tokens: int = 4
    num_classes: int = 1000
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
