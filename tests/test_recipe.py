"""The paper's recipe at small scale (issue 19 "Deliver" 2): `imagenet256-restok-l` through `restok run`
with only sizes, step counts, batch sizes, worker counts and the image size shrunk
(tests/recipe_helpers.SHRINK_SIZES): bf16, ZeRO-2, GAN from mid-run with LeCam and DiffAugment, VF
alignment, LPIPS, EMA, nested dropout, ten-crop extraction, HAR with CFG and top-p, Inception
evaluation. Frozen networks are random (named random-untrained, and so are their numbers). It runs on
a fake ImageNet in the folder layout and again in the two-tar layout; every stage must complete.
Each ablation-* preset then runs the tokenizer's first steps (and a generator step) with the same
shrinking, in-process on the bf16-cast models.
"""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_restok
from recipe_helpers import (
    GAN_START,
    RECIPE_STEPS,
    SHRINK_SIZES,
    TINY_DEEP,
    WNIDS,
    shrink_sizes,
    site_paths,
    write_imagenet_folder,
    write_imagenet_tars,
)

from configs.loading import list_presets, load_config
from infra import paths, tracking
from models.registry import VIT_SIZES

pytestmark = pytest.mark.slow

RECIPE = "imagenet256-restok-l"
STAGES = ["prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate"]
# Deliver 5: the per-step record of a recipe run in MLflow (train_tokenizer run).
TOKENIZER_METRICS = [
    "loss",
    "mse",
    "vq",
    "lpips_random_untrained",
    "vf_random_untrained_enc",
    "vf_random_untrained_dec",
    "gen_adv_random_untrained",
    "disc_hinge_random_untrained",
    "disc_lecam_random_untrained",
    "gan_active",
    "lr",
    "grad_norm",
    "discriminator_lr",
    "discriminator_grad_norm",
    "images_per_s",
    "tokens_per_s",
    "mfu",
    "peak_memory_gib",
    "codebook_usage",
    "codebook_entropy_bits",
]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    folder = write_imagenet_folder(root / "folder")
    return {"imagenet_folder": folder, "imagenet_tar": write_imagenet_tars(folder, root / "tars")}


