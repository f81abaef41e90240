"""HAR / vanilla GPT: sizes, layouts and masks, KV-cache decoding, pass counts, overfitting, errors."""

from dataclasses import replace

import pytest
import torch

from models.generator import (
    GPT,
    GeneratorConfig,
    build_layout,
    cfg_value,
    ffn_hidden_dim,
    filter_logits,
    har_groups,
    official_generator_config,
    sample,
)
from models.generator.layout import CLS, CODE, SPECIAL
from models.generator.official import StateDictMismatchError, load_state_dict_checked

L_LEVELS = [1, 1, 2, 4, 8, 16, 32, 64]
LEVEL_LISTS = [L_LEVELS, [1, 1, 2, 4, 8], [1, 1, 2, 4, 8, 16]]


def tiny_cfg(har=True, levels=(1, 1, 2, 4, 8), vocab=32, classes=5, **kw) -> GeneratorConfig:
    return GeneratorConfig(
        size="tiny",
        har=har,
        vocab_size=vocab,
        levels=list(levels),
        ar_tokens=4,
        num_classes=classes,
        class_dropout=0.0,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
        **kw,
    )


def random_model(cfg: GeneratorConfig, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.25)  # zero-init head would give all-zero logits
    return model


# ---- sizes ------------------------------------------------------------------------------------
def test_meta_parameter_counts_l():
    with torch.device("meta"):
        har = GPT(official_generator_config(vanilla=False, size="L"))
        vanilla = GPT(official_generator_config(vanilla=True, size="L"))
    assert sum(p.numel() for p in har.parameters()) == 326_263_808
    assert sum(p.numel() for p in vanilla.parameters()) == 326_133_760
    assert har.mask_token_embed.weight.shape == (127, 1024)  # release allocation (quirk 16)
    assert ffn_hidden_dim(1024) == 2816 and ffn_hidden_dim(64) == 256
    # Our default allocates only the rows the layout reads: 3 + 4 + 8 + 16 + 32 = 63.
    with torch.device("meta"):
        ours = GPT(GeneratorConfig(size="L"))
    assert ours.mask_token_embed.weight.shape == (63, 1024)


@pytest.mark.parametrize("size", ["B", "XL", "XXL"])
def test_registry_sizes_build_on_meta(size):
    with torch.device("meta"):
        model = GPT(GeneratorConfig(size=size, levels=[1, 1, 2, 4, 8]))
    assert model.dim % model.n_head == 0 and len(model.blocks) == model.n_layer


def test_init_zero_head_and_null_class():
    model = GPT(tiny_cfg())
    assert torch.count_nonzero(model.head.weight) == 0
    assert model.class_embed.weight.shape[0] == 6  # num_classes + 1, null row = num_classes
    std = model.blocks[0].attn.qkv.weight.std().item()
    assert 0.015 < std < 0.025


# ---- layout and mask --------------------------------------------------------------------------
def independent_mask(levels, ar_tokens):
    """Block-causal over the level blocks, bidirectional inside a block; first ar rows causal."""
    block = torch.repeat_interleave(torch.arange(len(levels)), torch.tensor(levels))
    allowed = block[None, :] <= block[:, None]
    n = sum(levels)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[:ar_tokens] = causal[:ar_tokens]
    return allowed


def independent_layout(levels, ar_tokens):
    """The release's construction: [cls, t0..t_{A-1}] then, per HAR level, the mask tokens that pad
    the previous real tokens up to the level size followed by that level's real tokens; cut to N."""
    seq = [(CLS, 0)] + [(CODE, j) for j in range(ar_tokens)]
    special, prev, first = 0, 1, ar_tokens
    for n in har_groups(levels, ar_tokens):
        seq += [(SPECIAL, special + i) for i in range(n - prev)]
        special += n - prev
        seq += [(CODE, first + j) for j in range(n)]
        prev, first = n, first + n
    return seq[: sum(levels)]


@pytest.mark.parametrize("levels", LEVEL_LISTS)
def test_har_layout_and_mask_equal_independent_construction(levels):
    layout = build_layout(levels, 4, har=True)
    assert list(zip(layout.kind, layout.index, strict=False)) == independent_layout(levels, 4)
    mask = layout.attention_mask()
    assert torch.equal(mask, independent_mask(levels, 4))
    n = sum(levels)
    # first 4 rows strictly causal and blind to position >= 4
    assert torch.equal(mask[:4], torch.ones(n, n, dtype=torch.bool).tril()[:4])
    start = 4
    for size in levels[3:]:
        blk = slice(start, start + size)
        assert mask[blk, : start + size].all()  # bidirectional inside, sees everything before
        assert not mask[blk, start + size :].any()  # never a later block
        start += size
    # the groups read distinct special rows, 0..used-1
    specials = [i for k, i in zip(layout.kind, layout.index, strict=False) if k == SPECIAL]
    assert specials == list(range(len(specials)))


