"""The built-in class-conditional dataset: one shape x colour per class on a noisy gradient.

Class c draws SHAPES[c % 10] in COLOURS[(c // 10 + c) % 10], so the first ten classes differ in
both shape and colour and up to 100 classes are distinct pairs. Each sample jitters position,
scale, rotation (at most +-20 degrees, so no shape turns into another) and colour, over a
random two-colour gradient with pixel noise. Every sample is drawn from its own RNG keyed on
(seed, split, index), so any shard can be regenerated alone and in any order.

Small enough to learn in minutes at 32 px (tiny tokenizer + generator) and easy for a small CNN.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "frame", "half_disc", "bars", "dots")
COLOURS = (
    ("red", (230, 40, 40)),
    ("green", (40, 200, 60)),
    ("blue", (50, 90, 240)),
    ("yellow", (240, 220, 40)),
    ("magenta", (230, 50, 220)),
    ("cyan", (40, 220, 230)),
    ("orange", (250, 140, 20)),
    ("purple", (140, 60, 200)),
    ("white", (245, 245, 245)),
    ("pink", (250, 160, 180)),
)
MAX_CLASSES = len(SHAPES) * len(COLOURS)
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges at any resolution
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def class_shape_colour(cls: int) -> tuple[str, str, tuple[int, int, int]]:
    shape = SHAPES[cls % len(SHAPES)]
    colour_name, rgb = COLOURS[(cls // len(SHAPES) + cls) % len(COLOURS)]
    return shape, colour_name, rgb


def class_names(num_classes: int) -> list[str]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"data.synthetic.num_classes={num_classes}: must be in 1..{MAX_CLASSES}")
    return [f"{colour}_{shape}" for shape, colour, _ in map(class_shape_colour, range(num_classes))]


def split_id(split: str) -> int:
    return SPLIT_IDS.get(split, zlib.crc32(split.encode()))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), split_id(split), int(index)])


def sample_class(index: int, num_classes: int) -> int:
    # Interleaved, so any prefix (and any evenly spaced subset) is class-balanced.
    return index % num_classes


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _polygon(
    draw: ImageDraw.ImageDraw, centre: np.ndarray, points: np.ndarray, angle: float, fill: int
) -> None:
    pts = _rotate(points, angle) + centre
    draw.polygon([tuple(p) for p in pts], fill=fill)


def _draw_mask(shape: str, size: int, centre: np.ndarray, radius: float, angle: float) -> Image.Image:
    """255 inside the shape, 0 outside, at `size` x `size` (already supersampled)."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    cx, cy = centre
    r = radius

    def box(rr: float) -> tuple[float, float, float, float]:
        return (cx - rr, cy - rr, cx + rr, cy + rr)

    def rect(w: float, h: float, dx: float = 0.0, dy: float = 0.0, fill: int = 255) -> None:
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) + np.array([dx, dy])
        _polygon(d, centre, pts, angle, fill)

    if shape == "circle":
        d.ellipse(box(r), fill=255)
    elif shape == "ring":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * 0.55), fill=0)
    elif shape == "square":
        rect(r * 0.85, r * 0.85)
    elif shape == "frame":
        rect(r * 0.9, r * 0.9)
        rect(r * 0.5, r * 0.5, fill=0)
    elif shape == "triangle":
        pts = np.array([[r * math.cos(a), r * math.sin(a)] for a in np.radians([-90, 30, 150])])
        _polygon(d, centre, pts, angle, 255)
    elif shape == "cross":
        rect(r, r * 0.3)
        rect(r * 0.3, r)
    elif shape == "star":
        pts = [
            [
                (r if k % 2 == 0 else r * 0.42) * math.cos(math.radians(-90 + 36 * k)),
                (r if k % 2 == 0 else r * 0.42) * math.sin(math.radians(-90 + 36 * k)),
            ]
            for k in range(10)
        ]
        _polygon(d, centre, np.array(pts), angle, 255)
    elif shape == "half_disc":
        n = 24
        pts = [[r * math.cos(a), r * math.sin(a) + r * 0.35] for a in np.linspace(math.pi, 2 * math.pi, n)]
        _polygon(d, centre, np.array(pts), angle, 255)
    elif shape == "bars":
        rect(r, r * 0.22, dy=-r * 0.5)
        rect(r, r * 0.22, dy=r * 0.5)
    elif shape == "dots":
        for a in np.radians([-90, 30, 150]):
            off = _rotate(np.array([[r * 0.62 * math.cos(a), r * 0.62 * math.sin(a)]]), angle)[0]
            x, y = cx + off[0], cy + off[1]
            d.ellipse((x - r * 0.36, y - r * 0.36, x + r * 0.36, y + r * 0.36), fill=255)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}; valid: {list(SHAPES)}")
    return mask


def render(cls: int, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution, 3] image of class `cls`."""
    shape, _, rgb = class_shape_colour(cls)
    big = resolution * SUPERSAMPLE

    # Background: a dark-to-mid two-colour linear gradient along a random direction + noise.
    c0 = rng.uniform(0, 90, size=3)
    c1 = rng.uniform(30, 130, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    t = xs * math.cos(theta) + ys * math.sin(theta)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    background = c0 + (c1 - c0) * t[..., None]
    background = background + rng.normal(0, 6, size=background.shape)

    # Foreground: jittered centre (+-15%), radius 28-42% of the side, rotation +-20 degrees.
    centre = (0.5 + rng.uniform(-0.15, 0.15, size=2)) * big
    radius = rng.uniform(0.28, 0.42) * big
    angle = math.radians(rng.uniform(-20, 20))
    colour = np.clip(np.array(rgb) + rng.uniform(-20, 20, size=3), 0, 255)

    mask = _draw_mask(shape, big, centre, radius, angle)
    mask = mask.resize((resolution, resolution), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    shade = 1.0 + 0.12 * (t[..., None] - 0.5)  # slight lighting gradient on the shape
    image = background * (1 - alpha) + colour * shade * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_png(seed: int, split: str, index: int, num_classes: int, resolution: int) -> tuple[bytes, int]:
    """(PNG bytes, class index) of sample `index` of `split`; a pure function of its arguments."""
    cls = sample_class(index, num_classes)
    return encode_png(render(cls, sample_rng(seed, split, index), resolution)), cls
