"""Our GPT + samplers against the release's golden generator fixtures (tests/fixtures/official/GENERATOR.md).

Only the configuration is read from har_tiny.json / har_l_keys.json; no test depends on a stored
tensor value, so any fixture set made the same way (other seeds, labels, inputs) must pass.
"""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.generator import GPT, official_generator_config, sample
from models.generator.official import (
    StateDictMismatchError,
    convert_official_state_dict,
    load_official_generator,
    read_checkpoint,
)
from models.registry import GPT_SIZES

FIXTURES = Path(__file__).parent / "fixtures" / "official"
SPECIAL_KEY = "spe_tok_embeddings.special_embeddings.weight"
LOGIT_ATOL = 1e-5  # NOTES.md "Tolerances"


def _size_name(args: dict) -> str:
    for name, s in GPT_SIZES.items():
        if (s.dim, s.n_layer, s.n_head) == (args["dim"], args["n_layer"], args["n_head"]):
            return name
    raise AssertionError(f"no registry size for {args}")


def _config(meta: dict, vanilla: bool):
    g = meta["generator_config_(model.generator)"]
    levels = meta["derived_structure"]["level_sizes"]
    assert sum(levels) == g["block_size"]
    cfg = official_generator_config(
        vanilla,
        _size_name(meta["har_ModelArgs"]),
        vocab_size=g["vocab_size"],
        levels=levels,
        ar_tokens=g["ar_token_num"],
        num_classes=g["num_classes"],
    )
    if not vanilla:
        assert cfg.special_rows == g["spe_token_num"]  # release formula (ar-1)+... = block_size - 1
    return cfg


def _sampler_kwargs(spec: dict) -> dict:
    kw = spec["kw"]
    sched = kw.get("cfg_schedule_kwargs", {})
    return {
        "cfg_scale": kw["cfg_scale"],
        "cfg_schedule": kw["cfg_schedule"],
        "start_ratio": sched.get("window_start", 0.0),
        "min_cfg_scale": sched.get("min_cfg_scale", 1.0),
        "temperature": kw["temperature"],
        "top_k": kw["top_k"],
        "top_p": kw["top_p"],
        "release_cfg_floor": True,
    }


def _seed(spec: dict) -> int:
    m = re.search(r"manual_seed\((\d+)\)", spec.get("seed", ""))
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="module")
def fx():
    meta = json.loads((FIXTURES / "har_tiny.json").read_text())
    io = load_file(str(FIXTURES / "har_tiny_io.safetensors"))
    weights = load_file(str(FIXTURES / "har_tiny.safetensors"))
    har, _ = load_official_generator(weights, cfg=_config(meta, vanilla=False))
    vanilla_weights = {k: v for k, v in weights.items() if k != SPECIAL_KEY}
    vanilla, _ = load_official_generator(vanilla_weights, cfg=_config(meta, vanilla=True))
    return meta, io, weights, har, vanilla


def test_release_state_dicts_convert_with_release_parameter_counts(fx):
    meta, _, weights, har, vanilla = fx
    assert len(weights) == meta["num_keys"]
    assert sum(p.numel() for p in har.parameters()) == meta["parameter_count_har"]
    assert sum(p.numel() for p in vanilla.parameters()) == meta["parameter_count_vanilla"]


def test_training_layout_mask_rope_and_input_embeddings(fx):
    _, io, _, har, _ = fx
    labels, tokens = io["labels"], io["tokens"]
    kind, index = har.layout.kind_tensor(), har.layout.index_tensor()
    assert torch.equal(kind, io["har_layout_kind"])
    not_cls = kind != 0
    assert torch.equal(index[not_cls], io["har_layout_index"][not_cls])
    assert int(io["har_layout_index"][~not_cls][0]) in labels.tolist()  # cls slot stores a label
    assert torch.equal(har.layout.attention_mask(), io["har_attn_allowed"])
    n = io["har_freqs_cis"].shape[0]
    torch.testing.assert_close(har.rope[:n], io["har_freqs_cis"], atol=1e-6, rtol=0)
    with torch.no_grad():
        emb = har.embed_layout(labels, tokens)
    torch.testing.assert_close(emb, io["har_input_embeddings"], atol=1e-6, rtol=0)


def test_full_forward_logits(fx):
    _, io, _, har, vanilla = fx
    labels, tokens = io["labels"], io["tokens"]
    with torch.no_grad():
        har_logits = har(labels, tokens)
        # The release's vanilla forward sees all N codes: [cls, t0..t_{N-1}] (N+1 logits, quirk 22).
        h = torch.cat([vanilla.class_embed(labels)[:, None], vanilla.token_embed(tokens)], dim=1)
        vanilla_full = vanilla.forward_embeddings(h, is_causal=True)
        vanilla_train = vanilla(labels, tokens)  # our training call: [cls, t0..t_{N-2}]
    assert (har_logits - io["har_logits"]).abs().max() <= LOGIT_ATOL
    assert (vanilla_full - io["vanilla_logits"]).abs().max() <= LOGIT_ATOL
    assert (vanilla_train - io["vanilla_logits"][:, :-1]).abs().max() <= LOGIT_ATOL


