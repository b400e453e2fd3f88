"""Triton SSD kernels (``ilm_kernels.ssd_triton``) and the ``ssd_scan`` dispatcher.

On a GPU-less machine ``conftest.py`` sets ``TRITON_INTERPRET=1`` so the kernels run on CPU
tensors in Triton's interpreter (slow: shapes stay tiny). On a CUDA machine the same tests run
the compiled kernels on CUDA tensors. Every kernel output is NaN-poisoned before each launch
(:func:`ilm_kernels.ssd_triton.poison_outputs`), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ilm_kernels.backend import BackendUnavailableError, has_module, triton_interpreter
from ilm_kernels.ssd import ssd_scan_reference
from ilm_kernels.ssd_scan import ssd_scan

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.skipif(
    not HAS_CUDA and not triton_interpreter(),
    reason="needs a GPU, or the Triton interpreter (TRITON_INTERPRET=1)",
)

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_states")


@pytest.fixture(autouse=True)
def _poison(one_thread):
    from ilm_kernels.ssd_triton import poison_outputs

    with poison_outputs():
        yield


def make_inputs(
    b: int,
    seqlen: int,
    h: int,
    p: int,
    g: int,
    n: int,
    d_kind: str | None,
    with_init: bool,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random float64 CPU inputs of the SSD scan (D of shape (h,), (h, p) or None)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    D = {None: None, "h": randn(h), "hp": randn(h, p)}[d_kind]
    return {
        "x": randn(b, seqlen, h, p),
        "dt": F.softplus(randn(b, seqlen, h) - 1.0),
        "A": -torch.exp(randn(h) * 0.5),
        "B": randn(b, seqlen, g, n),
        "C": randn(b, seqlen, g, n),
        "D": D,
        "initial_states": randn(b, h, p, n) if with_init else None,
    }


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64, on CPU)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def run_both(
    inputs: dict[str, torch.Tensor | None],
    chunk_size: int,
    dtype: torch.dtype,
    grad_final: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward + backward of the float64 reference and of Triton (inputs cast to ``dtype``).

    Both see the same input values (the reference gets the ``dtype``-rounded values in float64)
    and the same output gradients. Returns {name: value} for y, final and every input grad.
    """
    low = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    ref_in = {k: None if v is None else v.double().requires_grad_() for k, v in low.items()}
    tri_in = {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in low.items()}
    gen = torch.Generator().manual_seed(1)
    x = inputs["x"]
    b, _, h, p = x.shape
    n = inputs["B"].shape[-1]
    gy = torch.randn(x.shape, generator=gen, dtype=F64)
    gf = torch.randn(b, h, p, n, generator=gen, dtype=F64)

    results = []
    for args, backend in ((ref_in, "reference"), (tri_in, "triton")):
        y, final = ssd_scan(
            args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size,
            D=args["D"], initial_states=args["initial_states"], return_final_states=True,
            backend=backend,
        )  # fmt: skip
        assert y.dtype == args["x"].dtype
        loss = (y * gy.to(y)).sum()
        if grad_final:
            loss = loss + (final * gf.to(final)).sum()
        loss.backward()
        out = {"y": y, "final": final}
        out.update({k: v.grad for k, v in args.items() if v is not None})
        results.append(out)
    return results[0], results[1]


# (b, l, h, p, g, n, chunk_size, D, initial_states, grad of final state)
CASES = [
    pytest.param(2, 37, 4, 8, 2, 16, 16, "hp", True, True, id="odd-len-groups-Dhp-init"),
    pytest.param(1, 5, 1, 4, 1, 8, 16, "h", False, False, id="shorter-than-chunk-one-head"),
    pytest.param(2, 32, 4, 8, 1, 16, 16, None, True, False, id="exact-chunks-noD-g1"),
    pytest.param(1, 21, 2, 6, 2, 5, 8, "h", True, True, id="odd-p-n-many-chunks"),
    pytest.param(2, 19, 4, 4, 4, 8, 16, None, False, True, id="g-eq-h-no-init"),
]


