"""Validation in micro-batches and, under DP/TP, on the parallel model.

One process: every forward sees at most ``train.eval_micro_batch`` sequences, and the result
equals a naive loop over those micro-batches. Distributed: each data-parallel replica evaluates
its slice on the model it trains (TP ranks together on their shards), sums are all-reduced, and
the final evaluation equals the single-process run's (same micro-batches).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _dist import torchrun_train

from ilm_megatron.config import load_config
from ilm_megatron.data.word_problem import sample_word_problem
from ilm_megatron.models.lm import build_model
from ilm_megatron.train.engines import token_loss
from ilm_megatron.train.loop import evaluate, train

BASE = [
    "train.batch_size=16",
    "data.seq_len=8",
    "data.eval_seq_len=16",
    "solver.f_max_iter=5",
    "solver.f_tol=1e-12",  # training runs to the cap: layouts train identically
    "solver.eval_tol=1e-3",  # evaluation stops per micro-batch on its own batch maximum
    "solver.phantom_steps=2",
    "model.iterate_init_scale=0.3",
    "train.log_interval=1",
    "train.eval_batches=2",
    "train.eval_micro_batch=4",
    "train.tensorboard=false",
    "train.device=cpu",
    "train.max_steps=3",
    "model.n_layers=2",
    "model.ngroups=2",
]


def test_evaluate_runs_micro_batches_like_a_naive_loop():
    cfg = load_config([], BASE)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(args[0].shape[0]), with_kwargs=True
    )
    got = evaluate(model, cfg, 16, 2, seed=5, device=torch.device("cpu"))
    assert seen == [4] * 8  # 2 batches of 16 in micro-batches of 4
    # naive reference: each micro-batch on its own, statistics pooled by hand
    g = torch.Generator().manual_seed(5)
    cap = math.ceil(model.eval_max_iter() * 16 / 8)
    loss = hits = n = 0.0
    iters = []
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            x, y = sample_word_problem("S3", 16, 16, g)
            for i in range(0, 16, 4):
                out = model(x[i : i + 4], max_iter=cap)
                loss += token_loss(out.logits, y[i : i + 4], 6).item() * y[i : i + 4].numel()
                hits += (out.logits[..., :6].argmax(-1) == y[i : i + 4]).sum().item()
                n += y[i : i + 4].numel()
                iters.append(out.stats.sample_iters.float())
    it = torch.cat(iters)
    assert it.min() < it.max()  # micro-batches stopped at different iterations
    assert got["loss"] == pytest.approx(loss / n, rel=1e-12)
    assert got["acc_all"] == pytest.approx(hits / n, rel=1e-12)
    assert got["iters_mean"] == pytest.approx(it.mean().item(), rel=1e-12)
    assert got["iters_max"] == it.max().item()
    assert got["samples"] == 32


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single")
    train(load_config([], [*BASE, f"run_dir={run}"]), run, quiet=True)
    return run


def _final(run: Path) -> list[dict]:
    return json.loads((run / "final.json").read_text())["eval"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [("parallel.tp=1",), ("parallel.tp=2",), ("parallel.pp=2",), ("parallel.zero_stage=1",)],
    ids=["dp2", "tp2", "pp2", "zero1_dp2"],
)
def test_final_evaluation_matches_single_process(layout, single, tmp_path):
    run = tmp_path / "run"
    torchrun_train(run, *BASE, *layout)
    ref, got = _final(single), _final(run)
    assert [e["length"] for e in got] == [e["length"] for e in ref] == [8, 16]
    for a, b in zip(ref, got):
        for key in ("loss", "acc_all", "acc_last10", "iters_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
        assert b["iters_max"] == a["iters_max"]
        assert b["samples"] == a["samples"] == 2 * 16  # every sequence once, on one replica
