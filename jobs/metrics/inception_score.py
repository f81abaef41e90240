"""Inception Score of a set of images as one number (Salimans et al. 2016):
exp(E_x KL(p(y|x) || p(y))), with p(y) the mean over the whole set.

Reconstructions use this form. The paper (App. A.3) scores them with TiTok's protocol, whose
evaluator (the release's `evaluator/evaluator.py`) sums p and p log p over all images and takes one
score, so neither the order the images come in nor how the actors split them can change it (10
contiguous slices of a class-sorted val split each hold a tenth of the classes and score several
times lower). Generated samples use ADM's 5,000-image splits in sample order (`jobs/metrics/adm.py`).
Takes class probabilities [N, C]; with Inception that is the 1008-way softmax of the 2015 graph.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-16  # the release's evaluator (`_is_eps`)


def inception_score(probs: np.ndarray, eps: float = EPS) -> float:
    """One score over all rows of probs [N, C], in float64 (independent of the rows' order)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"inception_score needs probabilities [N, C], got shape {p.shape}")
    total = p.sum(0)
    kl_sum = (p * np.log(p + eps)).sum() - (total * np.log(total / len(p) + eps)).sum()
    return float(np.exp(kl_sum / len(p)))
