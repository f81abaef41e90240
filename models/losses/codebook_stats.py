"""Codebook usage and entropy (SPEC "Evaluation protocol / rFID": usage and entropy in bits, eps 1e-8).

Paper App. A.3, Eq. 5-6: p_i = c_i / sum_j c_j and H = -sum_i p_i log2(p_i + eps), eps = 1e-8 (as TiTok).
The histogram is the only state, so per-rank accumulators merge by adding their histograms (`merge`;
across training ranks jobs.training.ray_training.all_reduce_sum_ sums `hist`: models/ stays free of
torch.distributed).
"""

from __future__ import annotations

import torch

ENTROPY_EPS = 1e-8  # paper App. A.3


def codebook_usage(hist: torch.Tensor) -> float:
    """Fraction of the K codebook entries selected at least once."""
    return float((hist > 0).sum().item()) / hist.numel()


def codebook_entropy_bits(hist: torch.Tensor, eps: float = ENTROPY_EPS) -> float:
    """Shannon entropy in bits of the empirical code distribution (paper Eq. 6); 0 for an empty histogram."""
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist.double() / total.double()
    return float(-(p * torch.log2(p + eps)).sum().item())


class CodebookStats:
    """Histogram of selected code indices, accumulated across batches and mergeable across ranks."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        if codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.hist = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Count the indices in `codes` (any shape, e.g. [B, N])."""
        flat = codes.reshape(-1).to(device=self.hist.device, dtype=torch.int64)
        if flat.numel() == 0:
            return
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}), got min {lo} max {hi}")
        self.hist += torch.bincount(flat, minlength=self.codebook_size)

    def merge(self, other: CodebookStats) -> CodebookStats:
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"cannot merge codebook sizes {self.codebook_size} and {other.codebook_size}")
        self.hist += other.hist.to(self.hist.device)
        return self

    def reset(self) -> None:
        self.hist.zero_()

    @property
    def total(self) -> int:
        return int(self.hist.sum().item())

    def usage(self) -> float:
        return codebook_usage(self.hist)

    def entropy_bits(self) -> float:
        return codebook_entropy_bits(self.hist)

    def summary(self) -> dict[str, float]:
        return {
            "codebook_usage": self.usage(),
            "codebook_entropy_bits": self.entropy_bits(),
            "codebook_used_codes": float((self.hist > 0).sum().item()),
            "codebook_total_counts": float(self.total),
        }
