"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean over splits.

10 splits as in the ADM / GigaTok evaluators (paper App. A.3 uses GigaTok's scripts). Takes class
probabilities [N, C]; with Inception that is the 1008-way softmax of the 2015 graph.
"""

from __future__ import annotations

import numpy as np

NUM_SPLITS = 10


def inception_score(
    probs: np.ndarray, num_splits: int = NUM_SPLITS, eps: float = 1e-12
) -> tuple[float, float]:
    """(mean, std) of the score over `num_splits` contiguous splits."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"inception_score needs probabilities [N, C], got shape {probs.shape}")
    num_splits = max(1, min(num_splits, len(probs)))
    scores = []
    for part in np.array_split(probs, num_splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
