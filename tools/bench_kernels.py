"""Benchmark of the SSD scan kernels: our Triton kernels vs the PyTorch reference vs mamba-ssm.

Times the forward (no autograd) and forward+backward of ``ssd_scan`` for every available backend
at B=8, L=2048, H=32, P=64, N=128 (G=1, chunk 256, D of shape (H,), no initial state) in
bfloat16 by default. Timing uses CUDA events: the median of ``--repeats`` runs after
``--warmup`` runs, with the L2 cache flushed before every run by writing a 256 MiB buffer. The
Triton result is also compared with the reference (max relative error of y).

Runs on CUDA. On a machine without CUDA it exits with an error unless ``--allow-cpu`` is given,
which runs a tiny float32 smoke test in the Triton interpreter (times meaningless). Usage::

    python tools/bench_kernels.py --json
    python tools/bench_kernels.py --json --output docs/benchmarks/ssd_kernels.json
    python tools/bench_kernels.py --allow-cpu --json          # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from _common import dump_json, fail, machine_info, now_iso, positive_int, write_atomic

PROG = "bench_kernels.py"
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--allow-cpu", action="store_true", help="tiny smoke run without CUDA")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seqlen", type=positive_int, default=2048)
    p.add_argument("--nheads", type=positive_int, default=32)
    p.add_argument("--headdim", type=positive_int, default=64)
    p.add_argument("--dstate", type=positive_int, default=128)
    p.add_argument("--ngroups", type=positive_int, default=1)
    p.add_argument("--chunk-size", type=positive_int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeats", type=positive_int, default=30)
    p.add_argument("--warmup", type=positive_int, default=5)
    p.add_argument(
        "--backends",
        default="triton,reference,mamba_ssm",
        help="comma-separated subset of triton,reference,mamba_ssm",
    )
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace, device: str, dtype: Any) -> dict[str, Any]:
    """Random inputs: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(0)
    b, l, h, p = args.batch, args.seqlen, args.nheads, args.headdim
    g, n = args.ngroups, args.dstate

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {
        "x": randn(b, l, h, p),
        "dt": F.softplus(torch.randn(b, l, h, generator=gen) - 2.0).to(device, dtype),
        "A": -torch.exp(torch.randn(h, generator=gen) * 0.5).to(device),  # float32, like Mamba2
        "B": randn(b, l, g, n, scale=n**-0.5),
        "C": randn(b, l, g, n, scale=n**-0.5),
        "D": torch.randn(h, generator=gen).to(device),
    }


