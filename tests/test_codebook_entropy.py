"""Codebook entropy penalty of the quantizer (models/tokenizer/restok.py VectorQuantizer)."""

import math

import torch

from models.tokenizer import tokenizer_config_for
from models.tokenizer.restok import VectorQuantizer


def _z(seed=0, shape=(4, 16, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_off_by_default_is_release_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, 0.25).train()
    _, info = vq(_z())
    assert "entropy_loss" not in info
    assert torch.allclose(info["vq_loss"], info["commitment_loss"] + info["codebook_loss"])


def test_penalty_in_training_only_and_non_negative():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, 0.25, entropy_weight=0.5, entropy_temperature=0.05).train()
    _, info = vq(_z())
    ent = info["entropy_loss"]
    assert 0.0 <= float(ent.detach()) <= math.log(64) + 1e-5
    expected = info["commitment_loss"] + info["codebook_loss"] + 0.5 * ent
    assert torch.allclose(info["vq_loss"], expected)
    _, info_eval = vq.eval()(_z())
    assert "entropy_loss" not in info_eval


def test_penalty_reaches_codes_no_token_selects():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, 0.25, entropy_weight=1.0).train()
    z = _z().requires_grad_(True)
    _, info = vq(z)
    info["vq_loss"].backward()
    unused = torch.ones(64, dtype=torch.bool)
    unused[info["codes"].unique()] = False
    assert unused.any()
    # Without the penalty only selected codes get gradients; with it the unused ones do too.
    assert vq.embedding.weight.grad[unused].abs().sum() > 0


def test_cpu_nano_preset_turns_it_on_and_release_presets_keep_it_off():
    assert tokenizer_config_for("cpu-nano").entropy_weight > 0
    for name in ("official-l", "tiny-fixture", "restok-l"):
        assert tokenizer_config_for(name).entropy_weight == 0.0
