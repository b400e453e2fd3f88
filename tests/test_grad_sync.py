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


@pytest.mark.slow
def test_bench_grad_sync_reports_bytes(tmp_path) -> None:
    """``tools/bench_grad_sync.py`` at toy size: ZeRO-1 sends a reduce of the gradients to their
    owners plus an all-gather of the weights, against the flat all-reduce of the gradients."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gs.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_grad_sync.py"), "--json", "--d-model", "32",
         "--n-layers", "1", "--vocab", "64", "--repeats", "1", "--bucket-mb", "0.01",
         "--modes", "flat,zero1", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    grad = r["grad_bytes"]
    assert r["modes"]["flat"]["bytes"] == {"all_reduce": grad}
    z = r["modes"]["zero1"]["bytes"]
    # each rank gathers its partition (half, padded to DeepSpeed's alignment)
    assert z["reduce"] == grad and 0 <= z["all_gather_into_tensor"] - grad // 2 <= 512
    assert r["bus_bytes_over_flat"]["zero1"] == pytest.approx(1.5, abs=0.01)  # (1 + 1/2) / 1
