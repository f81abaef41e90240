"""VF alignment loss and its frozen timm teacher (SPEC "VF alignment"; paper Sec. 3.4 Eq. 1-3)."""

import math

import pytest
import torch
from safetensors.torch import save_file

from models.losses.pretrained_weights import MissingWeightsError
from models.losses.vf_align import (
    VFAlignLoss,
    VFTeacher,
    cosine_target,
    margin_cosine_loss,
    resample_patch_grid,
)

# Test-only teachers: a 2-block random vit_tiny, and a 1-block random DINOv3-layout model
# (CLS + 4 register tokens, RoPE) to exercise the prefix-token split.
TINY = dict(
    model_name="vit_tiny_patch16_224", backbone="random-untrained", image_size=64, model_kwargs={"depth": 2}
)
TINY_DINOV3 = dict(
    model_name="vit_small_patch16_dinov3",
    backbone="random-untrained",
    image_size=64,
    model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2},
)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return VFTeacher(**TINY)


def _at_cosine(target: torch.Tensor, cos: float) -> torch.Tensor:
    """A vector whose cosine with `target` (last dim) is exactly `cos`."""
    t = torch.nn.functional.normalize(target, dim=-1)
    noise = torch.randn_like(t)
    ortho = torch.nn.functional.normalize(noise - (noise * t).sum(-1, keepdim=True) * t, dim=-1)
    return cos * t + math.sqrt(1 - cos**2) * ortho


def test_teacher_outputs_and_frozen(teacher):
    cls, patches, grid = teacher(torch.rand(2, 3, 48, 48))  # resized to the teacher's 64 px
    assert cls.shape == (2, 192) and patches.shape == (2, 16, 192) and grid == (4, 4)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.net.training
    assert teacher.name == "vf_random_untrained"


def test_dinov3_register_tokens_are_split_off():
    dinov3 = VFTeacher(**TINY_DINOV3)
    assert dinov3.num_prefix_tokens == 5  # CLS + 4 registers
    cls, patches, grid = dinov3(torch.rand(1, 3, 64, 64))
    tokens = dinov3.net.forward_features((torch.rand(1, 3, 64, 64) - dinov3.mean) / dinov3.std)
    assert tokens.shape[1] == 5 + 16 and patches.shape == (1, 16, 64) and cls.shape == (1, 64)


def test_loss_zero_when_features_equal_teacher_up_to_margin(teacher):
    images = torch.rand(2, 3, 64, 64)
    cls, patches, _ = teacher(images)
    loss = VFAlignLoss(teacher, margin=0.25)
    total, terms = loss(images, cls.clone(), patches.clone())
    assert total.item() == pytest.approx(0.0, abs=1e-6) and set(terms) == {"enc", "dec"}
    # release convention: target cos 0.75. At cos 0.8 still zero, at cos 0.5 exactly 0.25 per term.
    assert loss(images, _at_cosine(cls, 0.8), _at_cosine(patches, 0.8))[0].item() == pytest.approx(
        0, abs=1e-6
    )
    total, terms = loss(images, _at_cosine(cls, 0.5), _at_cosine(patches, 0.5))
    assert terms["enc"].item() == pytest.approx(0.25, abs=1e-5)
    assert total.item() == pytest.approx(0.5, abs=1e-5)
    # paper convention (Eq. 1-2 as printed): relu(0.85 - cos).
    paper = VFAlignLoss(teacher, margin=0.85, convention="paper", dec_weight=0.0)
    assert paper(images, _at_cosine(cls, 0.8))[0].item() == pytest.approx(0.05, abs=1e-5)


def test_margin_helpers():
    assert cosine_target(0.25) == 0.75 and cosine_target(0.85, "paper") == 0.85
    with pytest.raises(ValueError, match="convention"):
        cosine_target(0.25, "other")
    x = torch.randn(3, 8)
    assert margin_cosine_loss(x, -x, 0.25).item() == pytest.approx(1.75)


def test_decoder_grid_resampling_and_backward(teacher):
    constant = torch.ones(1, 16, 3)
    assert torch.allclose(resample_patch_grid(constant, (4, 4), (2, 2)), torch.ones(1, 4, 3))
    patches = torch.randn(1, 16, 3)
    assert resample_patch_grid(patches, (4, 4), (4, 4)) is patches
    images = torch.rand(2, 3, 64, 64)
    enc = torch.randn(2, 192, requires_grad=True)
    dec = torch.randn(2, 2 * 2, 192, requires_grad=True)  # a 2x2 decoder grid vs the 4x4 teacher grid
    total, terms = VFAlignLoss(teacher)(images, enc, dec)
    total.backward()
    assert enc.grad.abs().sum() > 0 and dec.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="width 100"):
        VFAlignLoss(teacher)(images, torch.randn(2, 100))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_teacher_weights_from_local_file(teacher, tmp_path, suffix):
    path = tmp_path / f"teacher{suffix}"
    state = {k: v.contiguous() for k, v in teacher.net.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = VFTeacher(TINY["model_name"], "pretrained", str(path), 64, TINY["model_kwargs"])
    assert loaded.name == "vf"
    for key, value in loaded.net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_weights_offline_is_one_line(tmp_path):
    missing = tmp_path / "dinov3.safetensors"
    with pytest.raises(MissingWeightsError) as info:
        VFTeacher(TINY["model_name"], "pretrained", str(missing), 64, TINY["model_kwargs"])
    assert "\n" not in str(info.value) and str(missing) in str(info.value)
    # No path: the hub download fails offline (conftest sets HF_HUB_OFFLINE=1), one line again.
    with pytest.raises(MissingWeightsError) as info:
        VFTeacher(TINY["model_name"], "pretrained", None, 64, TINY["model_kwargs"])
    assert "\n" not in str(info.value) and "vf_teacher_weights" in str(info.value)
