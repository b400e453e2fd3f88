"""Every Triton kernel compiled for sm_90a on this machine (no GPU): ``tools/kernel_report.py``.

Triton compiles for a GPU target it does not run on, and its bundled ``ptxas -v`` reports
registers, spills and shared memory. These tests compile the kernels exactly as the launchers
launch them at the 1.3B implicit Mamba2's shapes and check what decides their speed on an
H100/H200: shared memory within the limit, no register spills, and bf16 (or TF32) tensor cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ilm_kernels.report import SHARED_LIMIT_SM90, mma_kinds

pytestmark = pytest.mark.slow

DOT_KERNELS = (
    "_chunk_state",
    "_chunk_scan_fwd",
    "_chunk_scan_bwd_dx",
    "_chunk_scan_bwd_dc",
    "_chunk_scan_bwd_db",
)


def _compiled_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("ILM_KERNELS_FP32_PRECISION", None)
    env.update(extra)
    return env


def _report(root, *args: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(root / "tools" / "kernel_report.py"), "--json", *args],
        capture_output=True,
        text=True,
        env=_compiled_env(**env),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def report(request) -> dict:
    from conftest import ROOT

    return _report(ROOT)


def _ssd_dot_rows(report: dict, dtype: str, dstate: int) -> list[dict]:
    rows = [
        r
        for r in report["kernels"]
        if r["dtype"] == dtype
        and f"dstate={dstate}," in r["shape"]
        and r["name"].split("[")[0] in DOT_KERNELS
    ]
    assert {r["name"].split("[")[0] for r in rows} == set(DOT_KERNELS), rows
    return rows


def test_every_kernel_fits_shared_memory_and_does_not_spill(report: dict) -> None:
    names = {r["name"].split("[")[0] for r in report["kernels"]}
    for expected in ("_conv_fwd_kernel", "_conv_bwd_kernel", "_rms_bwd_kernel", "_ssd_step_kernel"):
        assert expected in names
    assert report["shared_limit_bytes"] == SHARED_LIMIT_SM90
    for r in report["kernels"]:
        where = f"{r['name']} {r['dtype']} {r['shape']}"
        assert 0 < r["shared_bytes"] + 1 <= SHARED_LIMIT_SM90, where
        assert r["spill_bytes"] == 0, where
        assert 0 < r["registers"] <= 255, where
    assert report["over_shared_limit"] == [] and report["spilling"] == []


def test_ssd_kernels_use_bf16_tensor_cores_at_1p3b_shapes(report: dict) -> None:
    """bf16 inputs: bf16 wgmma operands (not TF32 on upcast tiles), no spills."""
    for r in _ssd_dot_rows(report, "bfloat16", 128):
        assert r["mma"] == "wgmma.bf16", r
        assert r["spill_bytes"] == 0, r


def test_fp32_uses_tf32_by_default_and_ieee_only_behind_the_switch(report: dict) -> None:
    from conftest import ROOT

    for r in _ssd_dot_rows(report, "float32", 128):
        # the default report: TF32 tensor cores (mma.sync for the 32-row fp32 dB/dC tiles)
        assert r["mma"] in ("wgmma.tf32", "mma.sync.tf32"), r
    exact = _report(
        ROOT,
        "--dtypes",
        "float32",
        "--groups",
        "ssd_fwd",
        "--dstate-256",
        "",
        ILM_KERNELS_FP32_PRECISION="ieee",
    )
    rows = {r["name"]: r["mma"] for r in exact["kernels"]}
    assert rows["_chunk_scan_fwd"] == "fma" and rows["_chunk_state[MODE=0]"] == "fma", rows


def test_d_state_256_fits(report: dict) -> None:
    """fp32 at d_state 256 needed 246,784 B of shared memory at 64-row tiles (limit 232,448)."""
    for dtype in ("float32", "bfloat16"):
        for r in _ssd_dot_rows(report, dtype, 256):
            assert r["shared_bytes"] <= SHARED_LIMIT_SM90 and r["spill_bytes"] == 0, r


def test_launchers_pass_views_without_copies() -> None:
    """The SSD launchers hand the kernels the caller's strided views (no .contiguous())."""
    code = """
import torch
from ilm_kernels.report import capture_launches
from ilm_kernels.ssd_triton import ssd_triton_bwd, ssd_triton_fwd
b, l, h, p, g, n = 2, 64, 4, 16, 1, 16
packed = torch.empty(b, l, h * p + 2 * g * n, dtype=torch.bfloat16, device="meta")
x = packed[..., : h * p].view(b, l, h, p)
B = packed[..., h * p : h * p + g * n].view(b, l, g, n)
C = packed[..., h * p + g * n :].view(b, l, g, n)
dt = torch.empty(b, l, h + 2, device="meta")[..., 1:-1]
A = torch.empty(h, device="meta")
for call in (lambda: ssd_triton_fwd(x, dt, A, B, C, 32),
             lambda: ssd_triton_bwd(x, None, x, dt, A, B, C, 32)):
    with capture_launches() as launches:
        call()
    checked = 0
    for la in launches:
        args = dict(zip(la.fn.arg_names, la.args))
        for name, want in (("x_ptr", x), ("dy_ptr", x), ("B_ptr", B), ("C_ptr", C), ("dt_ptr", dt)):
            if name in args:
                assert args[name] is want, (la.name, name, args[name].stride())
                checked += 1
        if la.name == "_chunk_state":
            assert args["y_ptr"] is (B if la.kwargs["MODE"] == 0 else C)
assert checked >= 12, checked
from ilm_kernels.norm_triton import rms_norm_backward, rms_norm_forward
zx = torch.empty(b, l, 2 * h * p, dtype=torch.bfloat16, device="meta")
xn, gate = zx[..., : h * p], zx[..., h * p :]
w = torch.empty(h * p, device="meta")
rstd = torch.empty(b * l, 1, device="meta")
for call in (lambda: rms_norm_forward(xn, gate, w, 1e-5),
             lambda: rms_norm_backward(xn, xn, gate, w, rstd)):
    with capture_launches() as launches:
        call()
    args = dict(zip(launches[0].fn.arg_names, launches[0].args))
    for name in ("x_ptr", "g_ptr") + (("dy_ptr",) if "dy_ptr" in args else ()):
        assert args[name]._base is zx, (name, args[name].stride())
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_compiled_env()
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize(
    "ptx,want",
    [
        ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {", "wgmma.bf16"),
        ("wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {", "wgmma.tf32"),
        ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {", "mma.sync.f16"),
        ("fma.rn.f32 %f1, %f2, %f3, %f4;", "fma"),
    ],
)
def test_mma_kinds(ptx: str, want: str) -> None:
    assert mma_kinds(ptx) == want


def test_autotune_is_opt_in_keyed_on_shape_and_its_space_compiles() -> None:
    """ILM_KERNELS_AUTOTUNE=1 wraps the chunk-scan kernels in triton.autotune keyed on the
    shape; by default the pinned configuration runs. Every config of the tuning space compiles
    for sm_90a within the shared-memory limit at the 1.3B bf16 shapes (forward kernel)."""
    code = """
