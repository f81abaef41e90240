"""Image grids for MLflow artifacts: training-time sample / reconstruction grids and evaluation grids."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int = 8):
    """uint8 HxWx3 grid of images in [0, 1]."""
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=1)
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
