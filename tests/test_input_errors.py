"""Bad input is refused early, in one line that names the culprit.

Config values (``ConfigError`` from :func:`load_config`, before any model, data or process group
exists), parallel layouts (at config load, so a ``torchrun`` launch fails within seconds), empty
or corrupt datasets (at preprocessing, at train start, where batches are read) and the flags of
``tools/check_parallel.py`` that duplicate config keys.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, ROOT

from ilm_megatron.config import ConfigError, load_config

# ------------------------------------------------------------------------------ config values


def _refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.clip_grad=-1"], "train.clip_grad"),
        (["train.save_interval=-1"], "train.save_interval"),
        (["train.eval_interval=-1"], "train.eval_interval"),
        (["train.eval_batches=0"], "train.eval_batches"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.beta1=1.0"], "train.beta1"),
        (["train.beta2=-0.5"], "train.beta2"),
        (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
        (["train.threads=-2"], "train.threads"),
        (["train.global_batch_tokens=-16"], "train.global_batch_tokens"),
        (["train.peak_tflops=-1"], "train.peak_tflops"),
        (["train.seed=-1"], "train.seed"),
        (["train.bounded_max_iter=-1"], "train.bounded_max_iter"),
        (["train.bounded_phantom_steps=0"], "train.bounded_phantom_steps"),
        (["data.eval_seq_len=-1"], "data.eval_seq_len"),
        (["model.d_state=0"], "model.d_state"),
        (["model.expand=0"], "model.expand"),
        (["model.ffn_hidden_size=-1"], "model.ffn_hidden_size"),
        (["model.norm_eps=0"], "model.norm_eps"),
        (["model.init_std=-0.02"], "model.init_std"),
        (["model.dt_min=0"], "model.dt_min"),
        (["model.dt_max=0.0001"], "model.dt_max"),
        (["model.dt_init_floor=0"], "model.dt_init_floor"),
        (["model.arch=llama", "model.rope_theta=0"], "model.rope_theta"),
    ],
)
def test_bad_numeric_values_name_the_key(overrides: list[str], key: str) -> None:
    msg = _refused(overrides)
    assert f"{key}:" in msg and "command line" in msg


def test_zero_clip_and_intervals_stay_allowed() -> None:
    cfg = load_config(
        [],
        ["train.clip_grad=0", "train.save_interval=0", "train.eval_interval=0",
         "train.warmup_steps=0", "train.weight_decay=0", "train.beta1=0", "train.min_lr_ratio=0",
         "train.threads=0", "train.min_lr_ratio=1"],
    )  # fmt: skip
    assert cfg.train.clip_grad == 0 and cfg.train.save_interval == 0


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.headdim=0"], "model.headdim"),
        (["model.ngroups=0"], "model.ngroups"),
        (["model.arch=llama", "model.n_heads=0"], "model.n_heads"),
        (["model.headdim=-16"], "model.headdim"),
    ],
)
def test_zero_divisors_are_config_errors(overrides: list[str], key: str) -> None:
    """Derived sizes divide by these: a ConfigError naming the key, not a ZeroDivisionError."""
    assert f"{key}: must be > 0" in _refused(overrides)


def test_shipped_configs_still_load() -> None:
    base = CONFIGS / "tasks" / "state_tracking_implicit_mamba2.yaml"
    for path in sorted(CONFIGS.rglob("*.yaml")):
        load_config([base, path] if path.name.startswith("group_") else [path])  # overlays


# ---------------------------------------------------------------------------- parallel layout


def test_more_stages_than_layers_refused_at_load() -> None:
    msg = _refused(["model.n_layers=2", "parallel.pp=3"])
    assert "parallel.pp: 3 pipeline stages need at least 3 layers, model.n_layers=2" in msg
    load_config([], ["model.n_layers=3", "parallel.pp=3"])  # one layer per stage is enough


def test_sequence_parallel_layout_refused_at_load() -> None:
    msg = _refused(["parallel.tp=2", "model.ngroups=2", "data.eval_seq_len=9",
                    "parallel.sequence_parallel=true"])  # fmt: skip
    assert "data.eval_seq_len: 9 is not a multiple of parallel.tp=2" in msg
    msg = _refused(["parallel.tp=2", "model.ngroups=2", "data.seq_len=7",
                    "parallel.sequence_parallel=true"])  # fmt: skip
    assert "data.seq_len: 7 is not a multiple of parallel.tp=2" in msg


def test_bad_bucket_size_refused_and_zero2_with_model_parallelism_accepted() -> None:
    assert "parallel.bucket_mb: must be > 0, got 0" in _refused(["parallel.bucket_mb=0"])
    load_config([], ["model.n_layers=2", "parallel.pp=2", "parallel.zero_stage=2"])


def test_bad_pipeline_ring_settings_refused_at_load() -> None:
    msg = _refused(["parallel.microbatches=4", "parallel.ring_calls=3"])
    assert "parallel.ring_calls: must divide parallel.microbatches=4, got 3" in msg
    assert "parallel.in_flight: must be >= 0, got -1" in _refused(["parallel.in_flight=-1"])
    msg = _refused(["parallel.p2p_dtype=fp16"])
    assert "parallel.p2p_dtype: must be 'fp32' or 'bf16', got 'fp16'" in msg
    cfg = load_config([], ["parallel.microbatches=4", "parallel.ring_calls=2",
                           "parallel.p2p_dtype=bf16", "parallel.in_flight=1"])  # fmt: skip
    assert (cfg.parallel.ring_calls, cfg.parallel.p2p_dtype, cfg.parallel.in_flight) == (
        2, "bf16", 1,
    )  # fmt: skip


def test_batch_not_divisible_by_microbatches_refused_at_load() -> None:
    msg = _refused(["train.batch_size=10", "parallel.microbatches=4"])
    assert "train.batch_size: 10 is not divisible by parallel.microbatches=4" in msg
    # the global batch derived from tokens is checked too
    msg = _refused(["data.seq_len=16", "train.global_batch_tokens=96", "parallel.microbatches=4"])
    assert "train.batch_size: 6 is not divisible by parallel.microbatches=4" in msg


def test_launch_size_checked_at_load_when_world_size_is_known(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    msg = _refused(["model.arch=llama", "parallel.tp=2"])
    assert "parallel.tp=2 x parallel.pp=1 needs a multiple of 2 processes, got WORLD_SIZE=3" in msg
    monkeypatch.setenv("WORLD_SIZE", "4")
    msg = _refused(["model.arch=llama", "parallel.tp=2", "train.batch_size=6",
                    "parallel.microbatches=2"])  # fmt: skip
    assert (
        "train.batch_size: 6 must split evenly over 2 data-parallel rank(s) (WORLD_SIZE=4 / "
        "(parallel.tp=2 x parallel.pp=1)) x parallel.microbatches=2" in msg
    )
    load_config([], ["model.arch=llama", "parallel.tp=2", "train.batch_size=12",
                     "parallel.microbatches=3"])  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "1")  # a plain process may load a TP config (tools spawn)
    load_config([], ["model.arch=llama", "parallel.tp=2"])
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "WORLD_SIZE" in _refused([])


def test_torchrun_layout_error_before_any_process_group(monkeypatch, capsys) -> None:
    """What each rank of ``torchrun --nproc-per-node 2 ... parallel.pp=2`` does with one layer."""
    import torch.distributed as dist

    from ilm_megatron.train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["parallel.pp=2", "model.n_layers=1"]) == 2
    err = capsys.readouterr().err
    assert "parallel.pp: 2 pipeline stages need at least 2 layers, model.n_layers=1" in err
    assert len(err.strip().splitlines()) == 1
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------ data


TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. "


def _preprocess(inputs: list[Path], out: Path, *extra: str, seq_len: int = 16) -> int:
    from ilm_megatron.data.preprocess import main

    argv = ["--input", *map(str, inputs), "--output", str(out), "--tokenizer", "byte"]
    return main([*argv, "--seq-len", str(seq_len), "--samples-per-shard", "4", *extra])


def test_preprocess_empty_input_fails_and_writes_nothing(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert _preprocess([empty], out) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and str(empty.resolve()) in line[0] and "no samples" in line[0]
    assert not out.exists() or not any(out.iterdir())


def test_preprocess_too_short_input_fails(tmp_path, capsys) -> None:
    """Documents shorter than one sample: every token is a dropped tail, 0 samples."""
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "tiny"}) + "\n")
    out = tmp_path / "out"
    assert _preprocess([short], out, seq_len=64) == 2
    err = capsys.readouterr().err
    assert str(short.resolve()) in err and "no samples" in err
    assert not out.exists() or not any(out.iterdir())


def test_preprocess_with_one_empty_file_among_others_succeeds(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("")
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": TEXT * 4}) + "\n")
    assert _preprocess([tmp_path / "in"], tmp_path / "out") == 0


def test_merge_of_empty_parts_fails(tmp_path, capsys) -> None:
    """A job of ``--input-shard`` may hold no sample; the merged dataset may not."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from merge_manifests import main as merge
    finally:
        sys.path.pop(0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    parts = tmp_path / "parts"
    for i in range(2):
        assert _preprocess([empty], parts, "--input-shard", f"{i}/2") == 0
    capsys.readouterr()
    assert merge(["--output", str(tmp_path / "merged"), str(parts)]) == 2
    err = capsys.readouterr().err
    assert "no samples" in err and str(parts) in err
    assert not (tmp_path / "merged").exists()


def _shards_cfg(path: Path, *extra: str):
    return load_config(
        [],
        ["data.task=shards", f"data.path={path}", "data.seq_len=16", "model.vocab_size=257",
         "train.batch_size=4", *extra],
    )  # fmt: skip


def _dataset(tmp_path: Path) -> Path:
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i} " + TEXT * 3}) + "\n" for i in range(4)))
    out = tmp_path / "shards"
    assert _preprocess([src], out) == 0
    return out


