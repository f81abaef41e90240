"""restok's tokenizer losses against the release's golden loss fixtures (issue 13).

`tests/fixtures/official/losses_tiny.{json,safetensors}` hold outputs of the authors' code
(make_loss_fixtures.py there; LOSSES.md says what each entry is). `verify_losses` rebuilds the same
inputs and weights from the fixture alone, runs restok's losses under the same RNG states and returns
rows (name, max abs diff, tolerance, ok, note) for `restok convert verify`. Weights come from the
JSON's recipes (seeded randn/rand per listed tensor), so no network file is stored or downloaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from jobs.training.deepspeed_runtime import EMA
from models.losses.diffaugment import augment_images
from models.losses.discriminator import LeCamEMA, hinge_d_loss
from models.losses.perceptual import pad_crop_resize
from models.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig

LOSS_ATOL = 1e-5
FIXTURE = "losses_tiny.json"


def recipe_tensors(entries: list, seed: int) -> dict[str, torch.Tensor]:
    """entries: [key, shape, "normal" | "uniform", scale, offset], drawn in order from one seeded CPU
    generator (the fixture generator's `recipe_tensors`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, kind, scale, offset in entries:
        t = torch.randn(shape, generator=g) if kind == "normal" else torch.rand(shape, generator=g)
        out[key] = t * scale + offset
    return out


_HEAD_PARTS = {
    "0.0": "pointwise.0",
    "0.1": "pointwise.1",
    "1.fn.0": "residual.0",
    "1.fn.1": "residual.1",
    "2": "to_logit",
}
_SPECTRAL = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0._u",
    "weight_v": "parametrizations.weight.0._v",
}


def release_head_key(key: str) -> str:
    """Release DinoDisc `heads` key -> ours, e.g. `0.1.fn.0.weight_orig` ->
    `0.residual.0.parametrizations.weight.original` (old-style spectral norm -> parametrization)."""
    match = re.fullmatch(r"(\d+)\.(0\.0|0\.1|1\.fn\.0|1\.fn\.1|2)\.(\w+)", key)
    if match is None:
        raise KeyError(f"unexpected release discriminator head key {key!r}")
    head, part, name = match.groups()
    return f"{head}.{_HEAD_PARTS[part]}.{_SPECTRAL.get(name, name)}"


