"""The FID Inception network (SPEC "rFID": Inception pool3, the pt_inception-2015-12-05 weights).

Two files of the same TensorFlow 2015-12-05 Inception are accepted, chosen by suffix:
  * `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port, a state dict of torchvision's
    Inception3 with the FID blocks): gives pool3 (2048), logits (1008) and the spatial sFID features;
  * `inception-2015-12-05.pt` (clean-fid's / StyleGAN2-ADA's TorchScript): gives pool3 and class
    probabilities; its internals are opaque, so sFID is not computed with it (reported as such).
`eval.inception_weights` names a local file; empty means the torch hub cache, downloaded on a
connected machine. A missing file with no network is a one-line MissingWeightsError naming the path.
`random-untrained` builds the same network with seeded random weights (tests and smoke runs only):
its numbers are logged with a `_random_untrained` suffix, never as FID/IS (jobs.evaluation.features).

Input: uint8 images [B, 3, H, W] (SPEC: reconstructions/samples are rounded to uint8 first).
The state-dict path's resize to 299 is selectable (`eval.inception_resize`):
  * `tf1` (default): TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres)
    then (x - 128) / 128, what the 2015 graph does (ADM's evaluator feeds it; torch-fidelity,
    the release's rFID, and clean-fid's legacy_tensorflow mode reproduce it);
  * `pytorch_fid`: torch bilinear and x / 127.5 - 1, pytorch-fid's approximation.
The TorchScript file resizes inside itself. IS probabilities are softmax(pool @ W) with the
bias-free 2048 x 1008 weight (ADM: the graph's softmax/logits/MatMul) on both paths;
`logits_weight()` hands W to jobs.metrics.adm.
"""

from __future__ import annotations

import os
import shutil
import urllib.request

import torch
import torch.nn.functional as F
from torch import nn

from jobs.metrics.probe import load_probe
from models.losses.pretrained_weights import (
    RANDOM_UNTRAINED,
    MissingWeightsError,
    load_state_dict_file,
)

STATE_DICT_FILE = "pt_inception-2015-12-05-6726825d.pth"
STATE_DICT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
TORCHSCRIPT_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
POOL_DIM = 2048
NUM_LOGITS = 1008  # the 2015 graph has 1008 outputs (1000 classes + 8 unused)
# ADM evaluator's sFID: the first 7 channels of TF "mixed_6/conv" (17x17), NHWC-flattened -> 2023.
# TF mixed, mixed_1, mixed_2, mixed_3, mixed_4, mixed_5, mixed_6 = torchvision Mixed_5b..5d, 6a..6d,
# and ".../conv" is the block's first (1x1) branch: Mixed_6d.branch1x1.
SPATIAL_CHANNELS = 7
INPUT_SIZE = 299
RESIZE_MODES = ("tf1", "pytorch_fid")
# torch hub convention: the file name carries the first 8 hex digits of the file's sha256
STATE_DICT_SHA256_PREFIX = "6726825d"


def default_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", STATE_DICT_FILE)


def build_fid_inception() -> nn.Module:
    """torchvision Inception3 with the FID blocks (the TF graph's pooling/branch order), random init.
    Its state_dict keys and shapes are those of pt_inception-2015-12-05-6726825d.pth."""
    import torchvision
    from cleanfid.inception_pytorch import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
    )

    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=NUM_LOGITS, init_weights=False
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def _download(url: str, dest: str, timeout: float = 30.0) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".part"
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as fh:
        shutil.copyfileobj(response, fh)
    os.replace(tmp, dest)


def _verify_download(path: str) -> None:
    """A downloaded state dict must hash to the prefix in its name; a bad file is removed."""
    import hashlib

    if path.endswith(".pt"):
        return  # the TorchScript file's published name carries no hash
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(STATE_DICT_SHA256_PREFIX):
        os.remove(path)
        raise ValueError(
            f"downloaded {path} has sha256 {h.hexdigest()[:16]}..., expected {STATE_DICT_SHA256_PREFIX}..."
        )


