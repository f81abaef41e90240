"""`restok convert`: the authors' released checkpoints -> our exports, and fixture verification.

    restok convert official-tokenizer SRC DST [--config RELEASE.yaml|json]
    restok convert official-tokenizer DST --from-hub REPO_ID
    restok convert official-generator SRC DST [--vanilla] [--from-hub REPO_ID]
    restok convert verify FIXTURE_DIR

A converted directory looks exactly like a training stage's export (jobs/checkpoints.py):
`<name>.safetensors`, `<name>_ema.safetensors`, `config.yaml` (the full resolved config, from the
`official-*` compatibility presets) and a manifest naming the source file and its sha256. The whole
conversion happens in memory first, so a bad checkpoint fails with one line and writes nothing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from configs.loading import ConfigError, load_config, to_yaml
from infra import storage
from infra.manifest import write_manifest
from models.generator import official as generator_official
from models.generator import official_generator_config, sample
from models.generator.official import (
    infer_official_config,
    load_official_generator,
    unwrap_checkpoint,
)
from models.registry import GPT_SIZES
from models.tokenizer import ResTok, tokenizer_config_for
from models.tokenizer import official as tokenizer_official
from models.tokenizer.config import levels_for
from models.tokenizer.official import tokenizer_config_from_official
from pipeline.convert_losses import FIXTURE as LOSS_FIXTURE
from pipeline.convert_losses import verify_losses

TOKENIZER_PRESET = "official-restok-l"
GENERATOR_PRESETS = {False: "official-har-l", True: "official-vanilla-l"}
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ConvertError(RuntimeError):
    """One-line, user-facing conversion error."""


# -- reading release files --------------------------------------------------------------------


def read_release_checkpoint(path: str) -> dict[str, Any]:
    """safetensors, or a torch file loaded with weights_only=True (arbitrary pickles refused)."""
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - one line naming the file
            raise ConvertError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConvertError(
            f"{path}: refused by torch.load(weights_only=True): {type(exc).__name__}: {first[:200]}"
        ) from None


def download_from_hub(repo_id: str, kind: str) -> str:
    """Download the release checkpoint for `kind` ('tokenizer'|'generator') with huggingface_hub;
    offline, one line naming the local-path alternative."""
    hint = (
        f"download it on a connected machine and pass the local file instead: "
        f"restok convert official-{kind} /path/to/checkpoint DST"
    )
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise ConvertError(
            f"--from-hub needs huggingface_hub (pip install 'restok[hub]'); or {hint}"
        ) from None
    pattern = re.compile(
        r"(restok|tokenizer|vq)" if kind == "tokenizer" else r"(gpt|har|llamagen|generator|c2i)", re.I
    )
    try:
        files = HfApi().list_repo_files(repo_id)
        chosen = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES) and pattern.search(os.path.basename(f))]
        if not chosen:
            raise ConvertError(f"{repo_id}: no {kind} checkpoint among {files}; {hint}")
        return hf_hub_download(repo_id, sorted(chosen)[0])
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, auth, missing repo
        raise ConvertError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}); {hint}"
        ) from None


def _release_tokenizer_config(path: str | None):

    if not path:
        return None
    text = Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
        data = data.get("config", data)
    else:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    return tokenizer_config_from_official(data)


# -- writing our exports -----------------------------------------------------------------------


def _base_config(preset: str, section: str, model_cfg: Any) -> Any:
    from omegaconf import OmegaConf

    try:
        cfg = load_config(preset)
    except ConfigError:
        cfg = load_config(None)
    cfg[section] = OmegaConf.structured(model_cfg)
    return cfg


def _write_export(dst: str, name: str, state: Mapping[str, torch.Tensor], cfg: Any, source: str) -> dict:
    from safetensors.torch import save

    data = save({k: v.detach().float().contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    digest = storage.sha256_bytes(data)
    # Released weights are the EMA weights: the same bytes serve both names our loader knows.
    for fname in (f"{name}.safetensors", f"{name}_ema.safetensors"):
        storage.write_bytes_atomic(storage.join(dst, fname), data)
    storage.write_bytes_atomic(storage.join(dst, "config.yaml"), to_yaml(cfg).encode())
    n_params = int(sum(v.numel() for v in state.values()))
    return write_manifest(
        dst,
        f"convert_official_{name}",
        digest[:16],
        complete=True,
        source=os.path.abspath(source),
        source_sha256=storage.sha256_url(source),
        files={f"{name}.safetensors": digest, f"{name}_ema.safetensors": digest},
        num_tensors=len(state),
        num_elements=n_params,
        preset=str(cfg.preset),
    )


def convert_tokenizer(src: str, dst: str, release_config: str | None = None) -> dict:

    sd = read_release_checkpoint(src)
    tok_cfg = _release_tokenizer_config(release_config) or tokenizer_config_for("official-l")
    try:
        state = tokenizer_official.convert_official_state_dict(sd, tok_cfg)
    except ValueError as exc:
        raise ConvertError(f"{src}: {exc}") from None
    cfg = _base_config(TOKENIZER_PRESET, "tokenizer", tok_cfg)
    return _write_export(dst, "tokenizer", state, cfg, src)


def _levels_from_release(sd: Mapping[str, Any], vanilla: bool, levels: list[int] | None) -> list[int] | None:
    """The level list: given, or (HAR) from the special table, which the release sizes
    block_size - 1 rows (NOTES.md quirk 16); None = ResTok-L's."""

    if levels or vanilla:
        return levels

    table = unwrap_checkpoint(sd).get("spe_tok_embeddings.special_embeddings.weight")
    if table is None:
        return None
    try:
        return levels_for(int(table.shape[0]) + 1)
    except ValueError:
        return None


