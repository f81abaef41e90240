"""Improved precision and recall (Kynkäänniemi et al. 2019), k = 3 as in the ADM evaluator.

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest other point of the same set. Precision: fraction of generated points inside the real
manifold; recall: fraction of real points inside the generated manifold. Distances in float64
(torch.cdist in row chunks, so 50k x 50k never sits in memory at once).
"""
from __future__ import annotations

import numpy as np
import torch

K_NEAREST = 3  # ADM evaluator / Kynkäänniemi et al.


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int = K_NEAREST, chunk: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, have {len(features)}")
    radii = []
    for start in range(0, len(features), chunk):
        d = _distances(features[start:start + chunk], features)
        # k + 1: the smallest distance is the point to itself (0)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def coverage_fraction(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                      chunk: int = 1024) -> float:
    """Fraction of `queries` within radius[j] of some support point j."""
    inside = 0
    for start in range(0, len(queries), chunk):
        d = _distances(queries[start:start + chunk], support)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEAREST) -> dict[str, float]:
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature dims differ: real {real_t.shape[1]}, generated {fake_t.shape[1]}")
    real_radii, fake_radii = knn_radii(real_t, k), knn_radii(fake_t, k)
    return {"precision": coverage_fraction(fake_t, real_t, real_radii),
            "recall": coverage_fraction(real_t, fake_t, fake_radii)}