def resolve_weights(path: str = "", download: bool = True) -> str:
    """The local weights file: `path` (or the hub-cache default), downloaded there when missing
    (the state dict verified by its sha256 prefix)."""
    path = os.path.expanduser(path) if path else default_weights_path()
    if os.path.isfile(path):
        return path
    url = TORCHSCRIPT_URL if path.endswith(".pt") else STATE_DICT_URL
    if download:
        try:
            _download(url, path)
            _verify_download(path)
            return path
        except Exception as error:  # no network, proxy, HTTP error: all end the same way
            reason = f"{type(error).__name__}: {error}"
    else:
        reason = "download disabled"
    raise MissingWeightsError(
        f"Inception weights not found at {path} and the download from {url} failed ({reason}); "
        f"copy {os.path.basename(path)} there or set eval.inception_weights to a local "
        f"{STATE_DICT_FILE} / {TORCHSCRIPT_FILE}"
    )


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 ResizeBilinear, align_corners=False, half_pixel_centers=False: output pixel i
    reads input position i * in / out, linear between floor and the next pixel (edge-clamped)."""

    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    y0, y1, wy = weights(x.shape[-2])
    x0, x1, wx = weights(x.shape[-1])
    rows = x[..., y0, :] + (x[..., y1, :] - x[..., y0, :]) * wy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * wx


def _torchscript_logits_weight(net: nn.Module) -> torch.Tensor:
    """The 2048 x 1008 output weight inside the TorchScript graph (found by shape)."""
    for _name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if tuple(t.shape) == (NUM_LOGITS, POOL_DIM):
            return t.detach().T
        if tuple(t.shape) == (POOL_DIM, NUM_LOGITS):
            return t.detach()
    raise ValueError(f"TorchScript Inception has no {NUM_LOGITS} x {POOL_DIM} output weight")


class InceptionFeatures(nn.Module):
    """uint8 images -> {"pool": [B, 2048], "probs": [B, 1008], "spatial": [B, 2023] (state dict only)}."""

    name = "inception"

    def __init__(self, net: nn.Module, torchscript: bool = False, resize: str = "tf1"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"eval.inception_resize={resize!r}; valid: {list(RESIZE_MODES)}")
        self.net = net.eval()
        for p in self.net.parameters():  # per parameter: ScriptModules lack requires_grad_()
            p.requires_grad_(False)
        self.torchscript = torchscript
        self.resize = resize
        self.has_spatial = not torchscript
        self.dims = {"pool": POOL_DIM, "probs": NUM_LOGITS}
        if self.has_spatial:
            self.dims["spatial"] = SPATIAL_CHANNELS * 17 * 17

    def train(self, mode: bool = True):  # frozen: always eval
        super().train(mode)
        self.net.eval()
        return self

    def logits_weight(self) -> torch.Tensor:
        """[2048, 1008] float32: the bias-free logits weight (ADM's softmax/logits/MatMul)."""
        w = _torchscript_logits_weight(self.net) if self.torchscript else self.net.fc.weight.detach().T
        return w.float().cpu().contiguous()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize == "tf1":
            if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                x = resize_tf1(x, INPUT_SIZE)
            return (x - 128) / 128
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x / 127.5 - 1.0  # pytorch-fid: [0, 1] -> [-1, 1]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(next(self.net.parameters()).device, torch.float32)
        if self.torchscript:  # clean-fid / StyleGAN2-ADA convention: [0, 255] in, resize inside
            pool = self.net(x, return_features=True).reshape(len(x), -1)
            probs = self.net(x, no_output_bias=True).reshape(len(x), -1)
            return {"pool": pool, "probs": probs}
        x = self._prepare(x)
        n = self.net
        x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
        x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c):
            x = block(x)
        spatial = n.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # sFID: TF mixed_6/conv
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)
        x = n.Mixed_6e(n.Mixed_6d(x))
        x = n.Mixed_7c(n.Mixed_7b(n.Mixed_7a(x)))
        pool = torch.flatten(n.avgpool(x), 1)
        probs = torch.softmax(pool @ n.fc.weight.T, dim=1)  # no bias (ADM softmax/logits/MatMul)
        return {"pool": pool, "probs": probs, "spatial": spatial}


def load_inception(
    weights_path: str = "", device: str | torch.device = "cpu", download: bool = True, resize: str = "tf1"
) -> InceptionFeatures:
    """The FID Inception from `weights_path` (see module doc); strict key check for state dicts."""
    if weights_path == RANDOM_UNTRAINED:
        # The same seed in every actor, so all of them compute the same (meaningless) features.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_fid_inception()
            for m in net.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.normal_(m.weight, std=(2.0 / m.weight[0].numel()) ** 0.5)
        return InceptionFeatures(net.to(device))
    path = resolve_weights(weights_path, download=download)
    if path.endswith(".pt"):
        return InceptionFeatures(torch.jit.load(path, map_location=device), torchscript=True, resize=resize)
    net = build_fid_inception()
    state = load_state_dict_file(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an FID Inception state dict (missing {len(missing)} keys e.g. "
            f"{missing[:3]}, unexpected {len(unexpected)} e.g. {unexpected[:3]})"
        )
    return InceptionFeatures(net.to(device), resize=resize)


def load_feature_net(
    kind: str,
    weights_path: str = "",
    device: str | torch.device = "cpu",
    probe_path: str | None = None,
    resize: str = "tf1",
) -> nn.Module:
    """`inception` (real FID) or `probe` (the built-in dataset stand-in, jobs.metrics.probe)."""
    if kind == "inception":
        return load_inception(weights_path, device, resize=resize)
    if kind == "probe":
        if not probe_path:
            raise ValueError(
                "feature_net=probe needs the trained probe file (jobs.metrics.probe.ensure_probe)"
            )
        return load_probe(probe_path, device)
    raise ValueError(f"eval.feature_net={kind!r}; valid: ['inception', 'probe']")