class Timer:
    """Median time in ms of a callable: CUDA events with an L2 flush, or perf_counter on CPU."""

    def __init__(self, cuda: bool, repeats: int, warmup: int) -> None:
        import torch

        self.cuda, self.repeats, self.warmup = cuda, repeats, warmup
        self.flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda") if cuda else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                self.flush.zero_()  # evict the inputs from L2
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def strided_views(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same values as the model passes them: x, B, C views of one packed (b, l, h*p + 2*g*n)
    tensor (the conv output) and dt a column slice of a wider tensor."""
    import torch

    x, B, C, dt = inputs["x"], inputs["B"], inputs["C"], inputs["dt"]
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    packed = torch.cat([x.reshape(b, l, h * p), B.reshape(b, l, g * n), C.reshape(b, l, g * n)], -1)
    xv, Bv, Cv = torch.split(packed, [h * p, g * n, g * n], dim=-1)
    wide = torch.cat([dt, dt[..., :1]], dim=-1)
    return {
        **inputs,
        "x": xv.view(b, l, h, p),
        "B": Bv.view(b, l, g, n),
        "C": Cv.view(b, l, g, n),
        "dt": wide[..., :h],
    }


def bench_backend(
    backend: str, inputs: dict[str, Any], chunk_size: int, timer: Timer
) -> dict[str, float]:
    """fwd_ms (no autograd), grad_fwd_ms (forward that saves for backward), fwd_bwd_ms, and on
    CUDA peak_fwd_bwd_mib (allocated above the inputs) of ``ssd_scan`` on one backend."""
    import torch

    from ilm_kernels.ssd_scan import ssd_scan

    names = ("x", "dt", "A", "B", "C")
    args = [inputs[k] for k in names]
    D = inputs["D"]

    def fwd() -> None:
        with torch.no_grad():
            ssd_scan(*args, chunk_size, D=D, backend=backend)

    grad_args = [t.detach().clone().requires_grad_() for t in args]
    grad_D = D.detach().clone().requires_grad_()
    dy = torch.randn_like(inputs["x"])

    def grad_fwd() -> None:
        ssd_scan(*grad_args, chunk_size, D=grad_D, backend=backend)

    def fwd_bwd() -> None:
        y = ssd_scan(*grad_args, chunk_size, D=grad_D, backend=backend)
        y.backward(dy)

    out = {"fwd_ms": timer(fwd), "grad_fwd_ms": timer(grad_fwd), "fwd_bwd_ms": timer(fwd_bwd)}
    if torch.cuda.is_available() and inputs["x"].is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        out["peak_fwd_bwd_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def grad_errors(
    inputs: dict[str, Any], chunk_size: int, backend: str, ref: str
) -> dict[str, float]:
    """max |a - r| / max |r| of y and of every input gradient, ``backend`` against ``ref`` (the
    reference runs in float32 on the same rounded inputs)."""
    import torch

    from ilm_kernels.ssd_scan import ssd_scan

    names = ("x", "dt", "A", "B", "C", "D")
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(inputs["x"].shape, generator=gen).to(inputs["x"].device)
    results = []
    for which in (backend, ref):
        cast = torch.float32 if which == "reference" else None
        t = {k: inputs[k].detach().to(cast or inputs[k].dtype).requires_grad_() for k in names}
        y = ssd_scan(*(t[k] for k in names[:5]), chunk_size, D=t["D"], backend=which)
        y.float().backward(dy.to(y.dtype).float())
        results.append({"y": y.detach(), **{f"d{k}": t[k].grad for k in names}})
    errs = {}
    for key, r in results[1].items():
        a = results[0][key].float()
        errs[key] = ((a - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
    return errs


def max_rel_err(inputs: dict[str, Any], chunk_size: int) -> float:
    """max |y_triton - y_reference| / max |y_reference| on the benchmark inputs."""
    import torch

    from ilm_kernels.ssd_scan import ssd_scan

    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    with torch.no_grad():
        ref = ssd_scan(*args, chunk_size, D=inputs["D"], backend="reference").float()
        tri = ssd_scan(*args, chunk_size, D=inputs["D"], backend="triton").float()
    return ((tri - ref).abs().max() / ref.abs().max()).item()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"triton", "reference", "mamba_ssm"}
    if unknown:
        fail(PROG, f"unknown backends {sorted(unknown)}")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.allow_cpu:
            fail(PROG, "CUDA is not available; pass --allow-cpu for a tiny CPU smoke run")
        # The Triton kernels run on CPU tensors only in the interpreter, which must be enabled
        # before triton is imported (bfloat16 dots are broken there: use float32).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batch, args.seqlen, args.nheads, args.headdim = 1, 64, 2, 16
        args.dstate, args.ngroups, args.chunk_size, args.dtype = 16, 1, 32, "float32"
        args.repeats, args.warmup = min(args.repeats, 2), 1
    dtype = getattr(torch, DTYPES[args.dtype])
    device = "cuda" if cuda else "cpu"
    inputs = make_inputs(args, device, dtype)
    timer = Timer(cuda, args.repeats, args.warmup)

    from ilm_kernels.backend import has_module

    results: dict[str, Any] = {}
    failed: list[str] = []
    for backend in backends:
        if backend == "mamba_ssm" and not has_module("mamba_ssm"):
            results[backend] = {"skipped": "mamba-ssm is not installed"}
            continue
        try:
            results[backend] = bench_backend(backend, inputs, args.chunk_size, timer)
        except Exception as exc:  # noqa: BLE001 - report, go on, and fail at the end
            results[backend] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(backend)
    if "triton" in backends and "triton" not in failed:
        try:
            results["triton_strided"] = bench_backend(
                "triton", strided_views(inputs), args.chunk_size, timer
            )
        except Exception as exc:  # noqa: BLE001
            results["triton_strided"] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append("triton_strided")
    ratios: dict[str, float] = {}
    tri = results.get("triton", {})
    for other in ("reference", "mamba_ssm"):
        o = results.get(other, {})
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in tri and key in o:
                ratios[f"{other}_over_triton_{key[:-3]}"] = o[key] / tri[key]
    if "fwd_ms" in tri:
        ratios["triton_grad_fwd_over_nograd_fwd"] = tri["grad_fwd_ms"] / tri["fwd_ms"]
    err = None
    grads: dict[str, Any] = {}
    if "triton" in backends and "reference" in backends and "triton" not in failed:
        err = max_rel_err(inputs, args.chunk_size)
        grads["triton_vs_reference"] = grad_errors(inputs, args.chunk_size, "triton", "reference")
        if "fwd_ms" in results.get("mamba_ssm", {}):
            grads["triton_vs_mamba_ssm"] = grad_errors(
                inputs, args.chunk_size, "triton", "mamba_ssm"
            )
            grads["mamba_ssm_vs_reference"] = grad_errors(
                inputs, args.chunk_size, "mamba_ssm", "reference"
            )
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    worst = max(grads.get("triton_vs_reference", {}).values(), default=0.0)
    if err is not None and max(err, worst) > tol:
        failed.append(f"triton vs reference error {max(err, worst):.3g} > {tol}")

    info = machine_info()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    import importlib.metadata

    for package in ("triton", "mamba-ssm", "causal-conv1d"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    report = {
        "tool": PROG,
        "date": now_iso(),
        "device": device,
        "smoke_test": not cuda,
        "shape": {
            "batch": args.batch,
            "seqlen": args.seqlen,
            "nheads": args.nheads,
            "headdim": args.headdim,
            "dstate": args.dstate,
            "ngroups": args.ngroups,
            "chunk_size": args.chunk_size,
            "dtype": args.dtype,
            "D": "(h,)",
        },  # fmt: skip
        "timing": {
            "method": "cuda events, L2 flushed (256 MiB write) before each run"
            if cuda
            else "time.perf_counter (interpreter smoke run, not a benchmark)",
            "statistic": "median",
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "results": results,
        "speedups": ratios,
        "triton_vs_reference_max_rel_err_y": err,
        "grad_rel_err": grads,
        "failed": failed,
        "machine": info,
    }
    text = dump_json(report)
    if args.output:
        write_atomic(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        for backend, res in results.items():
            print(f"{backend:10s} {res}")
        print(f"speedups {ratios}; triton vs reference max rel err {err}")
    if failed:
        print(f"{PROG}: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
