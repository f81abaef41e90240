"""Image grids for MLflow artifacts: training-time sample / reconstruction grids and evaluation grids."""

from __future__ import annotations

import math

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int = 8):
    """uint8 HxWx3 grid of images [B, C, H, W] in [0, 1], `nrow` per row, 1 px black gaps and border:
    torchvision's make_grid(padding=1) layout (one image alone is not padded), without importing
    torchvision (and with it torch._dynamo) where only a grid is needed."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    grid = images[0]
    if b > 1:
        cols = min(nrow, b)
        grid = images.new_zeros(c, math.ceil(b / cols) * (h + 1) + 1, cols * (w + 1) + 1)
        for k in range(b):
            y, x = divmod(k, cols)
            grid[:, y * (h + 1) + 1 : (y + 1) * (h + 1), x * (w + 1) + 1 : (x + 1) * (w + 1)] = images[k]
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def grid_rows(rows: list[list[np.ndarray]]) -> np.ndarray:
    """uint8 CHW images, one list per row -> one HWC uint8 grid with 2 px gaps."""
    rows = [r for r in rows if r]
    _, h, w = rows[0][0].shape
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = np.transpose(img, (1, 2, 0))
    return out
