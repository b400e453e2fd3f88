"""The GPU check: every step with a timeout and a PASS/FAIL line, a summary table, and a record.

Steps (GPU mode, on a CUDA machine with the environment installed; no network needed):

1. ``environment`` -- GPU, driver, CUDA and package versions.
2. ``kernel-tests`` -- the Triton kernel and model tests on compiled kernels
   (``TRITON_INTERPRET`` unset, exact fp32 via ``ILM_KERNELS_FP32_PRECISION=ieee``).
3. ``kernel-report`` -- every kernel compiled for sm_90a: registers, spills, shared memory, MMA.
4. ``bench-kernels`` -- SSD forward / forward+backward against the reference and mamba-ssm,
   gradient errors, peak memory, strided (model-layout) inputs.
5. ``train`` -- 30 steps of the built-in default on CUDA (bf16 autocast).
6. ``bench-train`` -- training throughput and MFU of the 130M implicit Mamba2 and Llama.

``--cpu`` runs the same steps' plumbing on a CPU machine: the kernel tests in the Triton
interpreter (a subset), the kernel report, the benchmark's interpreter smoke run, a 2-step CPU
run and a one-step tiny benchmark. CI runs it, so the script cannot rot.

Writes ``<out-dir>/gpu_<device>.json`` and ``.md`` (``docs/benchmarks/gpu_h200.*`` on an H200;
``gpu_cpu.*`` in CPU mode), atomically. Exit status 0 only if every step passed. Usage::

    bash tools/gpu_check.sh                # GPU box
    bash tools/gpu_check.sh --cpu --out-dir /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import now_iso, write_atomic

PROG = "gpu_check"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "torch",
    "triton",
    "megatron-core",
    "deepspeed",
    "mamba-ssm",
    "causal-conv1d",
    "flash-attn",
    "transformers",
    "ilm-megatron",
)


@dataclass
class Step:
    """One check: a command, its timeout, and what it produced."""

    name: str
    cmd: list[str]
    timeout: int
    env: dict[str, str] = field(default_factory=dict)
    json_out: Path | None = None  # the step writes its result here
    status: str = "SKIP"
    seconds: float = 0.0
    detail: str = ""
    result: Any = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU plumbing run (interpreter, tiny)")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"), help="record folder")
    p.add_argument("--only", default="", help="comma-separated step names to run (default all)")
    return p.parse_args(argv)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(cpu: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": now_iso(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "packages": versions(),
        "mode": "cpu" if cpu else "gpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if q.returncode == 0 and q.stdout.strip():
            info["nvidia_smi"] = q.stdout.strip().splitlines()[0]
            info["driver"] = q.stdout.strip().splitlines()[0].split(",")[-1].strip()
    return info


def device_slug(info: dict[str, Any]) -> str:
    if info["mode"] == "cpu":
        return "cpu"
    name = info.get("gpu", "gpu").lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)  # "nvidia h200" -> h200
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def plan(cpu: bool, work: Path) -> list[Step]:
    py = sys.executable
    tools = ROOT / "tools"
    compiled = {"TRITON_INTERPRET": "", "ILM_KERNELS_FP32_PRECISION": "ieee"}
    steps: list[Step] = []
    tests = ["tests/test_triton_ssd.py", "tests/test_triton_ops.py", "tests/test_model_triton.py"]
    if cpu:
        steps.append(
            Step(
                "kernel-tests",
                [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests[0], tests[2],
                 "-k", "fp32 and odd-len or forward_matches"],
                300,
                {"TRITON_INTERPRET": "1", "ILM_KERNELS_FP32_PRECISION": "ieee"},
            )
        )  # fmt: skip
    else:
        steps.append(
            Step("kernel-tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                  *tests], 900, compiled)
        )  # fmt: skip
    report = work / "kernel_report.json"
    groups = "ssd_fwd,ssd_bwd" if cpu else "ssd_fwd,ssd_bwd,conv1d_fwd,conv1d_bwd,norm_fwd,norm_bwd"
    steps.append(
        Step(
            "kernel-report",
            [py, str(tools / "kernel_report.py"), "--arch", "sm_90a", "--output", str(report),
             "--groups", groups] + (["--dtypes", "bfloat16", "--dstate-256", ""] if cpu else []),
            600,
            {"TRITON_INTERPRET": ""},
            report,
        )
    )  # fmt: skip
    bench = work / "bench_kernels.json"
    steps.append(
        Step(
            "bench-kernels",
            [py, str(tools / "bench_kernels.py"), "--output", str(bench)]
            + (["--allow-cpu", "--repeats", "1", "--warmup", "1"] if cpu else []),
            300,
            {"TRITON_INTERPRET": "1"} if cpu else {"TRITON_INTERPRET": ""},
            bench,
        )
    )  # fmt: skip
    run_dir = work / "train_run"
    train = [py, "-m", "ilm_megatron.train.cli", "--quiet", f"run_dir={run_dir}",
             "train.tensorboard=false"]  # fmt: skip
    if cpu:
        train += ["train.max_steps=2", "train.device=cpu", "data.eval_seq_len=0"]
    else:
        train += ["train.max_steps=30", "train.device=cuda"]
    steps.append(Step("train", train, 300 if cpu else 600, {}, run_dir / "final.json"))
    for arch in ("mamba2", "llama"):
        out = work / f"bench_train_{arch}.json"
        if cpu:
            cfg = ROOT / "configs" / "models" / f"implicit_{arch}_tiny.yaml"
            extra = ["--steps", "1", "--warmup", "0", "train.batch_size=2", "data.seq_len=16"]
        else:
            cfg = ROOT / "configs" / "models" / f"{arch}_130m_implicit.yaml"
            extra = ["--steps", "5", "--warmup", "2", "train.batch_size=8", "data.seq_len=2048"]
        steps.append(
            Step(
                f"bench-train-{arch}",
                [py, str(tools / "bench_train.py"), "--json", "--config", str(cfg), *extra],
                300 if cpu else 600,
                {},
                out,
            )
        )
    return steps


def run_step(step: Step) -> None:
    env = {**os.environ}
    for k, v in step.env.items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            step.cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout
        )
    except subprocess.TimeoutExpired as exc:
        step.seconds = time.monotonic() - t0
        step.status, step.detail = "FAIL", f"timed out after {step.timeout} s"
        tail = (exc.stdout or b"")[-1500:] if isinstance(exc.stdout, bytes) else exc.stdout
        step.result = {"log_tail": str(tail or "")[-1500:]}
        return
    step.seconds = time.monotonic() - t0
    log = (proc.stdout + proc.stderr)[-4000:]
    if step.name.startswith("bench-train") and proc.returncode == 0:
        step.json_out.write_text(proc.stdout)
    result: Any = None
    if step.json_out is not None and step.json_out.exists():
        try:
            result = json.loads(step.json_out.read_text())
        except json.JSONDecodeError as exc:
            result = {"invalid_json": str(exc)}
    ok = proc.returncode == 0 and (step.json_out is None or isinstance(result, dict))
    ok = ok and not (isinstance(result, dict) and "invalid_json" in result)
    step.status = "PASS" if ok else "FAIL"
    last = [ln for ln in log.strip().splitlines() if ln.strip()]
    step.detail = f"rc {proc.returncode}" + (f": {last[-1][:160]}" if last else "")
    step.result = result if ok else {"log_tail": log[-2500:], "result": result}


def summary_md(info: dict[str, Any], steps: list[Step]) -> str:
    lines = [
        f"# GPU check: {info.get('gpu', 'CPU plumbing run')}",
        "",
        f"Measured {info['date']} on `{info['host']}`"
        + (f", {info['nvidia_smi']}" if "nvidia_smi" in info else "")
        + (f", CUDA {info['cuda']}" if info.get("cuda") else "")
        + ". Written by `tools/gpu_check.sh`"
        + (" --cpu" if info["mode"] == "cpu" else "")
        + "; the full record is the JSON beside this file.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---:|---|",
    ]
    for s in steps:
        detail = s.detail.replace("|", "/")
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {detail} |")
    lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)]
    bench = next(
        (s.result for s in steps if s.name == "bench-kernels" and s.status == "PASS"), None
    )
    if bench:
        lines += ["", "SSD scan (ms, median): " + json.dumps(bench.get("results", {}))]
        lines += ["", "Speedups: " + json.dumps(bench.get("speedups", {}))]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tools"))
    info = environment(args.cpu)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            f"{PROG}: CUDA is not available (use --cpu for the CPU plumbing run)", file=sys.stderr
        )
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        steps = plan(args.cpu, Path(tmp))
        unknown = only - {s.name for s in steps}
        if unknown:
            print(f"{PROG}: --only: unknown steps {sorted(unknown)}", file=sys.stderr)
            return 2
        for step in steps:
            if only and step.name not in only:
                continue
            print(f"== {step.name} (timeout {step.timeout} s)", flush=True)
            run_step(step)
            print(f"{step.status} {step.name} ({step.seconds:.0f} s) {step.detail}", flush=True)
    record = {
        "tool": "tools/gpu_check.sh" + (" --cpu" if args.cpu else ""),
        "environment": info,
        "steps": [
            {"name": s.name, "status": s.status, "seconds": round(s.seconds, 1),
             "timeout": s.timeout, "detail": s.detail, "result": s.result}
            for s in steps
        ],
        "passed": all(s.status != "FAIL" for s in steps),
    }  # fmt: skip
    slug = device_slug(info)
    out = Path(args.out_dir)
    write_atomic(out / f"gpu_{slug}.json", json.dumps(record, indent=2) + "\n")
    write_atomic(out / f"gpu_{slug}.md", summary_md(info, steps))
    print("\n| step | status | seconds |\n|---|---|---:|")
    for s in steps:
        print(f"| {s.name} | {s.status} | {s.seconds:.0f} |")
    verdict = "PASS" if record["passed"] else "FAIL"
    print(f"{verdict}: gpu_check; record {out / f'gpu_{slug}.json'}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
