"""The cluster presets: the paper's recipe arithmetic, and ablations that change only their switches."""

import pytest
from omegaconf import OmegaConf

from configs.loading import list_presets, load_config, to_flat_dict
from models.generator.config import official_generator_config
from models.tokenizer.config import TokenizerConfig, official_tokenizer_config

IMAGENET_TRAIN_IMAGES = 1_281_167  # paper App. A.2
STEPS_PER_EPOCH = -(-IMAGENET_TRAIN_IMAGES // 256)  # 5,005


def test_full_recipe_matches_the_paper():
    cfg = load_config("imagenet256-restok-l")
    assert cfg.tokenizer_train.steps == 200 * STEPS_PER_EPOCH
    assert cfg.generator_train.steps == 300 * STEPS_PER_EPOCH
    for train in (cfg.tokenizer_train, cfg.generator_train):
        assert train.global_batch_size == 256 and train.ema_decay == 0.9999 and train.precision == "bf16"
        assert train.optim.lr == 1e-4 and train.optim.min_lr == 1e-5 and train.optim.warmup_steps == 5000
    assert cfg.tokenizer_train.loss.gan_start_step == 20000 and cfg.tokenizer_train.loss.gan_weight == 0.5
    assert cfg.generator_train.optim.weight_decay == 0.05 and cfg.generator_train.optim.grad_clip == 1.0
    assert sum(cfg.tokenizer.levels) == 128 and cfg.tokenizer.num_scales == 4
    assert cfg.eval.num_samples_per_class == 50 and cfg.eval.feature_net == "inception"
    assert cfg.cluster.address == "auto" and cfg.cluster.use_gpu
    # 750k (the released checkpoint) must survive checkpoint rotation for the Fig. 7 sweep.
    train = cfg.tokenizer_train
    assert (
        750_000 % train.checkpoint_every == 0
        and train.keep_checkpoints * train.checkpoint_every > train.steps - 250_000
    )


def _switches(preset, base):
    a, b = to_flat_dict(load_config(preset)), to_flat_dict(load_config(base))
    return {k for k in a if a[k] != b.get(k) and k != "preset"}


@pytest.mark.parametrize(
    "preset", [p for p in list_presets() if p.startswith("ablation-") and p != "ablation-base"]
)
def test_each_ablation_changes_only_model_switches(preset):
    changed = _switches(preset, "ablation-base")
    assert changed and all(
        k.startswith(("tokenizer.", "generator.", "tokenizer_train.loss.")) for k in changed
    ), changed
    TokenizerConfig(**OmegaConf.to_container(load_config(preset).tokenizer)).validate()


def test_ablation_schedule():
    cfg = load_config("ablation-base")
    assert (
        cfg.tokenizer_train.steps == 30 * STEPS_PER_EPOCH
        and cfg.generator_train.steps == 50 * STEPS_PER_EPOCH
    )
    assert not cfg.generator.har and cfg.sampling.cfg_scale == 1.0


def test_official_presets_equal_the_release_configs():
    tok = OmegaConf.to_container(load_config("official-restok-l").tokenizer)
    release = official_tokenizer_config("large").__dict__
    assert {k: tok[k] for k in release} == release
    for preset, vanilla in (("official-har-l", False), ("official-vanilla-l", True)):
        gen = OmegaConf.to_container(load_config(preset).generator, resolve=True)
        release = official_generator_config(vanilla=vanilla).__dict__
        assert {k: gen[k] for k in release} == release, preset
