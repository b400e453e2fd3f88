"""The analyses' writer (``ilm_megatron.analysis.report.write_report``): every output or none."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from ilm_megatron.analysis.report import write_report
from ilm_megatron.tasks.plots import pyplot


def _figure():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


def test_writes_json_png_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = write_report(tmp_path, "demo", {"x": 1.5}, {"curve": _figure()})
    assert json.loads((tmp_path / "demo.json").read_text()) == res
    assert res["x"] == 1.5 and res["outputs"]["png"] == [str(tmp_path / "curve.png")]
    png = tmp_path / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(png.stat().st_mode) & 0o044, "outputs are readable by others"
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["demo/curve"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "demo.json", "tensorboard"]


def test_a_failure_leaves_no_partial_output(tmp_path: Path) -> None:
    """A result that is not JSON (a NaN) is refused before anything is written."""
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        write_report(out, "demo", {"x": float("nan")}, {"curve": _figure()})
    assert not out.exists()


def test_without_a_folder_nothing_is_written(tmp_path: Path) -> None:
    res = write_report(None, "demo", {"x": 1}, {"curve": _figure()})
    assert res == {"x": 1} and not list(tmp_path.iterdir())
