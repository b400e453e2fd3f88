"""Bad input is refused early, in one line that names the culprit.

Config values (a ``ConfigError`` from :func:`load_config` that names the key, before any model,
dataset or process group exists) and parallel layouts (at config load, so a ``torchrun`` launch
fails within seconds).
"""

from __future__ import annotations

import pytest
from conftest import CONFIGS

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


def test_zero2_with_model_parallelism_refused_at_load() -> None:
    msg = _refused(["model.n_layers=2", "parallel.pp=2", "parallel.zero_stage=2"])
    assert "parallel.zero_stage: 2 with parallel.tp=1 x parallel.pp=2" in msg


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