def test_empty_dataset_at_train_start_names_the_path(tmp_path) -> None:
    from ilm_megatron.data.loader import DataError
    from ilm_megatron.train.data import build_train_data

    good = _dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    man = json.loads((good / "manifest.json").read_text())
    man.update(samples=0, shards=[], tokens=0)
    (empty / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError) as e:
        build_train_data(_shards_cfg(empty))
    msg = str(e.value)
    assert f"data.path={empty}" in msg and "no samples" in msg and "\n" not in msg
    from ilm_megatron.errors import UserError

    assert isinstance(e.value, UserError)  # the training CLI prints it as one line
    from ilm_megatron.data.loader import StatefulLoader

    with pytest.raises(DataError, match=f"{empty}: the dataset holds no samples"):
        StatefulLoader(empty, batch_size=2)


def _poke_token(shard: Path, member: int, position: int, value: int) -> None:
    """Overwrite one token of one sample in place (same size: the shard stays readable)."""
    with tarfile.open(shard) as tf:
        info = tf.getmembers()[member]
    with open(shard, "r+b") as fh:
        fh.seek(info.offset_data)
        arr = np.load(io.BytesIO(fh.read(info.size)))
        arr[position] = value
        bio = io.BytesIO()
        np.save(bio, arr, allow_pickle=False)
        assert len(bio.getvalue()) == info.size
        fh.seek(info.offset_data)
        fh.write(bio.getvalue())


