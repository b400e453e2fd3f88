"""``ilm-demo --quick``: the whole pipeline (train, evaluate, plot, TensorBoard) in a tmp dir."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ilm_megatron.config import load_config
from ilm_megatron.tasks.demo import demo_config, main


@pytest.mark.parametrize("kind", ["implicit", "explicit"])
def test_demo_configs_match_yaml(root: Path, kind: str) -> None:
    """configs/tasks/demo_s3_*_mamba2.yaml and the demo's built-in configs are the same run."""
    from_yaml = load_config([root / "configs" / "tasks" / f"demo_s3_{kind}_mamba2.yaml"])
    built = demo_config(kind)
    assert dataclasses.asdict(from_yaml) == dataclasses.asdict(built)


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "results.json" in printed and "acc_last10" in printed

    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "word_problem/S3" and res["train_length"] == 8
    rows = res["rows"]
    assert {(r["model"], r["length"]) for r in rows} == {
        (m, n) for m in ("implicit", "explicit") for n in (8, 16, 32)
    }
    for r in rows:
        assert {"model", "length", "acc_last10", "acc_all", "iters_mean"} <= set(r)
        assert 0 <= r["acc_last10"] <= 1 and 0 <= r["acc_all"] <= 1
        if r["model"] == "explicit":
            assert r["iters_mean"] == 1.0

    for kind in ("implicit", "explicit"):
        run = out / kind
        assert (run / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
        # train() wrote one event file, the demo another (eval scalars and the plot)
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["plot"] is None
        return
    png = out / "length_generalization.png"
    assert res["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--group", "Q8", "--out", str(tmp_path)]) == 2
    assert "Q8" in capsys.readouterr().err
