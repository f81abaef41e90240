"""The ablation-* presets are the paper's table rows (Sec. 5.4, Tables 2-5; issue 13).

Each preset's header declares the keys its row changes (`# changes: a.b, c.d`); the preset must
differ from its `base:` in exactly those keys. Config loading only: models are built on the meta
device (no memory, no training; tests/test_recipe.py runs first training steps).
"""

import functools

import pytest
import torch
from omegaconf import OmegaConf

from configs.loading import PRESET_DIR, list_presets, load_config, to_flat_dict
from jobs.training.deepspeed_runtime import cosine_lr
from models.generator.layout import layout_for
from models.tokenizer.restok import ResTok

ABLATIONS = [p for p in list_presets() if p.startswith("ablation-")]
STEPS_PER_EPOCH = -(-1_281_167 // 256)  # 5,005 (paper App. A.2: ImageNet-1K train, batch 256)
# The sentence the schedule decision rests on (ablation-base's header); every preset quotes it.
SCHEDULE_QUOTE = (
    '"For the ablations, ResTok and LlamaGen-L are trained on ImageNet for 30 epochs '
    'and 50 epochs, respectively."'
)
SCHEDULE_PREFIXES = ("tokenizer_train.", "generator_train.", "sampling.", "tracking.", "eval.")


@functools.cache
def _cfg(preset):
    return load_config(preset)


@functools.cache
def _flat(preset):
    return to_flat_dict(_cfg(preset))


def _header(preset):
    """(text, declared keys, base preset) of a preset file."""
    path = PRESET_DIR / f"{preset}.yaml"
    text = path.read_text()
    declared = set()
    for line in text.splitlines():
        if line.startswith("# changes:"):
            declared |= {k.strip() for k in line.split(":", 1)[1].split(",") if k.strip()}
    return text, declared, OmegaConf.load(path).get("base")


@pytest.mark.parametrize("preset", ABLATIONS)
def test_differs_from_its_base_only_in_declared_keys(preset):
    text, declared, base = _header(preset)
    assert declared, f"{preset}: no '# changes:' line"
    assert base == "imagenet256-restok-l" if preset == "ablation-base" else base in ABLATIONS, base
    a, b = _flat(preset), _flat(base)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"preset"}
    assert changed == declared, (
        f"{preset} vs {base}: undeclared {sorted(changed - declared)}, "
        f"declared but equal {sorted(declared - changed)}"
    )
    assert SCHEDULE_QUOTE in text, f"{preset}: header does not quote the schedule decision"


@pytest.mark.parametrize("preset", [p for p in ABLATIONS if p != "ablation-base"])
def test_every_ablation_runs_the_base_schedule(preset):
    a, b = _flat(preset), _flat("ablation-base")
    schedule = {k for k in b if k.startswith(SCHEDULE_PREFIXES) and not k.startswith("tokenizer_train.loss.")}
    assert {k: a[k] for k in schedule} == {k: b[k] for k in schedule}


def test_titok_baseline_changes_only_the_latent_init():
    # Issue 13: the release's learnable_latent_tokens flag changes the latent init and nothing else.
    assert _header("ablation-titok-baseline")[1:] == ({"tokenizer.latent_init"}, "ablation-latent-hierarchy")
    assert _header("ablation-titok-full-attention")[1] == {"tokenizer.encoder_mask"}


