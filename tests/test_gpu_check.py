"""``tools/gpu_check.sh``: its CPU mode runs every step's plumbing (CI), and a failing or hung
step is reported as FAIL in the record and the exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_writes_the_record(tmp_path) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--cpu", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_cpu.json").read_text())
    names = [s["name"] for s in record["steps"]]
    assert names == [
        "kernel-tests",
        "kernel-report",
        "bench-kernels",
        "train",
        "bench-train-mamba2",
        "bench-train-llama",
    ]
    assert all(s["status"] == "PASS" for s in record["steps"]), record["steps"]
    assert record["passed"] and record["environment"]["packages"]["torch"]
    by = {s["name"]: s["result"] for s in record["steps"]}
    assert by["kernel-report"]["kernels"] and by["bench-kernels"]["failed"] == []
    assert by["train"]["train"]["step"] == 2, by["train"]
    md = (tmp_path / "gpu_cpu.md").read_text()
    assert "| kernel-report | PASS |" in md and "| train | PASS |" in md
    for name in names:
        assert f"PASS {name} (" in out.stdout


def test_failing_and_hung_steps_are_fail(tmp_path) -> None:
    bad = gpu_check.Step("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    hung = gpu_check.Step("hung", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    junk = tmp_path / "junk.json"
    half = gpu_check.Step(
        "half", [sys.executable, "-c", f"open({str(junk)!r}, 'w').write('{{\"a\": ')"], 30,
        json_out=junk,
    )  # fmt: skip
    for step in (bad, hung, half):
        gpu_check.run_step(step)
        assert step.status == "FAIL", (step.name, step.detail)
    assert bad.detail.startswith("rc 3") and "timed out after 1 s" in hung.detail
    assert "invalid_json" in json.dumps(half.result)


def test_device_slug() -> None:
    assert gpu_check.device_slug({"mode": "gpu", "gpu": "NVIDIA H200"}) == "h200"
    assert gpu_check.device_slug({"mode": "gpu", "gpu": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert gpu_check.device_slug({"mode": "cpu"}) == "cpu"


def test_bench_kernels_fails_when_a_backend_fails(tmp_path, monkeypatch, capsys) -> None:
    """A backend that raises is recorded and makes the benchmark exit 1 (it used to exit 0)."""
    import bench_kernels

    real = bench_kernels.bench_backend

    def broken(backend, *args):
        if backend == "reference":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(backend, *args)

    monkeypatch.setattr(bench_kernels, "bench_backend", broken)
    out = tmp_path / "bench.json"
    argv = ["--allow-cpu", "--backends", "triton,reference", "--repeats", "1", "--warmup", "1"]
    assert bench_kernels.main([*argv, "--output", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["failed"] == ["reference"]
    assert "no kernel image" in record["results"]["reference"]["error"]
    assert "fwd_ms" in record["results"]["triton"]
    assert "failed: reference" in capsys.readouterr().err