class StoredTeacherOutputs(nn.Module):
    """Stands in for the VF teacher network: the release computes teacher features in the model's
    forward, not in its loss module, so the fixture stores them (CLS [B, D], patches [B, h*w, D])."""

    def __init__(self, cls: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.cls, self.patches, self.grid = cls, patches, grid
        self.feature_dim, self.model_name, self.name = cls.shape[-1], "stored-teacher-outputs", "vf"

    def forward(self, images):
        return self.cls, self.patches, self.grid


def build_loss(meta: dict, workdir: str):
    """A TokenizerLoss with the fixture's weights: release defaults, GAN from step 0, the tiny DINO
    backbone (width/heads from the fixture, tanh GELU as the release), LPIPS VGG and heads from the
    recipes (written to files in `workdir` and loaded through the normal path)."""

    w, cfg_r = meta["weights"], meta["release_config"]["losses"]
    seeds = w["seeds"]
    vgg_path, lin_path = os.path.join(workdir, "vgg16.pth"), os.path.join(workdir, "lpips_lin.pth")
    torch.save(recipe_tensors(w["vgg16"], seeds["vgg16"]), vgg_path)
    torch.save(recipe_tensors(w["lpips_lin"], seeds["lpips_lin"]), lin_path)
    disc = meta["disc"]
    cfg = TokenizerLossConfig(
        mse_weight=cfg_r["reconstruction_weight"],
        lpips_weight=cfg_r["perceptual_weight"],
        vq_weight=cfg_r["quantizer_weight"],
        vf_weight=cfg_r["vf_weight"],
        vf_margin=cfg_r["cos_margin"],
        vf_margin_convention="release",
        gan_weight=cfg_r["discriminator_weight"] * cfg_r["discriminator_factor"],
        gan_start_step=cfg_r["discriminator_start"],
        lecam_weight=cfg_r["lecam_regularization_weight"],
        lpips_vgg_weights=vgg_path,
        lpips_linear_weights=lin_path,
        vf_teacher="vit_tiny_patch16_224",
        vf_teacher_backbone="random-untrained",
        vf_teacher_resolution=32,
        vf_teacher_kwargs={"depth": 1},
        disc_backbone="random-untrained",
        disc_resolution=disc["image_size"],
        disc_feature_blocks=list(disc["key_depths"]),
        disc_virtual_batch=disc["virtual_bs"],
        disc_backbone_kwargs={
            "embed_dim": disc["width"],
            "num_heads": disc["heads"],
            "depth": disc["depth"],
            "act_layer": disc["act"],
        },
    )
    loss = TokenizerLoss(cfg)
    loss.discriminator.features.net.load_state_dict(recipe_tensors(w["dino"], seeds["dino"]))
    heads = {release_head_key(k): v for k, v in recipe_tensors(w["heads"], seeds["heads"]).items()}
    loss.discriminator.heads.load_state_dict(heads)
    return loss


def _value_row(rows: list, name: str, ours: float, ref: float, tol: float = LOSS_ATOL) -> None:
    ours = ours.detach() if torch.is_tensor(ours) else ours
    diff = abs(float(ours) - float(ref))
    rows.append((f"losses/{name}", diff, tol, diff <= tol, ""))


def _tensor_row(rows: list, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = LOSS_ATOL) -> None:
    if tuple(ours.shape) != tuple(ref.shape):
        rows.append(
            (f"losses/{name}", float("inf"), tol, False, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}")
        )
        return
    diff = float((ours.detach().double() - ref.double()).abs().max()) if ours.numel() else 0.0
    rows.append((f"losses/{name}", diff, tol, diff <= tol, ""))


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def verify_losses(fixture_dir: Path) -> list:
    from safetensors.torch import load_file

    fixture_dir = Path(fixture_dir)
    meta = json.loads((fixture_dir / FIXTURE).read_text())
    t = load_file(str(fixture_dir / "losses_tiny.safetensors"))
    v = meta["values"]
    rows: list = []
    rng_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        _value_row(rows, "hinge", hinge_d_loss(t["hinge/logits_real"], t["hinge/logits_fake"]), v["hinge"])
        # LeCam over several steps: batch means against the previous EMAs, EMAs from 0.
        lecam_weight = meta["release_config"]["losses"]["lecam_regularization_weight"]
        lecam = LeCamEMA(v["lecam_ema_decay"], "release")
        for i, ref in enumerate(v["lecam_steps"]):
            real, fake = t[f"lecam/step{i}/logits_real"], t[f"lecam/step{i}/logits_fake"]
            reg = lecam.loss(real, fake)
            _value_row(rows, f"lecam/step{i}/lecam", reg, ref["lecam_loss_weighted"] / lecam_weight)
            _value_row(
                rows,
                f"lecam/step{i}/d_loss",
                hinge_d_loss(real, fake) + lecam_weight * reg,
                ref["discriminator_loss"],
            )
            _value_row(rows, f"lecam/step{i}/ema_real", lecam.ema_real, ref["ema_real_after"])
            _value_row(rows, f"lecam/step{i}/ema_fake", lecam.ema_fake, ref["ema_fake_after"])
        # DiffAugment under the same global torch RNG state: equal draws, equal images.
        aug = meta["diffaug"]
        for seed in aug["seeds"]:
            torch.manual_seed(seed)
            out = augment_images(t["diffaug/input"].clone(), aug["policy"], aug["prob"], "unit")
            _tensor_row(rows, f"diffaug/seed{seed}", out, t[f"diffaug/seed{seed}"])
        # EMA decay schedule and averaged values (release step k = our step index k - 1).
        e = v["ema"]
        model = nn.Linear(1, 6, bias=False)
        ema = None
        for step, ref_decay in enumerate(e["decays"]):
            with torch.no_grad():
                model.weight.copy_(t[f"ema/param_step{step}"].view(6, 1))
            if ema is None:  # the release's shadow starts from the parameters at creation
                ema = EMA(model, e["decay"], rank=0, warmup=True)
            _value_row(rows, f"ema/decay_step{step}", ema.decay_at(step), ref_decay, 1e-12)
            ema.update(step)
            _tensor_row(
                rows, f"ema/shadow_step{step}", ema.shadow["weight"].view(6), t[f"ema/shadow_step{step}"]
            )
        for k, ref_decay in e["get_decay"].items():
            _value_row(rows, f"ema/decay_at_{k}", ema.decay_at(int(k) - 1), ref_decay, 1e-12)

        with tempfile.TemporaryDirectory() as workdir:
            loss = build_loss(meta, workdir)
        # LPIPS, plain and with the release's pad/crop/resize under the same python RNG state.
        a, b = t["lpips/a"], t["lpips/b"]
        with torch.no_grad():
            _value_row(rows, "lpips/plain", loss.lpips(a, b).mean(), v["lpips_plain"])
            for seed, ref in v["lpips_augmented"].items():
                random.seed(int(seed))
                _value_row(
                    rows, f"lpips/augmented_seed{seed}", loss.lpips(*pad_crop_resize(a, b)).mean(), ref
                )
        # The discriminator alone (readout, 224 crop or area resize, heads), same RNG states.
        images = t["full/images_u8"].float() / 255
        recon = 0.8 * images + 0.2 * t["full/recon_u8"].float() / 255
        start = {k: x.clone() for k, x in loss.discriminator.heads.state_dict().items()}
        for seed in range(3):
            _seed(seed)
            with torch.no_grad():
                _tensor_row(
                    rows,
                    f"disc/logits_seed{seed}",
                    loss.discriminator(images, augment=False),
                    t[f"disc/logits_seed{seed}"],
                )
        loss.discriminator.heads.load_state_dict(start)  # power-iteration vectors as stored
        # One full forward: generator step (with d total / d recon), then discriminator step.
        grid = tuple(t["full/aux_feature"].shape[-2:])
        loss.vf.net = StoredTeacherOutputs(
            t["full/aux_cls"].mean(dim=(2, 3)), t["full/aux_feature"].flatten(2).transpose(1, 2), grid
        )
        aux = {
            "vq_loss": t["full/quantizer_loss"],
            "vf_enc_feat": t["full/last_image_tokens_proj"].mean(dim=(2, 3)),
            "vf_dec_feat": t["full/dec_vf_feat_proj"].flatten(2).transpose(1, 2),
        }
        full, g_ref = meta["full"], v["full_generator"]
        recon_g = recon.clone().requires_grad_(True)
        _seed(full["generator_seed"])
        total, logs = loss.generator_loss(images, recon_g, aux, full["global_step"])
        total.backward()
        s = loss.gan_suffix
        _value_row(rows, "full/generator_total", total, g_ref["total_loss"])
        _value_row(rows, "full/mse", logs["mse"], g_ref["reconstruction_loss"])
        _value_row(rows, "full/lpips", logs[loss.lpips.name], g_ref["perceptual_loss"])
        _value_row(rows, "full/vf", logs[loss.vf.name], g_ref["vf_loss"])
        _value_row(rows, "full/generator_adversarial", logs["gen_adv" + s], g_ref["gan_loss"])
        _tensor_row(
            rows,
            "full/generator_grad_recon_every8",
            recon_g.grad[:, :, ::8, ::8],
            t["full/generator_grad_recon_every8"],
        )
        d_ref = v["full_discriminator"]
        _seed(full["discriminator_seed"])
        d_total, d_logs = loss.discriminator_loss(images, recon, full["global_step"])
        _value_row(rows, "full/discriminator_total", d_total, d_ref["total"])
        _value_row(rows, "full/logits_real_mean", d_logs["logits_real" + s], d_ref["logits_real"])
        _value_row(rows, "full/logits_fake_mean", d_logs["logits_fake" + s], d_ref["logits_fake"])
        _value_row(
            rows, "full/lecam", d_logs["disc_lecam" + s] * loss.config.lecam_weight, d_ref["lecam_loss"]
        )
        _value_row(rows, "full/lecam_ema_real", loss.lecam.ema_real, d_ref["ema_real_after"])
        _value_row(rows, "full/lecam_ema_fake", loss.lecam.ema_fake, d_ref["ema_fake_after"])
    finally:
        torch.set_rng_state(rng_state)
        random.setstate(py_state)
    return rows