def test_ablation_schedule_is_a_complete_cosine_run():
    cfg = _cfg("ablation-base")
    for train, epochs in ((cfg.tokenizer_train, 30), (cfg.generator_train, 50)):
        steps, optim = int(train.steps), train.optim
        assert steps == epochs * STEPS_PER_EPOCH
        lr = functools.partial(
            cosine_lr, total=steps, base=optim.lr, warmup=optim.warmup_steps, floor=optim.min_lr
        )
        assert optim.warmup_steps == 5000 and (optim.lr, optim.min_lr) == (1e-4, 1e-5)
        assert lr(steps - 1) == pytest.approx(optim.min_lr, abs=1e-12)
        # App. A.3's "150K / 250K step checkpoint" sits at the end of the decay.
        assert lr(epochs * 5000) == pytest.approx(optim.min_lr, abs=1e-9)
        assert lr(steps // 2) > 4 * optim.min_lr  # a 1M-step cosine would still be near its peak here
    assert cfg.tokenizer_train.loss.gan_start_step == 20000
    assert not cfg.generator.har and cfg.sampling.cfg_scale == 1.0  # vanilla AR, no CFG (Sec. 5.4)


# Paper row -> what the preset's built models show: image scale sizes (coarsest first), learned
# latent queries, the encoder level mask, VF heads (encoder, decoder), generator passes per image.
BASE = {"scales": [32, 64, 128, 256], "learned": False, "mask": True, "vf": (True, True), "passes": 128}
ROWS = {
    "ablation-base": ("Table 2 #8 / Table 3 factor 2 / Table 4 both", {}),
    "ablation-titok-baseline": ("Table 2 #1", {"scales": [256], "learned": True}),
    "ablation-titok-full-attention": (
        "Table 2 #1, full attention",
        {"scales": [256], "learned": True, "mask": False},
    ),
    "ablation-latent-hierarchy": ("Table 2 #2", {"scales": [256]}),
    "ablation-scales-3": ("Table 2 #3-#5, S = 3", {"scales": [64, 128, 256]}),
    "ablation-scales-4": ("Table 2 #3-#5, S = 4", {}),
    "ablation-scales-5": ("Table 2 #3-#5, S = 5", {"scales": [16, 32, 64, 128, 256]}),
    "ablation-residual-image": ("Table 2 #6-#7", {}),
    "ablation-residual-latent": ("Table 2 #6-#7", {}),
    "ablation-merge-factor-1": ("Table 3 no pooling", {"scales": [256]}),
    "ablation-merge-factor-4": ("Table 3 factor 4", {"scales": [4, 16, 64, 256]}),
    "ablation-merge-avg": ("paper merge op", {}),
    "ablation-vf-none": ("Table 4 none", {"vf": (False, False)}),
    "ablation-vf-encoder": ("Table 4 encoder", {"vf": (True, False)}),
    "ablation-vf-decoder": ("Table 4 decoder", {"vf": (False, True)}),
    "ablation-vf-paper-margin": ("paper VF margin", {}),
    "ablation-har": ("Table 5 HAR", {"passes": 9}),
    "ablation-har-no-ntp": ("Table 5 HAR without the next-token group", {"passes": 8}),
}
# The residual switches (image, latent) of the Table 2 rows.
RESIDUALS = {
    "ablation-residual-image": (True, False),
    "ablation-residual-latent": (False, True),
    "ablation-scales-3": (False, False),
    "ablation-scales-4": (False, False),
    "ablation-scales-5": (False, False),
    "ablation-latent-hierarchy": (False, False),
    "ablation-titok-baseline": (False, False),
    "ablation-base": (True, True),
}


def test_every_ablation_preset_is_a_row():
    assert set(ABLATIONS) == set(ROWS)


@pytest.mark.parametrize("preset", ABLATIONS)
def test_preset_builds_the_models_of_its_row(preset):
    cfg = _cfg(preset)  # loading already built both models on the meta device
    with torch.device("meta"):
        tok = ResTok(OmegaConf.to_object(cfg.tokenizer))
    enc = tok.encoder
    got = {
        "scales": [h * w for h, w in enc._static[-1][2]],
        "learned": hasattr(enc, "latent_tokens"),
        "mask": enc._static[0][1] is not None,
        "vf": (tok.vf_proj is not None, tok.vf_proj_dec is not None),
        "passes": len(layout_for(OmegaConf.to_object(cfg.generator)).steps),
    }
    assert got == {**BASE, **ROWS[preset][1]}, ROWS[preset][0]
    assert len(enc.merge_blocks) == len(got["scales"]) - 1
    if preset in RESIDUALS:
        assert (cfg.tokenizer.residual_image, cfg.tokenizer.residual_latent) == RESIDUALS[preset]
    assert sum(cfg.tokenizer.levels) == 128
