"""Key mapping between the authors' release (LlamaGen-derived `gpt_har` / `gpt_vanilla` Transformer,
commit e0059cb) and our GPT, with strict shape checks (issue 9).

Every release key maps one-to-one; no tensor is reshaped. A mismatch raises StateDictMismatchError
whose message is one line listing missing, unexpected and mis-shaped keys.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from models.generator.config import GeneratorConfig, official_generator_config
from models.generator.gpt import GPT
from models.registry import GPT_SIZES

# (release regex, our replacement); applied in order, the first match wins.
OFFICIAL_KEY_RULES: list[tuple[str, str]] = [
    (r"^cls_embedding\.embedding_table\.weight$", "class_embed.weight"),
    (r"^tok_embeddings\.weight$", "token_embed.weight"),
    (r"^spe_tok_embeddings\.special_embeddings\.weight$", "mask_token_embed.weight"),
    (r"^layers\.(\d+)\.attention\.wqkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"blocks.\1.attn.proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"blocks.\1.ffn.gate.weight"),  # silu branch
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"blocks.\1.ffn.up.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"blocks.\1.ffn.down.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"blocks.\1.attn_norm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"blocks.\1.ffn_norm.weight"),
    (r"^norm\.weight$", "final_norm.weight"),
    (r"^output\.weight$", "head.weight"),
]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


class StateDictMismatchError(ValueError):
    """One-line report of missing / unexpected / mis-shaped keys."""


def official_key_to_ours(key: str) -> str | None:
    for pattern, repl in OFFICIAL_KEY_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _shape(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)


def check_state_dict(
    expected: Mapping[str, tuple], got: Mapping[str, object], what: str, unexpected: tuple = ()
) -> None:
    """Raise StateDictMismatchError (one line) unless `got` has exactly the keys and shapes expected."""
    missing = [k for k in expected if k not in got]
    extra = list(unexpected) + [k for k in got if k not in expected]
    wrong = [
        f"{k} {_shape(got[k])} != {tuple(expected[k])}"
        for k in expected
        if k in got and _shape(got[k]) != tuple(expected[k])
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        if wrong:
            parts.append(f"wrong shape [{'; '.join(wrong)}]")
        raise StateDictMismatchError(f"{what}: " + ", ".join(parts))


def expected_shapes(cfg: GeneratorConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe(cfg: GeneratorConfig) -> str:
    kind = "HAR" if cfg.har else "vanilla AR"
    return f"GPT-{cfg.size} ({kind}, vocab {cfg.vocab_size}, levels {list(cfg.levels)})"


def unwrap_checkpoint(obj: Mapping) -> dict:
    """The model weights inside a release/LlamaGen checkpoint: prefers 'ema', then 'model',
    'state_dict', 'module'; drops optimizer state and strips DDP/compile prefixes."""
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def convert_official_state_dict(state: Mapping[str, object], cfg: GeneratorConfig) -> dict:
    """Release keys -> ours, checked against GPT(cfg). Values pass through unchanged."""
    state = unwrap_checkpoint(state)
    converted, unmapped = {}, []
    for key, value in state.items():
        ours = official_key_to_ours(key)
        if ours is None:
            unmapped.append(key)
        else:
            converted[ours] = value
    check_state_dict(
        expected_shapes(cfg), converted, f"release checkpoint vs {describe(cfg)}", unexpected=tuple(unmapped)
    )
    return converted


def load_state_dict_checked(model: GPT, state: Mapping[str, torch.Tensor]) -> GPT:
    """Strict load of our own state dict with the one-line mismatch message."""
    check_state_dict(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        state,
        f"state dict vs {describe(model.cfg)}",
    )
    model.load_state_dict(state, strict=True)
    return model


def infer_official_config(
    state: Mapping[str, object], vanilla: bool = False, levels: list[int] | None = None, ar_tokens: int = 4
) -> GeneratorConfig:
    """Size, vocabulary and class count from tensor shapes; levels must come from the tokenizer
    (default ResTok-L's), and must agree with the release's block_size - 1 special rows."""
    state = unwrap_checkpoint(state)
    try:
        n_classes_1, dim = _shape(state["cls_embedding.embedding_table.weight"])
        vocab = _shape(state["tok_embeddings.weight"])[0]
    except KeyError as e:
        raise StateDictMismatchError(f"release checkpoint: missing {[e.args[0]]}") from None
    n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    sizes = [n for n, s in GPT_SIZES.items() if s.dim == dim and s.n_layer == n_layer]
    if not sizes:
        raise StateDictMismatchError(
            f"release checkpoint: no GPT size with dim {dim} and {n_layer} layers "
            f"in models.registry.GPT_SIZES ({sorted(GPT_SIZES)})"
        )
    cfg = official_generator_config(
        vanilla, sizes[0], vocab_size=vocab, levels=levels, ar_tokens=ar_tokens, num_classes=n_classes_1 - 1
    )
    return cfg


def read_checkpoint(path: str | Path) -> dict:
    """safetensors, or a torch file loaded with weights_only=True (refuses arbitrary pickles)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file
        raise StateDictMismatchError(
            f"{path}: cannot be loaded with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_official_generator(
    path: str | Path | Mapping,
    vanilla: bool = False,
    levels: list[int] | None = None,
    ar_tokens: int = 4,
    cfg: GeneratorConfig | None = None,
) -> tuple[GPT, GeneratorConfig]:
    """Build our GPT from a release checkpoint (file path or state dict) in eval mode."""
    state = read_checkpoint(path) if isinstance(path, (str, Path)) else dict(path)
    cfg = cfg or infer_official_config(state, vanilla, levels, ar_tokens)
    converted = convert_official_state_dict(state, cfg)
    model = GPT(cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in converted.items()}, strict=True)
    return model.eval(), cfg
