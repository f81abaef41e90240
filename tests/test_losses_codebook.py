"""Codebook usage / entropy (SPEC evaluation row; paper App. A.3 Eq. 5-6)."""

import math

import pytest
import torch

from jobs.training.ray_training import all_reduce_sum_
from models.losses.codebook_stats import CodebookStats, codebook_entropy_bits, codebook_usage


def test_uniform_histogram_entropy_is_log2_k():
    for k in (2, 16, 8192):
        hist = torch.full((k,), 7, dtype=torch.int64)
        # Exactly -log2(1/K + eps) by Eq. 6; eps = 1e-8 shifts it below log2(K) by ~eps*K/ln2 bits.
        assert codebook_entropy_bits(hist) == pytest.approx(-math.log2(1 / k + 1e-8), abs=1e-12)
        assert codebook_entropy_bits(hist) == pytest.approx(math.log2(k), abs=2e-4)
        assert codebook_usage(hist) == 1.0


def test_usage_counts_and_hand_entropy():
    stats = CodebookStats(8)
    stats.update(torch.tensor([[0, 1, 1, 3]]))
    stats.update(torch.tensor([[3, 3]]))
    assert stats.hist.tolist() == [1, 2, 0, 3, 0, 0, 0, 0]
    assert stats.usage() == pytest.approx(3 / 8)
    p = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    assert stats.entropy_bits() == pytest.approx(float(-(p * torch.log2(p + 1e-8)).sum()), abs=1e-12)
    summary = stats.summary()
    assert summary["codebook_used_codes"] == 3 and summary["codebook_total_counts"] == 6


def test_single_code_and_empty_histogram():
    stats = CodebookStats(4)
    assert stats.entropy_bits() == 0.0 and stats.usage() == 0.0
    stats.update(torch.zeros(10, dtype=torch.long))
    assert stats.entropy_bits() == pytest.approx(0.0, abs=1e-6)
    assert stats.usage() == 0.25


def test_merge_equals_one_accumulator():
    codes = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(0))
    whole, a, b = CodebookStats(32), CodebookStats(32), CodebookStats(32)
    whole.update(codes)
    a.update(codes[:2])
    b.update(codes[2:])
    assert torch.equal(a.merge(b).hist, whole.hist)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(CodebookStats(16))


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match=r"\[0, 4\).*max 4"):
        CodebookStats(4).update(torch.tensor([0, 4]))


def _rank_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        stats = CodebookStats(8)
        stats.update(torch.tensor([rank, rank, 7]))  # rank 0: {0, 0, 7}; rank 1: {1, 1, 7}
        all_reduce_sum_(stats.hist)
        if rank == 0:
            torch.save(stats.hist, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "hist.pt"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    assert torch.load(result).tolist() == [2, 2, 0, 0, 0, 0, 0, 2]