def test_token_beyond_vocab_names_shard_id_and_vocab(tmp_path) -> None:
    from ilm_megatron.data.loader import DataError
    from ilm_megatron.train.data import build_train_data

    data = _dataset(tmp_path)
    shards = sorted(data.glob("shard-*.tar"))
    for shard in shards:  # every sample of every shard: whichever the first batch draws
        with tarfile.open(shard) as tf:
            n = len(tf.getmembers())
        for m in range(n):
            _poke_token(shard, m, 5, 300)
    src = build_train_data(_shards_cfg(data, "train.seed=3"))
    with pytest.raises(DataError) as e:
        src.next_batch()
    msg = str(e.value)
    assert "\n" not in msg
    assert "token id 300" in msg and "model.vocab_size=257" in msg
    assert any(str(s) in msg for s in shards)


def test_token_beyond_vocab_in_validation_batches(tmp_path) -> None:
    from ilm_megatron.data.loader import DataError
    from ilm_megatron.train.data import build_train_data

    data = _dataset(tmp_path)
    last = sorted(data.glob("shard-*.tar"))[-1]
    with tarfile.open(last) as tf:
        n = len(tf.getmembers())
    _poke_token(last, n - 1, 0, 1000)  # the last sample: the validation split
    src = build_train_data(_shards_cfg(data, "data.val_fraction=0.2"))
    with pytest.raises(DataError, match=r"token id 1000 .*model.vocab_size=257") as e:
        src.val_batches(4, 3)  # 12 sequences: the whole split of 11
    assert str(last) in str(e.value)


