"""Config loading: every shipped YAML loads, and every error names key, source and expectation."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from ilm_megatron.config import Config, ConfigError, load_config


def test_defaults_are_the_quickstart_run():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.arch == "mamba2" and cfg.model.implicit
    assert cfg.data.group == "S3"


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_config_loads(path):
    cfg = load_config([path])
    name = path.stem
    assert cfg.model.arch == ("mamba2" if "mamba2" in name else "llama")
    assert cfg.model.implicit == ("explicit" not in name)
    if name.endswith("_pretrain"):
        assert (cfg.solver.f_max_iter, cfg.solver.phantom_steps) == (4, 1)
    if name.endswith("_implicit") and "tiny" not in name:
        expect = 24 if cfg.model.arch == "mamba2" else 32
        assert (cfg.solver.f_max_iter, cfg.solver.phantom_steps) == (expect, 4)


def test_paper_sizes_present():
    for arch in ("mamba2", "llama"):
        for size in ("130m", "370m", "760m", "1.3b"):
            for mode in ("explicit", "pretrain", "implicit"):
                assert (CONFIGS / "models" / f"{arch}_{size}_{mode}.yaml").is_file()
    for name in ("implicit_mamba2", "implicit_llama", "explicit_mamba2", "explicit_llama"):
        assert (CONFIGS / "models" / f"{name}_tiny.yaml").is_file()


def test_train_configs_load():
    for path in (CONFIGS / "train").glob("*.yaml"):
        load_config([path])


def test_dotted_overrides_apply_and_later_files_win(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("solver:\n  f_max_iter: 8\nmodel:\n  d_model: 128\n")
    cfg = load_config(
        [CONFIGS / "models" / "implicit_mamba2_tiny.yaml", a], ["solver.f_max_iter=32"]
    )
    assert cfg.solver.f_max_iter == 32
    assert cfg.model.d_model == 128
    assert cfg.model.n_layers == 2  # from the first file


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config([p])
    msg = str(e.value)
    assert "model.d_modle" in msg and str(p) in msg and "d_model" in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("modle:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config([p])


def test_wrong_type_names_key_file_and_type(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: sixty-four\n")
    with pytest.raises(ConfigError) as e:
        load_config([p])
    msg = str(e.value)
    assert "model.d_model" in msg and str(p) in msg and "int" in msg and "sixty-four" in msg


def test_wrong_type_on_command_line():
    with pytest.raises(ConfigError) as e:
        load_config([], ["solver.f_tol=abc"])
    assert "solver.f_tol" in str(e.value) and "float" in str(e.value)
    assert "command line" in str(e.value)


@pytest.mark.parametrize("bad", ["solver.f_tol=0", "solver.f_tol=-1e-3"])
def test_nonpositive_tolerance_rejected(bad):
    with pytest.raises(ConfigError, match=r"solver\.f_tol: must be > 0"):
        load_config([], [bad])


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match="solver.phantom_damping"):
        load_config([], ["solver.phantom_damping=1.5"])
    with pytest.raises(ConfigError, match="model.headdim"):
        load_config([], ["model.headdim=48"])  # 2*64 = 128 not divisible by 48
    with pytest.raises(ConfigError, match="model.arch"):
        load_config([], ["model.arch=rwkv"])
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config([], ["model.vocab_size=4"])  # S3 has 6 symbols
    with pytest.raises(ConfigError, match="train.precision: must be 'auto', 'fp32' or 'bf16'"):
        load_config([], ["train.precision=fp16"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(["nope.yaml"])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["solver.f_tol"])
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config([p])


def test_value_errors_name_the_file(tmp_path):
    p = tmp_path / "tol.yaml"
    p.write_text("solver:\n  f_tol: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config([p])
    assert str(p) in str(e.value) and "solver.f_tol" in str(e.value)


@pytest.mark.parametrize("path", sorted((CONFIGS / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_every_task_config_loads(path):
    overlay = path.name.startswith("group_")  # overlays go on top of a state-tracking run
    base = [CONFIGS / "tasks" / "state_tracking_implicit_mamba2.yaml"] if overlay else []
    cfg = load_config([*base, path])
    if path.name.startswith("catbabi_"):
        assert cfg.data.task == "catbabi" and cfg.model.vocab_size == 178
        assert cfg.model.implicit == ("implicit" in path.name)
        assert cfg.model.arch == ("llama" if "llama" in path.name else "mamba2")


def test_global_batch_in_tokens():
    cfg = load_config([], ["train.global_batch_tokens=4096", "data.seq_len=16"])
    assert cfg.train.batch_size == 256
    with pytest.raises(ConfigError, match="global_batch_tokens: 4000 is not a multiple of"):
        load_config([], ["train.global_batch_tokens=4000", "data.seq_len=48"])
