"""Where the frozen networks of the losses get their weights (DEVELOPERS.md "Pretrained weights").

Every frozen network (LPIPS VGG, VF teacher, discriminator backbone) has one of two backbone modes:
  * "pretrained": weights from a configured local file, or the normal download when no path is set
    (works on a connected cluster; here it fails with a one-line MissingWeightsError);
  * "random-untrained": random init, for offline tests only. Values computed with it are logged under
    names that say so, never under the real metric's name.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
from torch import nn

BackboneMode = Literal["pretrained", "random-untrained"]
PRETRAINED, RANDOM_UNTRAINED = BACKBONE_MODES = get_args(BackboneMode)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are neither at the configured path nor downloadable; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # guarantee a single line


def check_backbone_mode(mode: str, config_key: str) -> str:
    if mode not in BACKBONE_MODES:
        raise ValueError(f"{config_key}={mode!r} is not a backbone mode; valid: {list(BACKBONE_MODES)}")
    return mode


def metric_suffix(mode: str) -> str:
    """Appended to log names so numbers from a random network never carry the real metric's name."""
    return "" if mode == PRETRAINED else "_random_untrained"


def require_local_file(path: str, what: str, config_key: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"{what} weights not found at {path} (set {config_key} to an existing local file, "
            f"or backbone mode '{RANDOM_UNTRAINED}' for offline tests)"
        )
    return path


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (loaded with weights_only=True, on CPU)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for the parameters, eval mode (the owner keeps it in eval, see FrozenNetwork)."""
    module.requires_grad_(False)
    return module.eval()


class FrozenNetwork(nn.Module):
    """Holds a frozen network in `self.net` and keeps it in eval mode whatever train() is called with
    (LPIPS has dropout layers; a teacher must not switch to train behaviour with the tokenizer)."""

    @property
    def dtype(self) -> torch.dtype:
        """The frozen weights' dtype (an engine may have cast them to bf16); inputs follow it."""
        return next(self.net.parameters()).dtype

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "net"):
            self.net.eval()
        return self


def create_timm_backbone(
    model_name: str, mode: str, weights_path: str | None, config_key: str, **model_kwargs
) -> nn.Module:
    """A frozen timm model: random, from a local file (timm's own loader, so its checkpoint filters and
    position-embedding resampling apply), or from the hub when no path is set."""
    import timm

    check_backbone_mode(mode, config_key)
    if mode == RANDOM_UNTRAINED:
        return freeze(timm.create_model(model_name, pretrained=False, **model_kwargs))
    if weights_path:
        path = require_local_file(weights_path, f"timm model {model_name}", config_key)
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay={"file": path}, **model_kwargs
        )
        return freeze(model)
    try:
        model = timm.create_model(model_name, pretrained=True, **model_kwargs)
    except Exception as error:  # offline / hub unreachable: one line that says what to set
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        raise MissingWeightsError(
            f"could not download timm model {model_name} into {cache} ({type(error).__name__}); "
            f"set {config_key} to a local .safetensors/.pth file, or backbone mode "
            f"'{RANDOM_UNTRAINED}' for offline tests"
        ) from None
    return freeze(model)