# ------------------------------------------------------------------------ tools/check_parallel


def _check_parallel(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cfg = str(CONFIGS / "models" / "implicit_llama_tiny.yaml")
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_parallel.py"), "--config", cfg, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_parallel_override_takes_effect() -> None:
    """``parallel.tp=3`` on the command line is the TP size (3 does not divide 4 heads)."""
    proc = _check_parallel("--json", "parallel.tp=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tensor parallel size 3 does not divide model n_heads=4" in proc.stderr
    proc = _check_parallel("--json", "parallel.pp=3")  # the tiny model has 2 layers
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.pp: 3 pipeline stages need at least 3 layers" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--tp", "2", "parallel.tp=1"), "--tp 2 conflicts with the override parallel.tp=1"),
        (("--pp", "2", "parallel.pp=1"), "--pp 2 conflicts with the override parallel.pp=1"),
        (
            ("--microbatches", "2", "parallel.microbatches=4"),
            "--microbatches 2 conflicts with the override parallel.microbatches=4",
        ),
        (("--seed", "1", "train.seed=2"), "--seed 1 conflicts with the override train.seed=2"),
        (("--seq-len", "8", "data.seq_len=12"), "--seq-len 8 conflicts with the override"),
        (
            ("--batch", "2", "train.batch_size=6"),
            "--batch 2 x 1 micro-batch(es) conflicts with the override train.batch_size=6",
        ),
    ],
)
def test_check_parallel_flag_override_conflicts(args: tuple[str, ...], message: str) -> None:
    proc = _check_parallel(*args, "--json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and proc.stdout == ""


def test_check_parallel_flags_follow_overrides() -> None:
    """Flag, else override, else default; the config records the values that run."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_parallel as cp
    finally:
        sys.path.pop(0)
    overrides = ["parallel.tp=4", "parallel.microbatches=2", "train.batch_size=8",
                 "data.seq_len=16", "model.d_model=32"]  # fmt: skip
    args = cp.build_parser().parse_args(["--config", "c.yaml", "--seed", "7", *overrides])
    cp.resolve_flags(args, cp.override_values(args.overrides))
    got = (args.tp, args.pp, args.microbatches, args.seed, args.seq_len, args.batch)
    assert got == (4, 1, 2, 7, 16, 4)
    args = cp.build_parser().parse_args(["--config", "c.yaml", "--tp", "2", "parallel.tp=2"])
    cp.resolve_flags(args, cp.override_values(args.overrides))  # agreeing: fine
    assert (args.tp, args.batch, args.seq_len) == (2, cp.DEFAULT_BATCH, 12)
    cfg = load_config([CONFIGS / "models" / "implicit_llama_tiny.yaml"], cp.flag_overrides(args))
    assert (cfg.parallel.tp, cfg.train.batch_size, cfg.data.seq_len) == (2, 2, 12)
    with pytest.raises(cp.ToolError, match="parallel.tp expects int"):
        cp.override_values(["parallel.tp=two"])
