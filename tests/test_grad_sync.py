"""Bucketed gradient averaging over gloo against one flat all-reduce (float64, exact)."""

from __future__ import annotations

import pytest
import torch
from _dist import run_workers

from ilm_megatron.parallel.grad_sync import buckets


def test_buckets_are_consecutive_bounded_and_split_by_dtype() -> None:
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64)]
    assert buckets(ts, bucket_bytes=80) == [[0, 1], [2], [3]]  # 40 + 40; 120 alone; new dtype
    assert buckets(ts, bucket_bytes=10**6) == [[0, 1, 2], [3]]
    assert buckets([], 80) == []


def _worker(rank: int, bucket_bytes: int) -> None:
    import torch.distributed as dist

    from ilm_megatron.parallel.grad_sync import all_reduce_bucketed

    gen = torch.Generator().manual_seed(100 + rank)
    shapes = [(7, 5), (3,), (64,), (2, 2, 2), (1,)]
    mine = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    flat = torch.cat([t.reshape(-1) for t in mine])
    dist.all_reduce(flat)  # the reference: one flat all-reduce of everything
    want = flat / dist.get_world_size()
    got = [t.clone() for t in mine]
    info = all_reduce_bucketed(got, None, bucket_bytes)
    assert torch.equal(torch.cat([t.reshape(-1) for t in got]), want)
    assert info["bytes"] == flat.numel() * 8
    assert info["buckets"] == len(buckets(mine, bucket_bytes)) > 1
    assert info["max_bucket_bytes"] <= max(bucket_bytes, 64 * 8)


@pytest.mark.slow
def test_bucketed_all_reduce_equals_one_flat_all_reduce() -> None:
    run_workers(_worker, 2, 256, tp=1)
