"""Loading the authors' released ResTok weights (commit e0059cb; fixtures/official/NOTES.md).

Our module names equal the release's, so the key map is the identity once training-checkpoint
wrappers, `module.`/`_orig_mod.` prefixes and the frozen DINOv3 teacher (`foundation_model.*`)
are removed. The checks are real: every expected key present, nothing left over, every shape equal.
"""

from collections.abc import Mapping

import torch

from models.tokenizer.config import (
    TokenizerConfig,
    levels_for,
    official_tokenizer_config,
)
from models.tokenizer.restok import ResTok

# Wrappers a training checkpoint may nest the weights under, tried in this order.
_WRAPPERS = ("state_dict", "model", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_DROP_PREFIXES = ("foundation_model.",)  # frozen DINOv3 teacher, not part of the tokenizer
_VF_HEAD_PREFIXES = ("vf_proj.", "vf_proj_dec.", "decoder.feat_mask_token")


def tokenizer_config_from_official(release: Mapping) -> TokenizerConfig:
    """Our config from a release config (`model.vq_model` + `dataset.preprocessing`, as in
    restok_tiny.json's `config`). Keys without an effect on the model are ignored."""
    vq = release["model"]["vq_model"]
    crop = release.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    if not (vq.get("vae_encoder", True) and vq.get("multi_quant", True)):
        raise ValueError("release config: only vae_encoder=True, multi_quant=True are supported")
    if vq.get("learnable_latent_tokens", False):
        raise ValueError("release config: learnable_latent_tokens=True is not supported")
    # The release's latent_hierarchy changes only the latent init (False: area interpolation of the
    # raster to N latents); its mask over latent levels is always on. Ours is that mask.
    if not vq.get("latent_hierarchy", True):
        raise ValueError("release config: latent_hierarchy=False (flat area latent init) is not supported")
    if vq["vit_enc_model_size"] != vq["vit_dec_model_size"]:
        raise ValueError("release config: encoder and decoder sizes must match")
    ratio = float(vq.get("reduction_ratio", 0.5))
    enc_vf = bool(vq.get("use_vf")) and bool(vq.get("encoder_feature_supervision"))
    dec_vf = bool(vq.get("use_vf")) and bool(vq.get("decoder_feature_supervision"))
    cfg = official_tokenizer_config(
        vq["vit_enc_model_size"],
        image_size=int(crop),
        num_tokens=int(vq["num_latent_tokens"]),
        codebook_size=int(vq["codebook_size"]),
        pixel_channels=int(vq.get("pixel_hidden_channels", 128)),
    )
    cfg.code_dim = int(vq["token_size"])
    cfg.commitment = float(vq.get("commitment_cost", 0.25))
    cfg.num_scales = int(vq.get("hierarchy_stages", 4)) if vq.get("merge_tokens", True) else 1
    cfg.merge_factor = round(1 / ratio)
    cfg.residual_image = bool(vq.get("residual_image_tokens", True))
    cfg.residual_latent = bool(vq.get("residual_latent_tokens", True))
    cfg.legacy_reshape = bool(vq.get("is_legacy", True))
    cfg.rope_theta = float(vq.get("rope_base_len", 10000))
    cfg.min_tokens = int(vq.get("num_min_tokens", 4))
    cfg.nested_dropout = bool(vq.get("drop_latent_tokens", True))
    cfg.nested_dropout_prob = float(vq.get("drop_prob", 0.2))
    cfg.vf_align = {
        (True, True): "both",
        (True, False): "encoder",
        (False, True): "decoder",
        (False, False): "none",
    }[(enc_vf, dec_vf)]
    cfg.levels = levels_for(int(vq["num_latent_tokens"]))
    return cfg.validate()


def _unwrap(sd: Mapping) -> Mapping:
    for key in _WRAPPERS:
        inner = sd.get(key)
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            return _unwrap(inner)
    return sd


def expected_shapes(cfg: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's key -> shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = ResTok(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_official_state_dict(
    sd: Mapping, cfg: TokenizerConfig, drop_vf_heads_if_unused: bool = True
) -> dict:
    """Release state dict (or training checkpoint) -> our ResTok state dict for `cfg`.

    Drops `foundation_model.*` and non-tensor entries; VF heads are dropped when `cfg` has none
    (a training checkpoint loaded for inference). Raises one ValueError listing every missing,
    unexpected and mis-shaped key."""
    sd = _unwrap(sd)
    want = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not torch.is_tensor(value):
            continue  # step counters, optimizer state, config blobs of a training checkpoint
        name = key
        while name not in want and name.startswith(_STRIP_PREFIXES):
            name = name.split(".", 1)[1]
        if name.startswith(_DROP_PREFIXES):
            continue
        if drop_vf_heads_if_unused and name not in want and name.startswith(_VF_HEAD_PREFIXES):
            continue
        out[name] = value
    missing = sorted(set(want) - set(out))
    unexpected = sorted(set(out) - set(want))
    misshaped = sorted(
        f"{k} {tuple(out[k].shape)} != {want[k]}"
        for k in set(want) & set(out)
        if tuple(out[k].shape) != want[k]
    )
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items)}")
        raise ValueError("official ResTok state dict does not match the config: " + "; ".join(parts))
    return out
