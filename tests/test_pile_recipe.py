"""The Pile pretraining recipe (``configs/train/pile_*_implicit.yaml``, ``docs/pretraining.md``).

Every recipe file is checked against the model configs and the budget it states. Then the 1.3B
implicit Mamba2 and Llama recipes themselves run end to end, scaled down by overrides only (width,
depth, length, global batch, step count; ``solver.f_tol=1e-9`` so that every solve runs exactly to
its cap): Pile-style ``.jsonl.zst`` files go through ``tools/preprocess_data.py`` as two
``--input-shard`` jobs and ``tools/merge_manifests.py``, as in the documented SLURM path, then
``ilm-train`` trains through both curriculum phases. What the run did is read back from its
TensorBoard events: the bounded phase ran ``bounded_max_iter`` solver iterations per step, the free
phase the free cap, and the phase switched after ``bounded_fraction`` of the tokens.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from conftest import CONFIGS, ROOT

from ilm_megatron.config import load_config
from ilm_megatron.train.loop import train

SIZES = ("130m", "370m", "760m", "1.3b")
# token budget per size class (docs/pretraining.md): ~20 tokens per parameter below 1.3B (the
# Mamba/Mamba2 scaling-law budgets), the paper's 207B (one epoch of the deduplicated Pile) at 1.3B
BUDGET = {"130m": 2.5e9, "370m": 7e9, "760m": 15e9, "1.3b": 207e9}
FREE_CAP = {"mamba2": 24, "llama": 32}
RECIPES = [(arch, size) for arch in ("mamba2", "llama") for size in SIZES]


def recipe(arch: str, size: str) -> Path:
    return CONFIGS / "train" / f"pile_{arch}_{size}_implicit.yaml"


@pytest.mark.parametrize(("arch", "size"), RECIPES)
def test_recipe_is_the_paper_setup(arch, size):
    cfg = load_config([recipe(arch, size)])
    # the model and free-phase solver are those of configs/models, the bounded phase that of the
    # matching *_pretrain.yaml
    shape = load_config([CONFIGS / "models" / f"{arch}_{size}_implicit.yaml"])
    bounded = load_config([CONFIGS / "models" / f"{arch}_{size}_pretrain.yaml"]).solver
    assert cfg.model == shape.model and cfg.solver == shape.solver
    assert cfg.model.vocab_size == 50277 and cfg.model.padded_vocab_size == 50288
    t, d = cfg.train, cfg.data
    assert (t.curriculum, t.bounded_fraction) == ("bounded_then_free", 0.8)
    assert (t.bounded_max_iter, t.bounded_phantom_steps) == (bounded.f_max_iter, 1)
    assert bounded.phantom_steps == t.bounded_phantom_steps
    assert (cfg.solver.f_max_iter, cfg.solver.phantom_steps) == (FREE_CAP[arch], 4)
    assert (d.task, d.seq_len, d.path) == ("shards", 2048, "data/pile-neox")
    assert t.global_batch_tokens == 524288 and t.batch_size == 256
    assert t.max_steps == round(BUDGET[size] / t.global_batch_tokens)
    assert (t.beta1, t.beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert t.precision == "bf16" and t.tensorboard
    assert 0 < t.warmup_steps < t.max_steps // 50
    assert d.val_fraction > 0 and t.eval_batches > 0
    # validation only runs on logging steps, so its interval must be a multiple of theirs
    assert t.eval_interval % t.log_interval == 0 and 0 < t.save_interval <= t.eval_interval


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families that he is considered as the rightful property of some one or other. "
)


def _pile_corpus(root: Path) -> Path:
    """Three Pile-format ``NN.jsonl.zst`` files of a few dozen short documents each."""
    src = root / "pile"
    src.mkdir()
    sets = ("Pile-CC", "Books3", "Wikipedia (en)")
    for i in range(3):
        lines = [
            json.dumps({"text": f"[{i}.{j}] " + TEXT[j:] + TEXT[:j],
                        "meta": {"pile_set_name": sets[(i + j) % 3]}})
            for j in range(24)
        ]  # fmt: skip
        data = ("\n".join(lines) + "\n").encode()
        (src / f"{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return src


def _tool(name: str, *args: str) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"{name} {' '.join(args)}:\n{res.stderr}"


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


STEPS = 10  # 8 bounded steps (80% of the tokens), then 2 free ones
TINY = {  # width and depth only; every other model setting is the recipe's
    "mamba2": ["model.d_model=32", "model.d_state=8", "model.headdim=16", "model.chunk_size=16"],
    "llama": ["model.d_model=32", "model.n_heads=4", "model.ffn_hidden_size=64"],
}


@pytest.fixture(scope="module")
def pile_shards(tmp_path_factory) -> Path:
    """Pile-format files through the documented path: two preprocessing jobs, then the merge."""
    root = tmp_path_factory.mktemp("pile")
    src = _pile_corpus(root)
    parts, shards = root / "parts", root / "pile-byte"
    for job in ("0/2", "1/2"):  # the SLURM array of docs/pretraining.md, two jobs
        _tool("preprocess_data.py", "--input", str(src), "--output", str(parts),
              "--tokenizer", "byte", "--seq-len", "32", "--samples-per-shard", "16",
              "--input-shard", job, "--resume")  # fmt: skip
    _tool("merge_manifests.py", "--output", str(shards), str(parts))
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["samples"] >= 8 * STEPS
    assert manifest["tokenizer"]["vocab_size"] == 257
    return shards


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_recipe_runs_both_phases_scaled_down(tmp_path, pile_shards, one_thread, arch):
    run = tmp_path / "run"
    cfg = load_config(
        [recipe(arch, "1.3b")],
        [
            f"run_dir={run}",
            f"data.path={pile_shards}",
            "model.vocab_size=257",  # the byte tokenizer's (256 bytes + EOD)
            "model.n_layers=1",
            *TINY[arch],
            "data.seq_len=32",
            "data.num_workers=0",
            "train.global_batch_tokens=256",  # 8 sequences of 32
            f"train.max_steps={STEPS}",
            "train.warmup_steps=2",
            "train.log_interval=1",  # one TensorBoard point per step
            "train.save_interval=5",
            "train.eval_interval=5",
            "solver.f_tol=1e-9",  # never reached: every solve runs to the cap in force
        ],
    )
    t = cfg.train
    assert (t.curriculum, t.precision, t.tensorboard) == ("bounded_then_free", "bf16", True)
    # what the recipe asks for, taken before the run (which must not change it)
    fraction, bounded_cap, free_cap = t.bounded_fraction, t.bounded_max_iter, cfg.solver.f_max_iter
    assert (fraction, bounded_cap, free_cap) == (0.8, 4, FREE_CAP[arch])
    res = train(cfg, run, quiet=True)
    assert (run / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert math.isfinite(res.final["eval"][0]["loss"])
    assert set(_scalars(run, "val/loss")) == {5, STEPS}

    # the phase switches once, after bounded_fraction of the tokens
    phase = _scalars(run, "solver/phase")
    assert sorted(phase) == list(range(1, STEPS + 1))
    n_bounded = math.ceil(fraction * STEPS)
    assert phase == {s: float(s > n_bounded) for s in phase}, phase
    tokens = {json.loads(ln)["step"]: json.loads(ln)["tokens"]
              for ln in (run / "metrics.jsonl").read_text().splitlines()}  # fmt: skip
    switch = tokens[n_bounded] / tokens[STEPS]  # tokens seen before the first free step
    assert abs(switch - fraction) <= 1 / STEPS

    # iterations per step: the bounded cap, then the free phase's own (24 Mamba2, 32 Llama)
    for tag in ("solver/iters_max", "solver/iters_mean"):
        iters = _scalars(run, tag)
        bounded = {s: v for s, v in iters.items() if s <= n_bounded}
        free = {s: v for s, v in iters.items() if s > n_bounded}
        assert bounded == dict.fromkeys(bounded, float(bounded_cap)), (tag, bounded)
        assert free == dict.fromkeys(free, float(free_cap)), (
            f"{tag}: the free phase ran {free} solver iterations, expected the free cap "
            f"solver.f_max_iter={free_cap} after the switch at step {n_bounded}"
        )
