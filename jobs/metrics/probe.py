"""The built-in dataset's stand-in for Inception: a small probe CNN classifier.

Inception weights cannot be downloaded here and Inception features of 32 px synthetic shapes mean
little anyway, so the built-in dataset is scored with a probe trained on its own train split:
  * `fd_probe`: Fréchet distance between probe penultimate features (NOT FID: another network,
    another feature space; never logged under an FID name, DEVELOPERS.md "Pretrained weights");
  * `probe_class_consistency`: probe accuracy on class-conditional samples w.r.t. the class they
    were asked for (a good generator scores near probe_val_accuracy; chance = 1 / num_classes);
  * `probe_val_accuracy`: the probe's accuracy on the real val split (how much to trust the above).
The trained probe is cached under the evaluate stage dir, keyed by a hash of its training data and
settings, with a manifest, so every evaluation of the same data uses the same probe.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infra import storage

PROBE_VERSION = 1  # bump when the architecture or training recipe changes (invalidates caches)
FEATURE_DIM = 128


class ProbeNet(nn.Module):
    """3 stride-2 conv stages + global pooling -> 128-d features -> class logits."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(8, c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.GroupNorm(8, c_out),
                nn.ReLU(),
            ]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.embed(self.trunk(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [-1, 1] at the probe's resolution."""
    x = images.float() / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class ProbeFeatures(nn.Module):
    """Same interface as jobs.metrics.inception.InceptionFeatures: uint8 images -> {pool, probs}."""

    name = "probe"
    has_spatial = False

    def __init__(self, net: ProbeNet, image_size: int):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.image_size = image_size
        self.dims = {"pool": FEATURE_DIM, "probs": net.head.out_features}

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _prepare(images.to(self.net.head.weight.device), self.image_size)
        feats = self.net.features(x)
        return {"pool": feats, "probs": torch.softmax(self.net.head(feats), dim=1)}


def as_nchw_uint8(images: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8:
        raise ValueError(f"probe images must be uint8, got {t.dtype}")
    return t.permute(0, 3, 1, 2).contiguous() if t.shape[-1] == 3 and t.shape[1] != 3 else t


class ProbeAdam:
    """torch.optim.Adam's CPU update (its single-tensor path; betas 0.9 / 0.999, eps 1e-8, no weight
    decay) written out, with CosineAnnealingLR's learning rates (`cosine_annealing_lrs`): any
    torch.optim optimizer imports torch._dynamo on first use (~2 CPU-s), and the probe is trained
    in the `restok` driver, which needs nothing else of it. tests/test_metrics.py checks that the
    parameters equal torch's Adam + CosineAnnealingLR's, bit for bit."""

    def __init__(self, params, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.params = list(params)
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.beta1, self.beta2, self.eps, self.steps = beta1, beta2, eps, 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        step_size = lr / (1 - self.beta1**self.steps)
        bias_correction2_sqrt = (1 - self.beta2**self.steps) ** 0.5
        for param, (exp_avg, exp_avg_sq) in zip(self.params, self.moments, strict=True):
            if param.grad is None:
                continue
            grad = param.grad
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def cosine_annealing_lrs(base_lr: float, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps under CosineAnnealingLR(T_max=steps,
    eta_min=0), stepped after each: its recursive form, so the floats are the scheduler's."""
    lrs, eta_min = [base_lr], 0.0
    for epoch in range(1, steps):
        ratio = (1 + math.cos(math.pi * epoch / steps)) / (1 + math.cos(math.pi * (epoch - 1) / steps))
        lrs.append(ratio * (lrs[-1] - eta_min) + eta_min)
    return lrs


def train_probe(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    image_size: int,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> ProbeNet:
    """A few hundred Adam steps with a cosine schedule and random flips on CPU (seconds at 32 px)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all, y_all = as_nchw_uint8(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    net = ProbeNet(num_classes)
    opt = ProbeAdam(net.parameters())
    net.train()
    for step_lr in cosine_annealing_lrs(lr, steps):
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x = _prepare(x_all[idx], image_size)
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(net(x), y_all[idx])
        net.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(step_lr)
    return net.eval()


@torch.inference_mode()
def probe_accuracy(
    probe: ProbeFeatures, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> float:
    x, y = as_nchw_uint8(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = 0
    for s in range(0, len(x), batch_size):
        correct += int((probe(x[s : s + batch_size])["probs"].argmax(1).cpu() == y[s : s + batch_size]).sum())
    return correct / max(len(x), 1)


def probe_key(images: np.ndarray, labels: np.ndarray, settings: dict) -> str:
    """Hash of the training data and recipe: the cache key."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
    h.update(json.dumps({**settings, "version": PROBE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def ensure_probe(
    cache_url: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    num_classes: int,
    image_size: int,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    steps: int = 300,
    seed: int = 0,
) -> dict:
    """Train (or reuse) the probe; returns its manifest: {path, key, val_accuracy, ...}.

    Files: <cache_url>/probe-<key>/probe.pt and manifest.json (written last, atomically)."""

    settings = {"num_classes": num_classes, "image_size": image_size, "steps": steps, "seed": seed}
    key = probe_key(train_images, train_labels, settings)
    folder = storage.join(cache_url, f"probe-{key}")
    manifest = storage.read_json(storage.join(folder, "manifest.json"))
    if manifest and manifest.get("complete"):
        return {**manifest, "path": storage.join(folder, "probe.pt"), "cached": True}
    t0 = time.time()
    net = train_probe(train_images, train_labels, num_classes, image_size, steps=steps, seed=seed)
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), **settings, "version": PROBE_VERSION}, buf)
    storage.write_bytes_atomic(storage.join(folder, "probe.pt"), buf.getvalue())
    manifest = {
        "complete": True,
        "key": key,
        **settings,
        "version": PROBE_VERSION,
        "num_train_images": len(train_images),
        "train_seconds": round(time.time() - t0, 2),
        "sha256": storage.sha256_bytes(buf.getvalue()),
    }
    if val_images is not None and val_labels is not None and len(val_images):
        manifest["val_accuracy"] = probe_accuracy(ProbeFeatures(net, image_size), val_images, val_labels)
        manifest["num_val_images"] = len(val_images)
    storage.write_json_atomic(storage.join(folder, "manifest.json"), manifest)
    return {**manifest, "path": storage.join(folder, "probe.pt"), "cached": False}


def load_probe(path: str, device: str | torch.device = "cpu") -> ProbeFeatures:

    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"probe weights not found: {path} (trained by the evaluate stage)")
    with fs.open(p, "rb") as fh:
        blob = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    net = ProbeNet(int(blob["num_classes"]))
    net.load_state_dict(blob["state_dict"])
    return ProbeFeatures(net.to(device), int(blob["image_size"]))