def test_l_layout_matches_spec_string():
    layout = build_layout(L_LEVELS, 4)
    names = [
        ("cls" if k == CLS else f"t{i}" if k == CODE else f"M{i}")
        for k, i in zip(layout.kind, layout.index, strict=False)
    ]
    expected = (
        ["cls", "t0", "t1", "t2", "t3", "M0", "M1", "M2"]
        + [f"t{i}" for i in range(4, 8)]
        + [f"M{i}" for i in range(3, 7)]
        + [f"t{i}" for i in range(8, 16)]
        + [f"M{i}" for i in range(7, 15)]
        + [f"t{i}" for i in range(16, 32)]
        + [f"M{i}" for i in range(15, 31)]
        + [f"t{i}" for i in range(32, 64)]
        + [f"M{i}" for i in range(31, 63)]
    )
    assert names == expected and len(names) == 128


def test_interleaved_order_and_vanilla_layout():
    layout = build_layout([1, 1, 2, 4, 8], 4, group_order="interleaved")
    kinds = layout.kind[8:16]
    assert kinds == (CODE, SPECIAL) * 4 and layout.index[8:16:2] == (4, 5, 6, 7)
    vanilla = build_layout([1, 1, 2, 4, 8], 4, har=False)
    assert vanilla.kind == (CLS,) + (CODE,) * 15 and vanilla.index[1:] == tuple(range(15))
    assert torch.equal(vanilla.attention_mask(), torch.ones(16, 16, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    "levels,ar,msg",
    [([1, 1, 2, 4], 3, "level boundary"), ([1, 1, 2, 8, 4], 4, "shrink"), ([1, 1, 2], 9, "ar_tokens")],
)
def test_bad_level_lists_rejected(levels, ar, msg):
    with pytest.raises(ValueError, match=msg):
        build_layout(levels, ar)


# ---- KV-cache decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("har,order", [(True, "real_first"), (True, "interleaved"), (False, "real_first")])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_logits_equal_full_forward(har, order, cfg_scale):
    model = random_model(tiny_cfg(har=har, levels=[1, 1, 2, 4, 8, 16], har_group_order=order))
    labels = torch.tensor([0, 3, 4])
    gen = torch.Generator().manual_seed(7)
    res = sample(model, labels, cfg_scale=cfg_scale, top_p=0.9, generator=gen, record_logits=True)
    doubled = cfg_scale > 1
    full_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if doubled else labels
    full_codes = res.codes.repeat(2, 1) if doubled else res.codes
    with torch.no_grad():
        full = model(full_labels, full_codes)
    assert len(res.step_logits) == len(model.layout.steps)
    for step, logits in zip(model.layout.steps, res.step_logits, strict=False):
        assert (logits - full[:, step.start : step.end]).abs().max() < 1e-4


@pytest.mark.parametrize("har,passes", [(True, 9), (False, 128)])
def test_forward_pass_counts_for_128_tokens(har, passes):
    model = random_model(tiny_cfg(har=har, levels=L_LEVELS, vocab=64))
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    res = sample(
        model, torch.tensor([1, 2]), cfg_scale=2.0, top_k=5, generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) == res.num_forward_passes == len(res.step_times) == passes
    assert res.codes.shape == (2, 128) and res.codes.dtype == torch.long


def test_compiled_decode_compiles_every_har_pass_of_two_batch_sizes(monkeypatch):
    """HAR-L's 9 passes at 2 batch sizes are 18 static-shape graphs: past Dynamo's default limit
    (8 per function), so without the raised limit the widest passes ran eager. Traced with the
    "eager" backend (inductor's compile time is for GPU runs); codes equal the eager sampler's."""
    import torch._dynamo

    from models.generator import gpt as gpt_module

    monkeypatch.setattr(gpt_module, "COMPILED_DECODE_BACKEND", "eager")
    torch._dynamo.reset()
    model = random_model(tiny_cfg(levels=L_LEVELS, vocab=64))
    kw = {"cfg_scale": 2.0, "top_p": 0.9}
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    for batch in (1, 2):
        labels = torch.arange(batch) % 5
        compiled = sample(
            model, labels, generator=torch.Generator().manual_seed(3), compile_decode=True, **kw
        )
        eager = sample(model, labels, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(compiled.codes, eager.codes)
    assert counters["stats"]["unique_graphs"] - before == 2 * len(model.layout.steps) == 18
    torch._dynamo.reset()


def test_rope_table_stays_float32_when_the_model_is_cast():
    """The release keeps freqs_cis in fp32 whatever the model's dtype (DeepSpeed bf16 casts the
    module): a bf16 table would rotate by rounded angles."""
    model = GPT(tiny_cfg())
    table = model.rope.clone()
    model = model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32 and torch.equal(model.rope, table)
    assert model.head.weight.dtype == torch.bfloat16


def test_seeded_sampling_is_reproducible():
    model = random_model(tiny_cfg())
    labels = torch.tensor([1, 2, 3])
    kw = {"cfg_scale": 2.0, "cfg_schedule": "linear", "temperature": 1.3, "top_k": 20, "top_p": 0.9}
    a = sample(model, labels, generator=torch.Generator().manual_seed(11), **kw).codes
    b = sample(model, labels, generator=torch.Generator().manual_seed(11), **kw).codes
    c = sample(model, labels, generator=torch.Generator().manual_seed(12), **kw).codes
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- sampling maths ---------------------------------------------------------------------------
def test_cfg_schedules():
    assert [cfg_value(i, 9, 3.75, "step", 0.25, release_cfg_floor=True) for i in range(3)] == [
        1.0001,
        1.0001,
        3.75,
    ]
    assert cfg_value(0, 9, 3.75, "step", 0.25) == 1.0
    assert cfg_value(4, 9, 3.0, "linear") == pytest.approx(2.0)
    assert cfg_value(0, 9, 3.0, "constant") == 3.0
    with pytest.raises(ValueError, match="valid"):
        cfg_value(0, 9, 3.0, "cosine")


def test_top_k_then_hf_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # keeps the token that crosses 0.7
    kept = torch.isfinite(filter_logits(logits, top_p=0.79))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=1)).sum() == 1