def _count_passes(model):
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("run", ["har_greedy", "har_sample"])
def test_har_sampling_matches_release(fx, run):
    meta, io, _, har, _ = fx
    spec = meta["sampler_arguments"][run]
    calls, handle = _count_passes(har)
    torch.manual_seed(_seed(spec))  # release order on the global RNG (quirk 18)
    result = sample(har, io["labels"], record_logits=True, **_sampler_kwargs(spec))
    handle.remove()
    assert len(calls) == result.num_forward_passes == meta["forward_passes"][run] == 7
    assert result.cfg_values == pytest.approx(meta["cfg_value_per_forward_pass"][run])
    for i, (step, logits) in enumerate(zip(har.layout.steps, result.step_logits, strict=False)):
        assert torch.equal(torch.arange(step.start, step.end), io[f"{run}_step{i}_input_pos"])
        assert (logits - io[f"{run}_step{i}_logits"]).abs().max() <= LOGIT_ATOL, f"pass {i}"
    assert torch.equal(result.codes, io[f"{run}_codes"])


@pytest.mark.parametrize("run", ["vanilla_greedy", "vanilla_sample"])
def test_vanilla_sampling_matches_release(fx, run):
    meta, io, _, _, vanilla = fx
    spec = meta["sampler_arguments"][run]
    calls, handle = _count_passes(vanilla)
    torch.manual_seed(_seed(spec))
    result = sample(vanilla, io["labels"], record_logits=True, **_sampler_kwargs(spec))
    handle.remove()
    assert len(calls) == result.num_forward_passes == meta["forward_passes"][run] == 32
    for i in range(2):
        key = f"{run}_step{i}_logits"
        if key in io:
            assert (result.step_logits[i] - io[key]).abs().max() <= LOGIT_ATOL
    assert torch.equal(result.codes, io[f"{run}_codes"])


def test_release_cache_mask_agrees_with_prefix_attention(fx):
    """Our decode steps attend keys [0, end) with no mask; the release's cache mask says the same
    for every query it ever issues (quirk 17)."""
    _, io, _, har, _ = fx
    allowed = io["har_cache_attn_allowed"]
    n = har.block_size
    for step in har.layout.steps:
        rows = allowed[step.start : step.end, :n]
        assert rows[:, : step.end].all() and not rows[:, step.end :].any()


def _l_state(meta: dict, vanilla: bool) -> dict:
    return {
        k["key"]: torch.empty(k["shape"], device="meta")
        for k in meta["keys_har"]
        if not (vanilla and k["har_only"])
    }


@pytest.mark.parametrize("vanilla", [False, True])
def test_l_listing_converts_without_leftover_and_counts_match(vanilla):
    meta = json.loads((FIXTURES / "har_l_keys.json").read_text())
    state = _l_state(meta, vanilla)
    cfg = official_generator_config(vanilla, "L")
    converted = convert_official_state_dict(state, cfg)
    assert len(converted) == len(state) == meta["num_keys_vanilla" if vanilla else "num_keys_har"]
    with torch.device("meta"):
        model = GPT(cfg)
    assert set(converted) == set(model.state_dict())
    total = sum(p.numel() for p in model.parameters())
    assert total == meta["total_params_vanilla" if vanilla else "total_params_har"]
    assert total == (326_133_760 if vanilla else 326_263_808)


def test_mismatched_release_state_dict_fails_with_one_line(fx):
    meta, _, weights, _, _ = fx
    bad = dict(weights)
    bad.pop("layers.0.attention.wo.weight")
    bad["output.weight"] = torch.zeros(3, 3)
    bad["some.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as err:
        convert_official_state_dict(bad, _config(meta, vanilla=False))
    msg = str(err.value)
    assert "\n" not in msg
    for key in (
        "blocks.0.attn.proj.weight",
        "head.weight",
        "some.extra.weight",
        "missing",
        "unexpected",
        "wrong shape",
    ):
        assert key in msg
    # A HAR checkpoint into the vanilla model: the special table is unexpected.
    with pytest.raises(StateDictMismatchError, match="mask_token_embed"):
        convert_official_state_dict(weights, _config(meta, vanilla=True))


def test_training_checkpoint_wrapper_and_refused_pickle(fx, tmp_path):
    meta, _, weights, har, _ = fx
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "optimizer": {}, "steps": 3}, path)
    model, _ = load_official_generator(read_checkpoint(path), cfg=_config(meta, vanilla=False))
    assert torch.equal(model.head.weight, har.head.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(StateDictMismatchError) as err:
        read_checkpoint(evil)
    assert "\n" not in str(err.value) and "evil.pt" in str(err.value)
