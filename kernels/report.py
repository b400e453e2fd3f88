"""What each Triton kernel costs on a GPU, measured without one: compile for sm_90a, read ptxas.

Triton compiles for a target it does not run on (``GPUTarget("cuda", 90, 32)``), and the
``ptxas`` it bundles reports registers, spill stores and shared memory with ``-v``. This module
drives the real launchers (``ssd_triton_fwd``/``_bwd``, the conv1d, norm and step launchers) on
``meta`` tensors at a given problem size, records every kernel launch instead of running it,
compiles each with the exact arguments, constexprs and launch options the launcher chose, and
reports:

``{"name", "dtype", "shape", "registers", "spill_bytes", "shared_bytes", "mma", "num_warps",
"num_stages"}`` where ``mma`` names the tensor-core instructions in the PTX: ``wgmma.bf16``,
``wgmma.tf32``, ``mma.sync.f16`` ... (``+``-joined when several), or ``fma`` when there are none
(CUDA-core arithmetic only).

It must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` yields
interpreted functions, which cannot be compiled (``tools/kernel_report.py`` and the tests run it
in a subprocess with a clean environment).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import triton_interpreter

__all__ = [
    "SHARED_LIMIT_SM90",
    "Launch",
    "capture_launches",
    "compile_launch",
    "kernel_report",
    "mma_kinds",
    "problem_launches",
]

#: Largest dynamic shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SHARED_LIMIT_SM90 = 232448

#: The 1.3B implicit Mamba2's SSD problem (d_model 2048, expand 2, headdim 64, d_state 128,
#: one group, chunk 256) at a 2048-token sequence and 8 sequences per GPU.
SHAPES_1P3B: dict[str, int] = {
    "batch": 8,
    "seqlen": 2048,
    "nheads": 64,
    "headdim": 64,
    "ngroups": 1,
    "dstate": 128,
    "chunk_size": 256,
    "conv_width": 4,
}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments and launch options."""

    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tag: str = ""

    @property
    def name(self) -> str:
        return self.fn.__name__


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the context, ``kernel[grid](...)`` records a :class:`Launch` and runs nothing.

    Yields the list the launches are appended to, in launch order.
    """
    if triton_interpreter():
        raise RuntimeError(
            "capture_launches compiles kernels for a GPU target: unset TRITON_INTERPRET "
            "(the interpreter replaces @triton.jit functions, which then cannot be compiled)"
        )
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: Any, *args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.run = original  # type: ignore[method-assign]


_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _signature(launch: Launch, backend: Any) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as Triton's launcher would specialise them."""
    from triton._C.libtriton import native_specialize_impl

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_KEYS}
    values = list(launch.args)
    names = fn.arg_names
    for name in names[len(values) :]:
        if name in kwargs:
            values.append(kwargs.pop(name))
        else:
            default = fn.params[names.index(name)].default
            values.append(default)
    if kwargs:
        raise TypeError(f"{fn.__name__}: unexpected launch arguments {sorted(kwargs)}")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, value, param) in enumerate(zip(names, values, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        kind, attr = native_specialize_impl(
            type(backend),
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(attr, str) and attr:
            parsed = backend.parse_attr(attr)
            if parsed:
                attrs[(i,)] = parsed
    return signature, constexprs, attrs, options


_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)[\w.]*?\.(bf16|f16|tf32|e4m3|e5m2|s8|f64)\b")


def mma_kinds(ptx: str) -> str:
    """The tensor-core instructions in ``ptx``: e.g. ``"wgmma.bf16"``, or ``"fma"`` if none."""
    kinds = set()
    for op, operand in _MMA.findall(ptx):
        kinds.add(f"{'wgmma' if op.startswith('wgmma') else 'mma.sync'}.{operand}")
    return "+".join(sorted(kinds)) if kinds else "fma"


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from the bundled ``ptxas -v`` (the flags Triton compiles with)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src]
        res = subprocess.run(
            [*cmd, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=False
        )
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {log.strip()[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": int(spills.group(1)) if spills else 0,
        "static_shared_bytes": int(smem.group(1)) if smem else 0,
    }


def compile_launch(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile one recorded launch for ``sm_<arch>a`` and read its resource usage.

    Returns ``{"name", "registers", "spill_bytes", "shared_bytes", "mma", "num_warps",
    "num_stages"}``; ``shared_bytes`` counts dynamic plus static shared memory per block.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _signature(launch, backend)
    src = ASTSource(launch.fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=target, options=options)
    usage = _ptxas_usage(kernel.asm["ptx"], arch)
    return {
        "name": launch.name + (f"[{launch.tag}]" if launch.tag else ""),
        "registers": usage["registers"],
        "spill_bytes": usage["spill_bytes"],
        "shared_bytes": int(kernel.metadata.shared) + usage["static_shared_bytes"],
        "mma": mma_kinds(kernel.asm["ptx"]),
        "num_warps": int(kernel.metadata.num_warps),
        "num_stages": int(kernel.metadata.num_stages),
    }


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def problem_launches(shapes: dict[str, int], dtype: torch.dtype) -> dict[str, list[Launch]]:
    """Drive every launcher on meta tensors at ``shapes``; the launches by group.

    Groups: ``ssd_fwd``, ``ssd_bwd``, ``conv1d_fwd``, ``conv1d_bwd``, ``norm_fwd``,
    ``norm_bwd``, ``conv1d_step``, ``ssd_step``. ``shapes`` has the keys of
    :data:`SHAPES_1P3B`. dt, A, D and the states are float32 as in the model; x, B, C and the
    activations are ``dtype``.
    """
    from .conv1d_triton import conv1d_backward, conv1d_forward
    from .norm_triton import rms_norm_backward, rms_norm_forward
    from .ssd_triton import ssd_triton_bwd, ssd_triton_fwd
    from .step_triton import conv1d_step_triton, ssd_step_triton

    s = shapes
    b, seq, h, p = s["batch"], s["seqlen"], s["nheads"], s["headdim"]
    g, n, w = s["ngroups"], s["dstate"], s["conv_width"]
    f32 = torch.float32
    x = _meta(b, seq, h, p, dtype=dtype)
    dt = _meta(b, seq, h, dtype=f32)
    A = _meta(h, dtype=f32)
    B = _meta(b, seq, g, n, dtype=dtype)
    C = _meta(b, seq, g, n, dtype=dtype)
    D = _meta(h, dtype=f32)
    channels = h * p + 2 * g * n
    xc = _meta(b, seq, channels, dtype=dtype)
    wc = _meta(channels, w, dtype=f32)
    bc = _meta(channels, dtype=f32)
    d_inner = h * p
    xn = _meta(b, seq, d_inner, dtype=dtype)
    wn = _meta(d_inner, dtype=f32)
    rstd = _meta(b * seq, g, dtype=f32)

    calls: dict[str, Callable[[], Any]] = {
        "ssd_fwd": lambda: ssd_triton_fwd(x, dt, A, B, C, s["chunk_size"], D),
        "ssd_bwd": lambda: ssd_triton_bwd(x, None, x, dt, A, B, C, s["chunk_size"], D),
        "conv1d_fwd": lambda: conv1d_forward(xc, wc, bc, None, "silu"),
        "conv1d_bwd": lambda: conv1d_backward(xc, xc, wc, bc, None, "silu"),
        "norm_fwd": lambda: rms_norm_forward(xn, xn, wn, 1e-5, d_inner // g),
        "norm_bwd": lambda: rms_norm_backward(xn, xn, xn, wn, rstd, d_inner // g),
        "conv1d_step": lambda: conv1d_step_triton(
            _meta(b, channels, w - 1, dtype=dtype), _meta(b, channels, dtype=dtype), wc, bc, "silu"
        ),
        "ssd_step": lambda: ssd_step_triton(
            _meta(b, h, p, n, dtype=f32),
            _meta(b, h, p, dtype=dtype),
            _meta(b, h, dtype=f32),
            A,
            _meta(b, g, n, dtype=dtype),
            _meta(b, g, n, dtype=dtype),
            D,
        ),
    }
    out: dict[str, list[Launch]] = {}
    for group, call in calls.items():
        with capture_launches() as launches:
            call()
        out[group] = launches
    return out


def _tag(launch: Launch) -> str:
    mode = launch.kwargs.get("MODE")
    return "" if mode is None else f"MODE={mode}"


def kernel_report(
    shapes: dict[str, int],
    dtype: torch.dtype,
    arch: int = 90,
    groups: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Compile every kernel the launchers run at ``shapes`` in ``dtype``; one row per kernel.

    A kernel launched identically by several launchers (the SSD backward recomputes the forward
    states) is reported once, under the first group that launched it.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    shape_str = ",".join(f"{k}={v}" for k, v in shapes.items())
    for group, launches in problem_launches(shapes, dtype).items():
        if groups is not None and group not in groups:
            continue
        for launch in launches:
            launch.tag = _tag(launch)
            key = (launch.name, launch.tag, repr(sorted(launch.kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"group": group, **compile_launch(launch, arch)}
            row["dtype"] = str(dtype).removeprefix("torch.")
            row["shape"] = shape_str
            rows.append(row)
    return rows
