"""LPIPS-VGG perceptual loss (SPEC "loss": LPIPS-VGG weight 1.0; also an rFID-protocol metric).

Built on the `lpips` package (0.1.4), which holds two sets of weights:
  * the VGG16 trunk: lpips calls torchvision `vgg16(pretrained=True)`, i.e. the torchvision
    IMAGENET1K_V1 file `vgg16-397923af.pth` downloaded into the torch hub cache;
  * the five linear heads ("v0.1"), shipped inside the package (lpips/weights/v0.1/vgg.pth).
Here lpips is built with a random trunk and no heads, then both are loaded explicitly, so that the
trunk can come from a configured local file (or the normal torchvision download), and a missing file
gives one line naming the path instead of a download attempt deep inside lpips.
"""

from __future__ import annotations

import os
import random
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from models.losses.pretrained_weights import (
    PRETRAINED,
    RANDOM_UNTRAINED,
    FrozenNetwork,
    MissingWeightsError,
    check_backbone_mode,
    freeze,
    load_state_dict_file,
    metric_suffix,
    require_local_file,
)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
# Its URL, downloaded through torch.hub as torchvision does (without importing torchvision, and
# torch._dynamo with it, in the driver that checks availability): tests/test_losses_perceptual.py.
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
AUGMENT_PAD = 15  # release perceptual_loss.py padding_and_trimming


def pad_crop_resize(
    images: torch.Tensor, recon: torch.Tensor, rng: random.Random | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's LPIPS augmentation in training: both images padded by 15 px (replicate), one
    random crop that keeps each side's inner 0..15 px margin (top, bottom, left, right drawn in that
    order with `random.randrange(0, 16)`, the module RNG unless `rng` is given), bicubic resize back
    to H x W. Same crop for the whole batch and for both images."""
    draw = (rng or random).randrange
    h, w = images.shape[-2:]
    pad = (AUGMENT_PAD,) * 4
    images = F.pad(images, pad, mode="replicate")
    recon = F.pad(recon, pad, mode="replicate")
    hp, wp = images.shape[-2:]
    top, bottom = draw(0, AUGMENT_PAD + 1), hp - draw(0, AUGMENT_PAD + 1)
    left, right = draw(0, AUGMENT_PAD + 1), wp - draw(0, AUGMENT_PAD + 1)

    def crop(x):
        return F.interpolate(
            x[:, :, top:bottom, left:right], size=(h, w), mode="bicubic", align_corners=False
        )

    return crop(images), crop(recon)


def bundled_linear_heads_path() -> str:
    """The v0.1 VGG linear heads shipped inside the lpips package."""
    import lpips

    return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")


def torchvision_vgg16_cache_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def download_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's VGG16 ImageNet weights from its URL into the torch.hub cache."""
    return torch.hub.load_state_dict_from_url(VGG16_URL, progress=False)


def _torchvision_vgg16_state_dict(vgg_weights_path: str | None) -> dict[str, torch.Tensor]:
    if vgg_weights_path:
        return load_state_dict_file(
            require_local_file(vgg_weights_path, "LPIPS VGG16 trunk", "lpips_vgg_weights")
        )
    cached = torchvision_vgg16_cache_path()
    if os.path.isfile(cached):
        return load_state_dict_file(cached)
    try:  # the normal download on a connected machine
        return download_vgg16_state_dict()
    except Exception as error:
        raise MissingWeightsError(
            f"LPIPS VGG16 trunk weights not found at {cached} and the download failed "
            f"({type(error).__name__}); set lpips_vgg_weights to a local {VGG16_FILE}, or backbone "
            f"mode '{RANDOM_UNTRAINED}' for offline tests"
        ) from None


class LPIPS(FrozenNetwork):
    """Frozen LPIPS-VGG distance between images in [0, 1] (scaled to lpips' [-1, 1] here).

    backbone: "pretrained" (torchvision VGG16 trunk from `vgg_weights_path` or the normal download)
    or "random-untrained" (random trunk, for offline tests; `name` then says so). The linear heads
    always come from `linear_weights_path`, default the file bundled with lpips.
    """

    def __init__(
        self,
        backbone: str = PRETRAINED,
        vgg_weights_path: str | None = None,
        linear_weights_path: str | None = None,
    ):
        super().__init__()
        import lpips

        self.backbone = check_backbone_mode(backbone, "lpips_backbone")
        self.name = "lpips" + metric_suffix(self.backbone)
        # Resolve every file before building anything, so a missing one fails fast.
        vgg_state = _torchvision_vgg16_state_dict(vgg_weights_path) if self.backbone == PRETRAINED else None
        heads_path = require_local_file(
            linear_weights_path or bundled_linear_heads_path(), "LPIPS linear heads", "lpips_linear_weights"
        )
        # Built on the meta device (torchvision's vgg16 would otherwise initialise its 120M-param
        # classifier, which lpips drops) and then filled: trunk from the file or random, heads from
        # the file, and ScalingLayer rebuilt (its two constant buffers). pretrained=False: lpips loads
        # no heads itself; pnet_rand=True: no torchvision download.
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained=`
            net = lpips.LPIPS(pretrained=False, net="vgg", version="0.1", pnet_rand=True, verbose=False)
        net = net.to_empty(device="cpu")
        net.scaling_layer = lpips.ScalingLayer()
        filled = {f"scaling_layer.{k}" for k in net.scaling_layer.state_dict()}
        filled |= self._fill_trunk(net, vgg_state)
        # lin0..lin4 (the `lins` ModuleList aliases the same modules).
        heads = {k: v for k, v in load_state_dict_file(heads_path).items() if re.match(r"lin\d\.", k)}
        expected = {k for k in net.state_dict() if re.match(r"lin\d\.", k)}
        if set(heads) != expected:
            raise ValueError(
                f"LPIPS linear heads file {heads_path} has keys {sorted(heads)}, expected {sorted(expected)}"
            )
        net.load_state_dict(heads, strict=False)
        filled |= {f"lins.{k[3:]}" for k in heads} | set(heads)
        unfilled = set(net.state_dict()) - filled
        assert not unfilled, f"LPIPS tensors left uninitialised: {sorted(unfilled)}"
        self.net = freeze(net)

    @staticmethod
    def _fill_trunk(net: nn.Module, vgg_state: dict[str, torch.Tensor] | None) -> set[str]:
        """Copy torchvision `features.<i>.*` into lpips' slices (which keep the same module indices),
        or initialise them like torchvision's VGG when there is no state (random-untrained)."""
        filled = set()
        for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
            for index, layer in getattr(net.net, slice_name).named_children():
                if not isinstance(layer, nn.Conv2d):
                    continue
                if vgg_state is not None:
                    layer.load_state_dict({k: vgg_state[f"features.{index}.{k}"] for k in ("weight", "bias")})
                else:
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
                filled |= {f"net.{slice_name}.{index}.weight", f"net.{slice_name}.{index}.bias"}
        return filled

    def forward(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance [B] for images in [0, 1]."""
        dtype = self.dtype
        distance = self.net(images.to(dtype) * 2 - 1, recon.to(dtype) * 2 - 1)  # lpips expects [-1, 1]
        return distance.flatten(1).sum(1).float()