def test_top_p_from_candidates_matches_full_sort():
    """top_p_remove keeps exactly the full-sort HF nucleus, on peaked rows (decided by the top
    candidates) and on flat rows (full-sort fallback), with and without top-k before it."""
    from models.generator.sampling import _top_p_remove_sorted, top_p_remove

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(64, 512, generator=g) * s for s in (0.3, 3.0, 12.0)])
    for top_p in (0.5, 0.9, 0.95):
        for x in (logits, filter_logits(logits, top_k=20)):
            sorted_logits, order = torch.sort(x, dim=-1, descending=True)
            rem = _top_p_remove_sorted(sorted_logits, top_p)
            ref = rem.scatter(-1, order, rem)
            assert torch.equal(top_p_remove(x, top_p, candidates=16), ref)


def test_inference_fast_path_matches_autograd_path():
    """The in-place RoPE/RMSNorm/SwiGLU/residual inference path gives the autograd path's logits."""
    for har in (True, False):
        model = random_model(tiny_cfg(har=har))
        labels, codes = torch.tensor([0, 3]), torch.randint(0, 32, (2, model.block_size))
        with torch.no_grad():
            fast = model(labels, codes)
        slow = model(labels, codes)
        assert slow.requires_grad
        torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("har", [True, False])
def test_tiny_generator_overfits_and_samples_back(har):
    torch.manual_seed(0)
    cfg = tiny_cfg(har=har, vocab=16, classes=4)
    model = GPT(cfg)
    labels = torch.arange(4)
    codes = torch.randint(0, 16, (4, cfg.block_size), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model(labels, codes).flatten(0, 1), codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    res = sample(model, labels, cfg_scale=1.0, top_k=1)
    assert torch.equal(res.codes, codes)
    res = sample(
        model, labels, cfg_scale=1.5, temperature=0.5, top_p=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(res.codes, codes)


def test_class_dropout_uses_null_class_in_training_only():
    model = GPT(replace(tiny_cfg(), class_dropout=1.0))
    labels = torch.tensor([0, 1])
    model.train()
    assert torch.equal(model.class_embedding(labels), model.class_embed.weight[[5, 5]])
    model.eval()
    assert torch.equal(model.class_embedding(labels), model.class_embed.weight[[0, 1]])


# ---- errors -----------------------------------------------------------------------------------
def test_mismatched_own_state_dict_fails_with_one_line():
    model = GPT(tiny_cfg())
    state = model.state_dict()
    state.pop("blocks.1.ffn.up.weight")
    state["token_embed.weight"] = torch.zeros(7, 64)
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_checked(GPT(tiny_cfg()), state)
    msg = str(err.value)
    assert "\n" not in msg and "blocks.1.ffn.up.weight" in msg and "token_embed.weight (7, 64)" in msg


def test_wrong_code_length_is_one_clear_error():
    model = GPT(tiny_cfg())
    with pytest.raises(ValueError, match=r"codes must be \(B, 16\)"):
        model(torch.tensor([0]), torch.zeros(1, 15, dtype=torch.long))


def test_config_is_omegaconf_compatible():
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(tiny_cfg(special_rows=20))
    conf.levels = [1, 1, 2, 4, 8, 16]
    model = GPT(conf)  # a DictConfig works as well as the dataclass
    assert model.block_size == 32 and model.mask_token_embed.weight.shape[0] == 20
    assert isinstance(OmegaConf.to_object(conf), GeneratorConfig)