def convert_generator(src: str, dst: str, vanilla: bool = False, levels: list[int] | None = None) -> dict:

    sd = read_release_checkpoint(src)
    try:
        gen_cfg = infer_official_config(sd, vanilla=vanilla, levels=_levels_from_release(sd, vanilla, levels))
        state = generator_official.convert_official_state_dict(sd, gen_cfg)
    except ValueError as exc:
        raise ConvertError(f"{src}: {exc}") from None
    cfg = _base_config(GENERATOR_PRESETS[vanilla], "generator", gen_cfg)
    return _write_export(dst, "generator", state, cfg, src)


# -- fixture verification ----------------------------------------------------------------------

# NOTES.md "Suggested limits": latents/intermediates 1e-5, reconstructions 1e-4, logits 1e-5,
# codes and masks exact (tolerance 0).
LATENT_ATOL, RECON_ATOL, LOGIT_ATOL, EXACT = 1e-5, 1e-4, 1e-5, 0.0


def _row(rows: list, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    ours = ours.detach().to(torch.float64 if ours.is_floating_point() else ours.dtype)
    ref = ref.to(ours.dtype) if ref.dtype != torch.bool else ref
    if tuple(ours.shape) != tuple(ref.shape):
        rows.append((name, float("inf"), tol, False, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"))
        return
    if ours.dtype == torch.bool or not ours.is_floating_point():
        diff = float((ours != ref).sum())
    else:
        diff = float((ours - ref.to(ours.dtype)).abs().max()) if ours.numel() else 0.0
    rows.append((name, diff, tol, diff <= tol, ""))


def verify_tokenizer(fixture_dir: Path) -> list:
    from safetensors.torch import load_file

    meta = json.loads((fixture_dir / "restok_tiny.json").read_text())
    cfg = tokenizer_config_from_official(meta["config"])
    model = ResTok(cfg).eval()
    model.load_state_dict(
        tokenizer_official.convert_official_state_dict(
            read_release_checkpoint(str(fixture_dir / "restok_tiny.safetensors")), cfg
        ),
        strict=True,
    )
    io = load_file(str(fixture_dir / "restok_tiny_io.safetensors"))

    def tokens(t: torch.Tensor) -> torch.Tensor:  # release (B, D, 1, N) -> our (B, N, D)
        return t.flatten(2).transpose(1, 2)

    rows: list = []
    with torch.no_grad():
        zq, info = model.encode(io["images"])
        fmap, _ = model.decoder(zq, None)
        keep8 = 8 if cfg.num_tokens > 8 else cfg.num_tokens
        fmap8, _ = model.decoder(zq, model._keep_tensor(keep8, zq.shape[0], zq.device))
        ours = {
            "pixel_encoder_out": (info["pixel_encoder_out"], LATENT_ATOL),
            "latent_init": (info["latent_init"], LATENT_ATOL),
            "enc_latents_ln_post": (info["latents_ln_post"], LATENT_ATOL),
            "z_pre_quant": (info["z_pre_quant"], LATENT_ATOL),
            "z_quantized": (zq, LATENT_ATOL),
            "decoder_vit_out": (fmap, LATENT_ATOL),
            "decoder_vit_out_first8": (fmap8, LATENT_ATOL),
            "recon": (model.decode(zq), RECON_ATOL),
            "recon_first8": (model.decode(zq, keep=keep8), RECON_ATOL),
            "recon_from_codes": (model.decode_codes(info["codes"]), RECON_ATOL),
            "codes": (info["codes"], EXACT),
        }
        for name, (value, tol) in ours.items():
            if name not in io:
                continue
            ref = io[name]
            if name in ("z_pre_quant", "z_quantized"):
                ref = tokens(ref)
            elif name == "codes":
                ref = ref.reshape(value.shape)
            _row(rows, f"tokenizer/{name}", value, ref, tol)
        layouts = model.encoder.layouts(torch.device("cpu"))
        for b in range(len(model.encoder.blocks)):
            layout = layouts[model.encoder.layout_of_block[b]]
            if f"enc_attn_allowed_block{b}" in io:
                _row(
                    rows,
                    f"tokenizer/enc_attn_allowed_block{b}",
                    layout.mask,
                    io[f"enc_attn_allowed_block{b}"],
                    EXACT,
                )
            if f"enc_rope_block{b}" in io:
                _row(
                    rows,
                    f"tokenizer/enc_rope_block{b}",
                    layout.rope_matrices(),
                    io[f"enc_rope_block{b}"],
                    LATENT_ATOL,
                )
        if "dec_rope" in io:
            _row(
                rows,
                "tokenizer/dec_rope",
                model.decoder.layout(torch.device("cpu")).rope_matrices(),
                io["dec_rope"],
                LATENT_ATOL,
            )
    stored = {n for n in io if n != "images"}
    covered = {r[0].split("/", 1)[1] for r in rows}
    for name in sorted(stored - covered):
        rows.append((f"tokenizer/{name}", float("inf"), 0.0, False, "stored tensor not compared"))
    return rows


def _generator_config(meta: dict, vanilla: bool):

    g = meta["generator_config_(model.generator)"]
    args = meta["har_ModelArgs"]
    size = next(
        n
        for n, s in GPT_SIZES.items()
        if (s.dim, s.n_layer, s.n_head) == (args["dim"], args["n_layer"], args["n_head"])
    )
    return official_generator_config(
        vanilla,
        size,
        vocab_size=g["vocab_size"],
        levels=meta["derived_structure"]["level_sizes"],
        ar_tokens=g["ar_token_num"],
        num_classes=g["num_classes"],
    )


def verify_generator(fixture_dir: Path) -> list:
    from safetensors.torch import load_file

    meta = json.loads((fixture_dir / "har_tiny.json").read_text())
    io = load_file(str(fixture_dir / "har_tiny_io.safetensors"))
    weights = read_release_checkpoint(str(fixture_dir / "har_tiny.safetensors"))
    har, _ = load_official_generator(weights, cfg=_generator_config(meta, False))
    special = [k for k in weights if k.startswith("spe_tok_embeddings")]
    vanilla, _ = load_official_generator(
        {k: v for k, v in weights.items() if k not in special}, cfg=_generator_config(meta, True)
    )
    labels, tokens = io["labels"], io["tokens"]
    rows: list = []
    with torch.no_grad():
        kind = har.layout.kind_tensor()
        _row(rows, "generator/har_layout_kind", kind, io["har_layout_kind"], EXACT)
        not_cls = kind != 0
        _row(
            rows,
            "generator/har_layout_index",
            har.layout.index_tensor()[not_cls],
            io["har_layout_index"][not_cls],
            EXACT,
        )
        _row(rows, "generator/har_attn_allowed", har.layout.attention_mask(), io["har_attn_allowed"], EXACT)
        n = io["har_freqs_cis"].shape[0]
        _row(rows, "generator/har_freqs_cis", har.rope[:n], io["har_freqs_cis"], 1e-6)
        _row(
            rows,
            "generator/har_input_embeddings",
            har.embed_layout(labels, tokens),
            io["har_input_embeddings"],
            1e-6,
        )
        _row(rows, "generator/har_logits", har(labels, tokens), io["har_logits"], LOGIT_ATOL)
        if "har_cache_attn_allowed" in io:
            # Our decode steps attend keys [0, end) unmasked (NOTES.md quirk 17): compare that with
            # the release's KV-cache mask on every row a sampling pass queries.
            ref = io["har_cache_attn_allowed"][:, : har.block_size]
            ours = torch.zeros_like(ref)
            queried = torch.zeros(ref.shape[0], dtype=torch.bool)
            for step in har.layout.steps:
                ours[step.start : step.end, : step.end] = True
                queried[step.start : step.end] = True
            _row(rows, "generator/har_cache_attn_allowed", ours[queried], ref[queried], EXACT)
        h = torch.cat([vanilla.class_embed(labels)[:, None], vanilla.token_embed(tokens)], dim=1)
        _row(
            rows,
            "generator/vanilla_logits",
            vanilla.forward_embeddings(h, is_causal=True),
            io["vanilla_logits"],
            LOGIT_ATOL,
        )
    for run, spec in meta["sampler_arguments"].items():
        if not isinstance(spec, dict) or "kw" not in spec:
            continue  # notes stored beside the runs
        model = vanilla if run.startswith("vanilla") else har
        kw = spec["kw"]
        sched = kw.get("cfg_schedule_kwargs", {})
        seed = re.search(r"manual_seed\((\d+)\)", spec.get("seed", ""))
        torch.manual_seed(int(seed.group(1)) if seed else 0)  # the release draws on the global RNG
        result = sample(
            model,
            labels,
            record_logits=True,
            cfg_scale=kw["cfg_scale"],
            cfg_schedule=kw["cfg_schedule"],
            start_ratio=sched.get("window_start", 0.0),
            min_cfg_scale=sched.get("min_cfg_scale", 1.0),
            temperature=kw["temperature"],
            top_k=kw["top_k"],
            top_p=kw["top_p"],
            release_cfg_floor=True,
        )
        passes = meta["forward_passes"].get(run)
        if passes is not None:
            _row(
                rows,
                f"generator/{run}_forward_passes",
                torch.tensor(result.num_forward_passes),
                torch.tensor(passes),
                EXACT,
            )
        cfg_values = meta.get("cfg_value_per_forward_pass", {}).get(run)
        if cfg_values is not None and result.cfg_values:
            _row(
                rows,
                f"generator/{run}_cfg_values",
                torch.tensor(result.cfg_values),
                torch.tensor(cfg_values),
                1e-9,
            )
        for i, (step, logits) in enumerate(zip(model.layout.steps, result.step_logits, strict=False)):
            if f"{run}_step{i}_input_pos" in io:
                _row(
                    rows,
                    f"generator/{run}_step{i}_input_pos",
                    torch.arange(step.start, step.end),
                    io[f"{run}_step{i}_input_pos"],
                    EXACT,
                )
            if f"{run}_step{i}_logits" in io:
                _row(rows, f"generator/{run}_step{i}_logits", logits, io[f"{run}_step{i}_logits"], LOGIT_ATOL)
        if f"{run}_codes" in io:
            _row(rows, f"generator/{run}_codes", result.codes, io[f"{run}_codes"], EXACT)
    covered = {r[0].split("/", 1)[1] for r in rows}
    for name in sorted(set(io) - covered - {"labels", "tokens"}):  # inputs are not outputs
        rows.append((f"generator/{name}", float("inf"), 0.0, False, "stored tensor not compared"))
    return rows


def verify(fixture_dir: str) -> int:
    root = Path(fixture_dir)
    rows: list = []

    for fname, fn in (
        ("restok_tiny.json", verify_tokenizer),
        ("har_tiny.json", verify_generator),
        (LOSS_FIXTURE, verify_losses),
    ):
        if (root / fname).exists():
            rows += fn(root)
    if not rows:
        raise ConvertError(
            f"{fixture_dir}: no restok_tiny.json, har_tiny.json or {LOSS_FIXTURE} fixture set found"
        )
    width = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{width}}  {'max abs diff':>12}  {'tolerance':>9}  ok")
    for name, diff, tol, ok, note in rows:
        print(
            f"{name:<{width}}  {diff:>12.3e}  {tol:>9.0e}  "
            f"{'yes' if ok else 'NO'}{'  ' + note if note else ''}"
        )
    failed = [r for r in rows if not r[3]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cli(args: Any) -> int:
    try:
        if args.what == "verify":
            if not args.src:
                raise ConvertError("usage: restok convert verify FIXTURE_DIR")
            return verify(args.src)
        kind = "tokenizer" if args.what == "official-tokenizer" else "generator"
        src = download_from_hub(args.from_hub, kind) if args.from_hub else args.src
        dst = args.dst if args.from_hub is None else (args.dst or args.src)
        if not src or not dst:
            raise ConvertError(f"usage: restok convert {args.what} SRC DST (or DST --from-hub REPO_ID)")
        if kind == "tokenizer":
            manifest = convert_tokenizer(src, dst, getattr(args, "config", None))
        else:
            levels = [int(x) for x in args.levels.split(",")] if getattr(args, "levels", None) else None
            manifest = convert_generator(src, dst, vanilla=args.vanilla, levels=levels)
        print(
            f"converted {src} -> {dst} ({manifest['num_tensors']} tensors, "
            f"{manifest['num_elements']:,} parameters)"
        )
        return 0
    except ConvertError as exc:
        print(f"restok convert: {exc}", file=sys.stderr)
        return 2