@pytest.mark.parametrize("b,seqlen,h,p,g,n,chunk,d_kind,init,grad_final", CASES)
def test_triton_matches_reference_fp32(
    b: int,
    seqlen: int,
    h: int,
    p: int,
    g: int,
    n: int,
    chunk: int,
    d_kind: str | None,
    init: bool,
    grad_final: bool,
) -> None:
    inputs = make_inputs(b, seqlen, h, p, g, n, d_kind, init)
    ref, tri = run_both(inputs, chunk, torch.float32, grad_final)
    assert tri["final"].dtype == torch.float32
    assert set(ref) == set(tri)
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 1e-4, errs


def test_triton_tiled_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several row tiles per chunk (the GPU tiling), forced in the interpreter too."""
    from ilm_kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "_block_m", lambda chunk_size: 16)
    inputs = make_inputs(1, 45, 2, 8, 1, 16, "hp", True)
    ref, tri = run_both(inputs, 40, torch.float32, True)
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 1e-4, errs


def test_triton_fp16() -> None:
    inputs = make_inputs(1, 23, 2, 8, 1, 16, "h", True)
    ref, tri = run_both(inputs, 16, torch.float16, True)
    assert tri["y"].dtype == torch.float16 and tri["x"].dtype == torch.float16
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 1e-2, errs


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="tl.dot on bfloat16 operands returns garbage in the Triton CPU interpreter",
)
def test_triton_bf16() -> None:
    inputs = make_inputs(2, 100, 4, 16, 2, 16, "h", True)
    ref, tri = run_both(inputs, 32, torch.bfloat16, True)
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 3e-2, errs


@pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU: these tile sizes take minutes in the Triton interpreter"
)
def test_triton_larger_shape_on_gpu() -> None:
    """Realistic tile sizes (chunk 256, p 64, n 128) where the kernels are compiled."""
    inputs = make_inputs(2, 700, 4, 64, 2, 128, "hp", True)
    ref, tri = run_both(inputs, 256, torch.float32, True)
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 1e-4, errs


def test_triton_grad_through_final_state_only() -> None:
    """Only the final state is used: the backward gets no gradient for y (None)."""
    inputs = make_inputs(2, 27, 2, 4, 1, 8, "h", True)
    grads = []
    for backend, dtype, device in (("reference", F64, "cpu"), ("triton", torch.float32, DEVICE)):
        args = {
            k: None if v is None else v.detach().to(device, dtype).requires_grad_()
            for k, v in inputs.items()
        }
        _, final = ssd_scan(
            *(args[k] for k in ("x", "dt", "A", "B", "C")), 8, D=args["D"],
            initial_states=args["initial_states"], return_final_states=True, backend=backend,
        )  # fmt: skip
        (final * torch.arange(final.numel(), device=device).view_as(final).sin()).sum().backward()
        grads.append({k: v.grad for k, v in args.items() if v is not None})
    for k, ref in grads[0].items():
        if ref is None:  # D does not reach the final state
            assert grads[1][k] is None or not grads[1][k].any(), k
        else:
            assert rel_err(grads[1][k], ref) <= 1e-4, k


def _count_saved(fn) -> int:
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(saved)


def test_no_grad_path_saves_nothing() -> None:
    from ilm_kernels.ssd_triton import ssd_scan_triton

    inputs = make_inputs(1, 9, 2, 4, 1, 8, "h", True)
    t = {k: None if v is None else v.float().to(DEVICE) for k, v in inputs.items()}
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    kwargs = {"D": t["D"], "initial_states": t["initial_states"], "return_final_states": True}

    # No input requires grad.
    assert _count_saved(lambda: ssd_scan_triton(*args, 8, **kwargs)) == 0
    # Inputs require grad, but autograd is off (the implicit solver's iterations).
    for v in t.values():
        if v is not None:
            v.requires_grad_()
    with torch.no_grad():
        assert _count_saved(lambda: ssd_scan_triton(*args, 8, **kwargs)) == 0
    # With autograd on, the Function saves its inputs (and only those).
    assert _count_saved(lambda: ssd_scan_triton(*args, 8, **kwargs)) == 7


def test_dispatch_unknown_backend() -> None:
    inputs = make_inputs(1, 4, 1, 2, 1, 2, None, False)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ssd_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")), 4, backend="cuda")


@pytest.mark.skipif(has_module("mamba_ssm"), reason="mamba-ssm is installed")
def test_dispatch_mamba_ssm_missing() -> None:
    inputs = make_inputs(1, 4, 1, 2, 1, 2, None, False)
    with pytest.raises(BackendUnavailableError, match="mamba-ssm is not installed"):
        ssd_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")), 4, backend="mamba_ssm")


def test_dispatch_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(1, 4, 1, 2, 1, 2, None, False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        ssd_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")), 4, backend="triton")


def test_dispatch_reference_and_auto_on_cpu() -> None:
    inputs = make_inputs(1, 11, 2, 3, 1, 4, "h", True)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    expected = ssd_scan_reference(*args, 4, D=inputs["D"], initial_states=inputs["initial_states"])
    for backend in ("reference", "auto"):
        got = ssd_scan(
            *args, 4, D=inputs["D"], initial_states=inputs["initial_states"], backend=backend
        )
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_import_needs_no_triton() -> None:
    """Importing the dispatcher must not import triton, CUDA code or mamba-ssm."""
    code = (
        "import sys; import ilm_kernels.ssd_scan; "
        "bad = [m for m in ('triton', 'mamba_ssm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_poison_hook_fills_nan() -> None:
    """The poison hook is active in these tests: fresh kernel buffers are all NaN."""
    from ilm_kernels.ssd_triton import _empty

    assert torch.isnan(_empty(3, 2, dtype=torch.float32, device=torch.device(DEVICE))).all()


def test_strided_views_read_in_place() -> None:
    """x, B, C as views of one (b, l, h*p + 2*g*n) tensor (the model's conv output) and dt as a
    column slice: the same values and gradients as contiguous copies, with no copy made."""
    b, seqlen, h, p, g, n = 2, 21, 2, 4, 1, 8
    inputs = make_inputs(b, seqlen, h, p, g, n, "h", True)
    gen = torch.Generator().manual_seed(3)
    packed = torch.randn(b, seqlen, h * p + 2 * g * n, generator=gen).to(DEVICE).requires_grad_()
    dt_wide = torch.rand(b, seqlen, h + 3, generator=gen).to(DEVICE).add(0.1).requires_grad_()
    gy = torch.randn(b, seqlen, h, p, generator=gen).to(DEVICE)

    def views(src, dts):
        x, B, C = torch.split(src, [h * p, g * n, g * n], dim=-1)
        return (
            x.view(b, seqlen, h, p),
            dts[..., 1 : h + 1],
            B.view(b, seqlen, g, n),
            C.view(b, seqlen, g, n),
        )

    A, D = inputs["A"].float().to(DEVICE), inputs["D"].float().to(DEVICE)
    outs = []
    for contiguous in (False, True):
        src, dts = packed.detach().clone().requires_grad_(), dt_wide.detach().clone()
        dts.requires_grad_()
        x, dt, B, C = views(src, dts)
        if contiguous:
            x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
        else:
            assert not x.is_contiguous() and not B.is_contiguous() and not dt.is_contiguous()
        y, final = ssd_scan(x, dt, A, B, C, 8, D=D, return_final_states=True, backend="triton")
        ((y * gy).sum() + final.square().sum()).backward()
        outs.append((y, final, src.grad, dts.grad))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fp32_precision_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from ilm_kernels.ssd_triton import FP32_PRECISION_ENV, _precision, fp32_precision

    f32 = torch.zeros(1)
    monkeypatch.delenv(FP32_PRECISION_ENV, raising=False)
    assert fp32_precision() == "tf32" and _precision(f32, None) == "tf32"
    monkeypatch.setenv(FP32_PRECISION_ENV, "ieee")
    assert _precision(f32) == "ieee" and _precision(f32, f32.half()) == "tf32"
    monkeypatch.setenv(FP32_PRECISION_ENV, "fp64")
    with pytest.raises(ValueError, match="ILM_KERNELS_FP32_PRECISION='fp64'"):
        fp32_precision()


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("g", [1, 2])
def test_db_dc_summed_over_heads_in_kernel(monkeypatch: pytest.MonkeyPatch, heads, g) -> None:
    """dB/dC programs that each sum `heads` heads of a group (the GPU choice is up to 8; the
    interpreter uses the whole group): every slice count gives the reference gradients."""
    from ilm_kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "_heads_per_program", lambda dims, programs: heads)
    inputs = make_inputs(2, 29, 4, 4, g, 8, "h", True, seed=5)
    ref, tri = run_both(inputs, 16, torch.float32, True)
    errs = {k: rel_err(tri[k], ref[k]) for k in ref}
    assert max(errs.values()) <= 1e-4, errs
