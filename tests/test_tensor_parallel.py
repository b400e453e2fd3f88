"""Tensor parallelism (``tp`` backend) against the single-process model, 2 gloo processes on CPU.

Each worker builds the single-process model from one seed, shards its weights into the TP model and
compares logits, loss, every gathered gradient, solver iteration counts on every rank, a TP=2
checkpoint loaded at TP=1, and sequential decoding (see
:func:`ilm_megatron.parallel.compare.compare_with_single_process`).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

TOL = 1e-5


@pytest.mark.parametrize(
    "arch, overrides",
    [("mamba2", ("model.ngroups=2",)), ("llama", ())],
)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sequence_parallel"])
@pytest.mark.slow
def test_tp2_matches_single_process(
    tmp_path, arch: str, overrides: tuple[str, ...], sp: bool
) -> None:
    """Training-mode logits, loss, every gradient, iterations, eval, checkpoint and sequential
    decoding at TP=2 against one process; with sequence parallelism the iterate (and the norms
    and residual stream) hold half of the 12 positions on each rank."""
    from _dist import run_workers

    from ilm_megatron.parallel.compare import compare_with_single_process

    extra = ("parallel.sequence_parallel=true",) if sp else ()
    cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2", *extra))
    assert cfg.model.backend == "tp" and cfg.model.sequence_parallel == sp
    res_path, ckpt = tmp_path / "res.json", tmp_path / "ckpt.pt"
    run_workers(compare_with_single_process, 2, cfg, 1234, str(res_path), str(ckpt))
    r = json.loads(res_path.read_text())
    assert r["tp"] == 2
    assert r["sequence_parallel"] == sp and r["iterate_positions_per_rank"] == (6 if sp else 12)
    assert r["embedding_rows_per_rank"] == cfg.model.padded_vocab_size // 2  # vocab-parallel
    assert r["grad_name_mismatch"] == []
    assert r["max_abs_logit_diff"] < TOL, r
    assert r["loss_diff"] < TOL, r
    assert r["max_rel_grad_diff"] < TOL, r
    assert r["iters_equal"], r
    assert r["eval_logit_diff"] < TOL, r
    assert r["checkpoint_logit_diff"] < TOL, r
    assert r["sequential_logit_diff"] < TOL, r


def test_shard_unshard_roundtrip() -> None:
    from ilm_megatron.parallel.checkpoint import shard_tensor, unshard_tensors

    parts = (8, 8, 4, 4, 2)
    w = torch.randn(sum(parts), 3)
    shards = [shard_tensor(w, 0, parts, r, 2) for r in range(2)]
    assert shards[0].shape == (13, 3)
    # rank 1 holds the second half of every component
    assert torch.equal(shards[1][:4], w[4:8]) and torch.equal(shards[1][8:10], w[18:20])
    assert torch.equal(unshard_tensors(shards, 0, parts), w)


def test_tp_config_validation() -> None:
    from ilm_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="does not divide model ngroups=1"):
        tiny_config("mamba2", overrides=("parallel.tp=2",))
    with pytest.raises(ConfigError, match="does not divide model n_heads=4"):
        tiny_config("llama", overrides=("parallel.tp=3",))
    with pytest.raises(ConfigError, match="does not divide model padded vocabulary=66"):
        tiny_config("llama", overrides=("parallel.tp=4", "model.vocab_size=66"))
    assert (
        tiny_config("mamba2", overrides=("parallel.tp=2", "model.ngroups=2")).model.backend == "tp"
    )
    assert tiny_config("llama").model.backend == "local"


def test_tp_backend_single_process_equals_local() -> None:
    """Without a TP group the ``tp`` backend builds the same parameters as ``local``."""
    from ilm_megatron.models.lm import build_model

    cfg = tiny_config("mamba2", overrides=("model.backend=tp",))
    torch.manual_seed(0)
    a = build_model(cfg.model)
    b = build_model(tiny_config("mamba2").model)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 8))
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-6)


@pytest.mark.slow
def test_bench_sequence_parallel_same_step(tmp_path) -> None:
    """``tools/bench_sequence_parallel.py`` at toy size: both modes compute the same loss and
    solver iterations, and the sequence-parallel iterate holds half the positions per rank."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "sp.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_sequence_parallel.py"), "--json", "--seq",
         "32", "--d-model", "64", "--n-layers", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["iterate_positions"] == {"tp": 32, "sequence_parallel": 16}
    assert r["loss"]["tp"] == pytest.approx(r["loss"]["sequence_parallel"], rel=1e-6)
    assert r["iters"]["tp"] == r["iters"]["sequence_parallel"]
