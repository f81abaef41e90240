"""Shared test setup: a local Ray, the nano model overrides, a nano config and a random tokenizer
export with its manifest (what extraction, generator training and evaluation read).

Test modules import the plain helpers (`from conftest import nano_cfg, ...`: pytest puts tests/ on
the path) and request the fixtures by name."""
import os

# Two cores shared by every process a test starts (DEVELOPERS.md "Known traps"); set before torch
# is imported (it reads OMP_NUM_THREADS then), hence the imports below this block.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from configs.loading import load_config
from infra import paths
from infra.manifest import write_manifest
from infra.stages import stage_fingerprint
from jobs.training import checkpoints
from models.tokenizer import ResTok

# A nano ResTok: 16 tokens in levels [1, 1, 2, 4, 8], 64 codes, no VF heads (seconds on a CPU).
NANO_VOCAB, NANO_LEVELS = 64, [1, 1, 2, 4, 8]
NANO_TOKENIZER = [
    "tokenizer.encoder_size=nano", "tokenizer.decoder_size=nano", "tokenizer.image_size=32",
    "tokenizer.pixel_channels=16", "tokenizer.channel_mult=[1,2,2]", "tokenizer.num_res_blocks=1",
    "tokenizer.z_channels=32", "tokenizer.cnn_norm_groups=8", f"tokenizer.levels={NANO_LEVELS}",
    f"tokenizer.codebook_size={NANO_VOCAB}", "tokenizer.num_scales=2", "tokenizer.vf_align=none",
]
# The built-in data at 32 px, 4 classes, one prep task.
NANO_DATA = ["data.image_size=32", "data.synthetic.num_classes=4", "data.synthetic.val_per_class=2",
             "data.prep_tasks=1"]


def nano_cfg(work_dir, *extra):
    """A config with the nano tokenizer on the built-in 32 px data under `work_dir` (+ overrides)."""
    return load_config(None, [f"work_dir={work_dir}", *NANO_DATA, *NANO_TOKENIZER, *extra])


def write_tokenizer_export(cfg, seed=None, stage_dir=None):
    """A train_tokenizer export of random weights in the real format, with a complete manifest."""
    if seed is not None:
        torch.manual_seed(seed)
    tok = ResTok(checkpoints.tokenizer_config(cfg))
    stage_dir = stage_dir or paths.stage_dir(cfg, "train_tokenizer")
    checkpoints.write_export(stage_dir, "tokenizer", tok.state_dict(), tok.state_dict(), cfg)
    write_manifest(stage_dir, "train_tokenizer", stage_fingerprint(cfg, "train_tokenizer"), complete=True,
                   levels=list(tok.levels), codebook_size=int(tok.codebook_size),
                   num_tokens=int(tok.num_tokens))
    return tok


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (and the evaluation actor pool it starts, closed after)."""
    import ray  # here: importing Ray costs seconds, and most test modules never start it

    from jobs.evaluation.pool import close_pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    close_pool()
    ray.shutdown()