import os, torch
from ilm_kernels import ssd_triton as S
from ilm_kernels.report import SHAPES_1P3B, SHARED_LIMIT_SM90, compile_launch, problem_launches
fn, opts = S._launch(S._chunk_scan_fwd, {"num_warps": 8, "num_stages": 2})
assert fn is S._chunk_scan_fwd and opts == {"num_warps": 8, "num_stages": 2}
os.environ[S.AUTOTUNE_ENV] = "1"
tuned, opts = S._launch(S._chunk_scan_fwd, {"num_warps": 8})
assert opts == {} and list(tuned.keys) == S.TUNE_KEY and len(tuned.configs) == len(S.TUNE_SPACE)
assert S._launch(S._chunk_scan_fwd, {})[0] is tuned  # wrapped once
del os.environ[S.AUTOTUNE_ENV]
launch = [la for la in problem_launches(SHAPES_1P3B, torch.bfloat16)["ssd_fwd"]
          if la.name == "_chunk_scan_fwd"][0]
for warps, stages in S.TUNE_SPACE:
    launch.kwargs.update(num_warps=warps, num_stages=stages)
    row = compile_launch(launch)
    assert row["shared_bytes"] <= SHARED_LIMIT_SM90 and row["mma"] == "wgmma.bf16", row
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_compiled_env()
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
