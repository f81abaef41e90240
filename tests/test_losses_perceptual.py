"""LPIPS-VGG perceptual loss (SPEC "loss"), random-trunk mode offline."""

import pytest
import torch

from models.losses.perceptual import LPIPS
from models.losses.pretrained_weights import MissingWeightsError


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return LPIPS(backbone="random-untrained")


def test_self_distance_zero_and_grows_with_noise(lpips_random):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(lpips_random(images, images), torch.zeros(2))
    noise = torch.randn_like(images)
    distances = [
        lpips_random(images, (images + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)
    ]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert lpips_random.name == "lpips_random_untrained"


def test_frozen_backward_reaches_recon_only(lpips_random):
    images = torch.rand(2, 3, 32, 32)
    recon = torch.rand(2, 3, 32, 32, requires_grad=True)
    lpips_random.train()  # must stay eval: lpips has dropout before its linear heads
    assert not lpips_random.net.training
    first = lpips_random(images, recon)
    assert torch.equal(first, lpips_random(images, recon))
    first.mean().backward()
    assert recon.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_random.parameters())


def test_vgg_trunk_from_local_torchvision_file(lpips_random, tmp_path):
    # A torchvision-format file (features.<i>.weight/bias) made from the random trunk.
    state = {}
    for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
        for index, layer in getattr(lpips_random.net.net, slice_name).named_children():
            for key, value in layer.state_dict().items():
                state[f"features.{index}.{key}"] = value
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    loaded = LPIPS(backbone="pretrained", vgg_weights_path=str(path))
    assert loaded.name == "lpips"
    reference = lpips_random.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_missing_vgg_weights_is_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(MissingWeightsError) as info:
        LPIPS(backbone="pretrained", vgg_weights_path=str(missing))
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "lpips_vgg_weights" in message
    with pytest.raises(ValueError, match="random-untrained"):
        LPIPS(backbone="random")


def test_vgg16_url_is_torchvisions():
    from torchvision.models import VGG16_Weights

    from models.losses.perceptual import VGG16_FILE, VGG16_URL

    assert VGG16_URL == VGG16_Weights.IMAGENET1K_V1.url and VGG16_URL.endswith("/" + VGG16_FILE)
