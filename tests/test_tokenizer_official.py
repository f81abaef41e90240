"""ResTok vs the authors' release: golden fixtures (tests/fixtures/official/, NOTES.md).

Nothing here depends on the stored values: the config is read from restok_tiny.json and every
stored tensor is compared by name, so any fixture set made the same way passes.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tokenizer import ResTok, tokenizer_config_for
from models.tokenizer.official import (
    convert_official_state_dict,
    tokenizer_config_from_official,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
LATENT_ATOL = 1e-5  # NOTES.md "Suggested limits": latents and intermediates
RECON_ATOL = 1e-4  # reconstructions (random pixel decoder amplifies ~1e-7 to ~1e-5)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """Release latents (B, D, 1, N) -> our token-major (B, N, D)."""
    return t.flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def fixture():
    meta = json.loads((FIXTURES / "restok_tiny.json").read_text())
    cfg = tokenizer_config_from_official(meta["config"])
    model = ResTok(cfg).eval()
    sd = load_file(str(FIXTURES / "restok_tiny.safetensors"))
    model.load_state_dict(convert_official_state_dict(sd, cfg), strict=True)
    io = load_file(str(FIXTURES / "restok_tiny_io.safetensors"))
    with torch.no_grad():
        zq, info = model.encode(io["images"])
        fmap, _ = model.decoder(zq, None)
        fmap8, _ = model.decoder(zq, model._keep_tensor(8, zq.shape[0], zq.device))
        ours = {
            "pixel_encoder_out": info["pixel_encoder_out"],
            "latent_init": info["latent_init"],
            "enc_latents_ln_post": info["latents_ln_post"],
            "z_pre_quant": info["z_pre_quant"],
            "z_quantized": zq,
            "decoder_vit_out": fmap,
            "decoder_vit_out_first8": fmap8,
            "recon": model.decode(zq),
            "recon_first8": model.decode(zq, keep=8),
            "recon_from_codes": model.decode_codes(info["codes"]),
        }
    return meta, model, io, ours, info


def test_structure_matches_json(fixture):
    meta, model, _, _, _ = fixture
    d = meta["derived_structure"]
    assert model.encoder.merge_blocks == d["merging_blocks"]
    assert list(model.grid) == d["grid"]
    assert model.levels == d["latent_level_sizes"]
    assert [list(g) for g in model.encoder.latent_pool_grids] == d["latent_pooling_patch_sizes"]
    assert sum(p.numel() for p in model.parameters()) == meta["parameter_count_total"]
    assert list(model.state_dict()) == [k["key"] for k in meta["keys"]]
    assert model.cfg == tokenizer_config_for("tiny-fixture")  # the named preset is this model


def test_codes_exact(fixture):
    _, _, io, _, info = fixture
    stored = io["codes"].reshape(info["codes"].shape)
    assert info["codes"].dtype == torch.long
    assert torch.equal(info["codes"], stored)


def test_intermediates_and_latents(fixture):
    _, _, io, ours, _ = fixture
    for name in (
        "pixel_encoder_out",
        "latent_init",
        "enc_latents_ln_post",
        "decoder_vit_out",
        "decoder_vit_out_first8",
    ):
        torch.testing.assert_close(ours[name], io[name], atol=LATENT_ATOL, rtol=0, msg=name)
    for name in ("z_pre_quant", "z_quantized"):
        torch.testing.assert_close(ours[name], _tokens(io[name]), atol=LATENT_ATOL, rtol=0, msg=name)


def test_reconstructions(fixture):
    _, _, io, ours, _ = fixture
    for name in ("recon", "recon_first8", "recon_from_codes"):
        torch.testing.assert_close(ours[name], io[name], atol=RECON_ATOL, rtol=0, msg=name)


def test_rope_tables_and_masks(fixture):
    _, model, io, _, _ = fixture
    layouts = model.encoder.layouts(torch.device("cpu"))
    n_blocks = len(model.encoder.blocks)
    assert sum(k.startswith("enc_attn_allowed_block") for k in io) == n_blocks
    for b in range(n_blocks):
        layout = layouts[model.encoder.layout_of_block[b]]
        assert torch.equal(layout.mask, io[f"enc_attn_allowed_block{b}"]), f"mask block {b}"
        torch.testing.assert_close(layout.rope_matrices(), io[f"enc_rope_block{b}"], atol=LATENT_ATOL, rtol=0)
    torch.testing.assert_close(
        model.decoder.layout(torch.device("cpu")).rope_matrices(), io["dec_rope"], atol=LATENT_ATOL, rtol=0
    )


def test_eval_forward_equals_encode_decode(fixture):
    _, model, io, ours, info = fixture
    with torch.no_grad():
        recon, aux = model(io["images"])
    assert torch.equal(recon, ours["recon"])
    assert torch.equal(aux["codes"], info["codes"])


# -- full size -----------------------------------------------------------------------------


def _l_listing():
    return json.loads((FIXTURES / "restok_l_keys.json").read_text())


@pytest.mark.parametrize("vf", [False, True])
def test_restok_l_keys_convert_and_count(vf):
    listing = _l_listing()
    keys = [k for k in listing["keys_with_vf"] if vf or not k["vf_only"]]
    sd = {k["key"]: torch.empty(k["shape"], device="meta") for k in keys}
    # A training checkpoint also carries the frozen teacher; it must be dropped.
    sd["foundation_model.model.blocks.0.attn.qkv.weight"] = torch.empty(3, 3, device="meta")
    cfg = tokenizer_config_for("official-l-vf" if vf else "official-l")
    out = convert_official_state_dict(sd, cfg)
    assert len(out) == (listing["num_keys_with_vf"] if vf else listing["num_keys_without_vf"])
    with torch.device("meta"):
        model = ResTok(cfg)
    model.load_state_dict(out, strict=True, assign=True)
    total = sum(p.numel() for p in model.parameters())
    assert total == (
        listing["total_params_with_vf_heads"] if vf else listing["total_params_without_vf_heads"]
    )
    by_prefix = listing["params_by_prefix_with_vf"]
    assert sum(p.numel() for p in model.encoder.parameters()) == by_prefix["encoder"]
    if vf:
        assert sum(p.numel() for p in model.decoder.parameters()) == by_prefix["decoder"]
    for part in ("encoder", "decoder"):  # SPEC: each ViT about 302.7M
        n = sum(p.numel() for p in getattr(model, part).parameters())
        assert abs(n - 302.7e6) < 0.05e6


def test_l_numbers_from_spec():
    """The JSON listing itself agrees with the numbers the issue quotes."""
    listing = _l_listing()
    assert listing["total_params_without_vf_heads"] == 659_693_771
    assert listing["total_params_with_vf_heads"] == 661_791_947


# -- mismatched checkpoints ----------------------------------------------------------------


def _tiny_sd():
    return load_file(str(FIXTURES / "restok_tiny.safetensors"))


def _tiny_cfg():
    meta = json.loads((FIXTURES / "restok_tiny.json").read_text())
    return tokenizer_config_from_official(meta["config"])


def test_wrong_shape_and_missing_key_fail_in_one_line():
    sd = _tiny_sd()
    sd["encoder.ln_pre.weight"] = torch.zeros(3)
    del sd["quantize.embedding.weight"]
    sd["decoder.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_official_state_dict(sd, _tiny_cfg())
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing: quantize.embedding.weight" in msg
    assert "unexpected: decoder.bogus" in msg
    assert "mis-shaped: encoder.ln_pre.weight (3,)" in msg


def test_release_weights_do_not_fit_the_clean_config():
    cfg = _tiny_cfg()
    cfg.cnn_shortcut_on_branch = False  # clean shortcut has in->out shapes (NOTES #3)
    with pytest.raises(ValueError, match="mis-shaped: pixel_"):
        convert_official_state_dict(_tiny_sd(), cfg)


def test_training_checkpoint_wrapper_is_unwrapped():
    sd = {"model": {f"module.{k}": v for k, v in _tiny_sd().items()}, "step": 3, "optimizer": {"lr": 1e-4}}
    out = convert_official_state_dict(sd, _tiny_cfg())
    meta = json.loads((FIXTURES / "restok_tiny.json").read_text())
    assert "encoder.ln_pre.weight" in out and len(out) == meta["num_keys"]


def test_restok_l_runs_shape_only_on_meta():
    """Shape/FLOP planning without memory: a full L training forward on the meta device."""
    with torch.device("meta"):
        model = ResTok(tokenizer_config_for("official-l-vf")).train()
        recon, aux = model(torch.empty(1, 3, 256, 256))
    assert recon.shape == (1, 3, 256, 256) and aux["codes"].shape == (1, 128)
    assert aux["vf_dec_feat"].shape == (1, 256, 1024) and aux["vf_enc_feat"].shape == (1, 1024)


def test_release_latent_hierarchy_flag_is_an_init_not_our_mask():
    """The release's latent_hierarchy=False swaps the latent init (area interpolation) and keeps
    its mask; our latent_hierarchy is the mask, so such a config is refused, never mis-built."""
    meta = json.loads((FIXTURES / "restok_tiny.json").read_text())
    assert tokenizer_config_from_official(meta["config"]).latent_hierarchy
    meta["config"]["model"]["vq_model"]["latent_hierarchy"] = False
    with pytest.raises(ValueError, match="latent_hierarchy=False"):
        tokenizer_config_from_official(meta["config"])