def restok_run(preset: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_restok("run", preset, *overrides, cwd=cwd, timeout=1200)


# The folder layout runs the recipe's distributed paths (ZeRO-2 bf16 over 2 Train workers, 2
# extraction and 2 evaluation actors); the tar layout changes only how prep reads, so its run uses
# one of each (worker counts are among the sizes the recipe test may shrink).
LAYOUT_WORKERS = {
    "imagenet_folder": [],
    "imagenet_tar": ["cluster.num_workers=1", "extract.num_actors=1", "eval.num_actors=1"],
}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("source", list(LAYOUT_WORKERS))
def test_recipe_small_scale_every_stage(source, fake_imagenet, tmp_path):
    work = tmp_path / "work"
    overrides = SHRINK_SIZES + LAYOUT_WORKERS[source] + site_paths(work, fake_imagenet[source], source)
    done = restok_run(RECIPE, overrides, tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    print(done.stdout.rsplit("== restok run:", 1)[-1])
    check_recipe_outputs(load_config(RECIPE, overrides), work)


def check_recipe_outputs(cfg, work: Path) -> None:
    # The switches are the recipe's (only sizes were overridden).
    assert (cfg.tokenizer_train.precision, cfg.tokenizer_train.zero_stage) == ("bf16", 2)
    assert (cfg.generator_train.precision, cfg.generator_train.zero_stage) == ("bf16", 2)
    assert cfg.extract.augment == "tencrop" and cfg.generator.har and cfg.tokenizer.nested_dropout
    assert (cfg.sampling.cfg_scale, cfg.sampling.top_p) == (3.75, 0.95)
    loss = cfg.tokenizer_train.loss
    assert loss.lecam_weight > 0 and loss.disc_diffaug and loss.lpips_weight > 0 and loss.vf_weight > 0
    manifests = {s: json.loads((work / s / "manifest.json").read_text()) for s in STAGES}
    assert all(m["complete"] for m in manifests.values()), {
        s: m.get("complete") for s, m in manifests.items()
    }

    client = tracking.client_for(paths.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)

    def stage_run(stage):
        runs = client.search_runs([exp.experiment_id], f"tags.`restok.stage` = '{stage}'")
        assert len(runs) == 1, (stage, len(runs))
        return runs[0]

    assert all(stage_run(s).info.status == "FINISHED" for s in STAGES)
    assert manifests["prep"]["source"] == cfg.data.source
    assert manifests["prep"]["num_classes"] == len(WNIDS) == cfg.generator.num_classes
    tok = stage_run("train_tokenizer")
    missing = [k for k in TOKENIZER_METRICS if k not in tok.data.metrics]
    assert not missing, (missing, sorted(tok.data.metrics))
    gan = sorted(client.get_metric_history(tok.info.run_id, "gan_active"), key=lambda m: m.step)
    assert [m.step for m in gan] == list(range(RECIPE_STEPS))
    assert [m.value for m in gan] == [0.0] * GAN_START + [1.0] * (RECIPE_STEPS - GAN_START)
    gen = stage_run("train_generator")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib"):
        assert key in gen.data.metrics, key
    assert client.list_artifacts(tok.info.run_id, "reconstructions"), "no reconstruction grid"
    assert client.list_artifacts(gen.info.run_id, "samples"), "no sample grid (bf16 module, CFG, top-p)"

    # Ten-crop: 10 augmented code views per training image.
    codes = manifests["extract_codes"]
    assert (codes["augment"], codes["num_views"]) == ("tencrop", 10)
    assert manifests["train_tokenizer"]["steps_done"] == RECIPE_STEPS
    # Evaluation with the random-untrained Inception: no number under a real metric's name.
    metrics = manifests["evaluate"]["metrics"]
    assert "rfid_random_untrained" in metrics and "gfid_random_untrained" in metrics, sorted(metrics)
    assert not {"rfid", "gfid", "sfid", "inception_score", "precision", "recall"} & set(metrics)


ABLATIONS = [p for p in list_presets() if p.startswith("ablation-")]


@pytest.mark.parametrize("preset", ABLATIONS)
def test_ablation_preset_first_steps(preset, tmp_path, monkeypatch):
    """The preset's models and objective, shrunk like the recipe, cast to bf16 as the DeepSpeed engines
    cast them: two tokenizer steps, one with the GAN on (discriminator step too), one generator step
    and its sampling setting."""
    from jobs.training.checkpoints import generator_config, tokenizer_config
    from jobs.training.deepspeed_runtime import make_optimizer
    from models.generator import GPT, sample
    from models.losses.tokenizer_loss import TokenizerLoss
    from models.tokenizer import ResTok

    monkeypatch.setitem(VIT_SIZES, TINY_DEEP, dataclasses.replace(VIT_SIZES["tiny"], depth=6))
    cfg = load_config(
        preset, shrink_sizes(preset) + site_paths(tmp_path / "work", tmp_path, "imagenet_folder")
    )
    train = cfg.tokenizer_train
    assert (train.precision, train.zero_stage) == ("bf16", 2)
    torch.manual_seed(0)
    model = _bf16(ResTok(tokenizer_config(cfg)).train())
    loss_fn = TokenizerLoss(train.loss)
    _bf16(loss_fn.discriminator)
    opt = make_optimizer(model, train.optim)
    disc_opt = make_optimizer(loss_fn.discriminator, train.optim, float(train.disc_lr))
    images = torch.rand(int(train.micro_batch_size), 3, cfg.data.image_size, cfg.data.image_size)
    for step in (0, GAN_START):
        recon, aux = model(images.to(torch.bfloat16))
        loss, logs = loss_fn.generator_loss(images, recon.float(), aux, step)
        assert torch.isfinite(loss), (preset, step, logs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss_fn.gan_active(step):
            d_loss, _ = loss_fn.discriminator_loss(images, recon.float(), step)
            disc_opt.zero_grad()
            d_loss.backward()
            disc_opt.step()
            assert torch.isfinite(d_loss) and "gen_adv_random_untrained" in logs
    gpt = _bf16(GPT(generator_config(cfg)).train())
    codes = aux["codes"].reshape(len(images), -1)
    logits = gpt(torch.zeros(len(images), dtype=torch.long), codes)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
    s = cfg.sampling
    result = sample(
        gpt,
        torch.tensor([0, 1]),
        cfg_scale=float(s.cfg_scale),
        cfg_schedule=str(s.cfg_schedule),
        start_ratio=float(s.start_ratio),
        top_p=float(s.top_p),
        top_k=int(s.top_k),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.codes.shape == codes[:2].shape


def _bf16(module):
    """As DeepSpeed bf16 does: parameters cast, buffers kept."""
    for p in module.parameters():
        p.data = p.data.to(torch.bfloat16)
    return module
