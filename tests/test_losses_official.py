"""restok's tokenizer losses against outputs of the authors' code (issue 13, Deliver 2).

tests/fixtures/official/losses_tiny.* were made by make_loss_fixtures.py (same folder) running the
release (Kwai-Kolors/ResTok e0059cb); LOSSES.md there lists the entries. Every comparison is exact
up to float rounding (1e-5): the random augmentations (DiffAugment, the discriminator's 224 crop,
LPIPS pad/crop) draw from the global torch / python RNGs in the release's order, so the same seed
gives the same augmentation, and no comparison needs to fall back to "equal in distribution".
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.losses.diffaugment import augment_images
from models.losses.discriminator import LeCamEMA
from pipeline.convert_losses import LOSS_ATOL, release_head_key, verify_losses

FIXTURES = Path(__file__).parent / "fixtures" / "official"
GROUPS = {"hinge": 1, "lecam": 16, "diffaug": 8, "ema": 21, "lpips": 5, "disc": 3, "full": 12}


@pytest.fixture(scope="module")
def rows():
    return verify_losses(FIXTURES)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_matches_the_release(rows, group):
    mine = [r for r in rows if r[0].split("/")[1] == group]
    assert len(mine) == GROUPS[group]
    bad = [(name, diff) for name, diff, tol, ok, _ in mine if not ok or tol > LOSS_ATOL]
    assert not bad, bad


def test_the_fixtures_tell_the_variants_apart():
    """The stored values would catch the pre-issue-13 behaviour (so the rows above mean something)."""
    meta = json.loads((FIXTURES / "losses_tiny.json").read_text())
    t = load_file(str(FIXTURES / "losses_tiny.safetensors"))
    weight = meta["release_config"]["losses"]["lecam_regularization_weight"]
    old = LeCamEMA(0.99, "per_logit")
    worst = 0.0
    for i, ref in enumerate(meta["values"]["lecam_steps"]):
        reg = old.loss(t[f"lecam/step{i}/logits_real"], t[f"lecam/step{i}/logits_fake"])
        worst = max(worst, abs(reg.item() - ref["lecam_loss_weighted"] / weight))
    assert worst > 100 * LOSS_ATOL
    torch.manual_seed(0)
    signed = augment_images(t["diffaug/input"].clone(), meta["diffaug"]["policy"], 0.5, "signed")
    assert (signed - t["diffaug/seed0"]).abs().max() > 100 * LOSS_ATOL


def test_release_head_keys_map_to_ours():
    assert release_head_key("3.0.0.weight_orig") == "3.pointwise.0.parametrizations.weight.original"
    assert release_head_key("0.1.fn.1.bias") == "0.residual.1.bias"
    assert release_head_key("4.2.weight_u") == "4.to_logit.parametrizations.weight.0._u"
    with pytest.raises(KeyError, match="unexpected release discriminator head key"):
        release_head_key("0.3.weight")


def test_generator_script_uses_only_the_release():
    script = (FIXTURES / "make_loss_fixtures.py").read_text()
    assert "from modeling.modules import" in script
    assert not any(
        line.lstrip().startswith(("from models", "from pipeline", "from jobs", "import models"))
        for line in script.splitlines()
    )
