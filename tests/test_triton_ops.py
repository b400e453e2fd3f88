"""Our Triton kernels (``ilm_kernels.ops``) against the PyTorch references.

On a machine without a GPU every Triton kernel runs on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``, set by ``conftest.py`` before triton is imported), so shapes are tiny.
All freshly allocated kernel outputs are NaN-poisoned (module-level ``DEBUG_POISON`` flags), so
an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ilm_kernels import (
    causal_conv1d_reference,
    conv1d_triton,
    gated_rms_norm,
    norm_triton,
    rms_norm,
    ssd_scan_reference,
    ssd_triton,
    step_triton,
)
from ilm_kernels.backend import BackendUnavailableError, triton_interpreter
from ilm_kernels.ops import (
    causal_conv1d,
    causal_conv1d_step_op,
    gated_rms_norm_op,
    rms_norm_op,
    ssd_step_op,
)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and not triton_interpreter():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

T = torch.Tensor
OptT = torch.Tensor | None
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 1e-2, BF16: 2e-2}
SKIP_BF16 = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="bf16 is checked on GPU only: the Triton interpreter emulates bf16 through numpy, "
    "which has no bf16 (tl.dot with bf16 operands is wrong there)",
)


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """NaN-fill every output buffer the Triton wrappers allocate."""
    for mod in (conv1d_triton, norm_triton, step_triton):
        monkeypatch.setattr(mod, "DEBUG_POISON", True)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max(|expected|), with equal shapes and dtypes."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.isfinite(actual).all(), "non-finite (unwritten?) elements"
    if not expected.numel():
        return
    scale = expected.float().abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"max abs err {err:.3e}, scale {scale:.3e}"


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def compare_with_grads(
    fn: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor | None],
    tol: float,
    seed: int = 1,
) -> None:
    """Forward of fn vs ref, then the gradient of every non-None input for a random dy."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    ref_leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y_ref = ref(*ref_leaves)
    assert_rel_close(y, y_ref, tol)
    dy = randn(torch.Generator().manual_seed(seed), *y.shape, dtype=y.dtype)
    present = [t for t in leaves if t is not None]
    present_ref = [t for t in ref_leaves if t is not None]
    grads = torch.autograd.grad(y, present, dy)
    grads_ref = torch.autograd.grad(y_ref, present_ref, dy)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        try:
            assert_rel_close(g, g_ref, tol)
        except AssertionError as exc:
            raise AssertionError(f"gradient of input {i}: {exc}") from exc


def conv_ref(activation: str | None) -> Callable[..., torch.Tensor]:
    def ref(x: T, weight: T, bias: OptT = None, initial_window: OptT = None) -> T:
        y = causal_conv1d_reference(x, weight, bias, initial_window)
        return y if activation is None else F.silu(y)

    return ref


# --------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------

CONV_CASES = [
    # (seqlen, channels, width, activation, bias, window)
    (1, 5, 4, "silu", True, True),  # l < w-1
    (2, 3, 4, None, True, True),  # l < w-1
    (3, 4, 4, "silu", False, True),  # l == w-1
    (7, 5, 4, None, True, False),  # odd length
    (33, 6, 4, "silu", True, True),  # odd, longer
    (9, 1, 2, "silu", False, False),  # one channel, width 2
    (5, 3, 1, None, True, False),  # width 1: empty window
]


@pytest.mark.parametrize(("seqlen", "channels", "width", "act", "has_bias", "has_win"), CONV_CASES)
def test_conv1d_fp32_forward_and_grads(
    seqlen: int, channels: int, width: int, act: str | None, has_bias: bool, has_win: bool
) -> None:
    gen = torch.Generator().manual_seed(seqlen * 100 + channels)
    inputs = [
        randn(gen, 2, seqlen, channels),
        randn(gen, channels, width),
        randn(gen, channels) if has_bias else None,
        randn(gen, 2, channels, width - 1) if has_win and width > 1 else None,
    ]

    def fn(x: T, weight: T, bias: OptT, win: OptT) -> T:
        return causal_conv1d(x, weight, bias, win, activation=act, backend="triton")

    compare_with_grads(fn, conv_ref(act), inputs, TOL[F32])


@pytest.mark.parametrize("blocks", [(4, 2), (2, 4)])
def test_conv1d_small_tiles(monkeypatch: pytest.MonkeyPatch, blocks: tuple[int, int]) -> None:
    """Several programs along l and c (as on a GPU): tile borders and partial-sum rows."""
    monkeypatch.setattr(conv1d_triton, "_blocks", lambda seqlen, channels: blocks)
    gen = torch.Generator().manual_seed(7)
    inputs = [randn(gen, 2, 11, 5), randn(gen, 5, 4), randn(gen, 5), randn(gen, 2, 5, 3)]

    def fn(x: T, weight: T, bias: OptT, win: OptT) -> T:
        return causal_conv1d(x, weight, bias, win, activation="silu", backend="triton")

    compare_with_grads(fn, conv_ref("silu"), inputs, TOL[F32])


def test_conv1d_strided_input() -> None:
    """x as a channel slice of a wider projection (non-contiguous, stride(1) != c)."""
    gen = torch.Generator().manual_seed(3)
    wide = randn(gen, 2, 9, 12)
    inputs = [wide[..., 2:7], randn(gen, 5, 4), randn(gen, 5), randn(gen, 2, 5, 3)]

    def fn(x: T, weight: T, bias: OptT, win: OptT) -> T:
        return causal_conv1d(x, weight, bias, win, activation="silu", backend="triton")

    with torch.no_grad():
        assert_rel_close(fn(*inputs), conv_ref("silu")(*inputs), TOL[F32])
    compare_with_grads(fn, conv_ref("silu"), inputs, TOL[F32])


@pytest.mark.parametrize("dtype", [F16, pytest.param(BF16, marks=SKIP_BF16)])
def test_conv1d_half(dtype: torch.dtype) -> None:
    """Half inputs, float32 weights (the reference computes in float32)."""
    gen = torch.Generator().manual_seed(4)
    for seqlen, x_dtype_only in ((2, True), (13, False)):
        wdtype = F32 if x_dtype_only else dtype
        inputs = [
            randn(gen, 2, seqlen, 6, dtype=dtype),
            randn(gen, 6, 4, dtype=wdtype),
            randn(gen, 6, dtype=wdtype),
            randn(gen, 2, 6, 3, dtype=dtype),
        ]

        def fn(x: T, weight: T, bias: OptT, win: OptT) -> T:
            return causal_conv1d(x, weight, bias, win, activation="silu", backend="triton")

        compare_with_grads(fn, conv_ref("silu"), inputs, TOL[dtype])


@pytest.mark.parametrize("seqlen", [2, 8])
def test_conv1d_final_window(seqlen: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x, weight, bias, win = randn(gen, 2, seqlen, 3), randn(gen, 3, 4), None, randn(gen, 2, 3, 3)
    for w in (win, None):
        y, final = causal_conv1d(x, weight, bias, w, True, backend="triton")
        y_ref, final_ref = causal_conv1d_reference(x, weight, bias, w, True)
        assert_rel_close(y, y_ref, TOL[F32])
        assert torch.equal(final, final_ref)
    # Continuing from the final window equals one call over the concatenation.
    _, final = causal_conv1d(x, weight, bias, win, True, backend="triton")
    x2 = randn(gen, 2, 5, 3)
    y2, _ = causal_conv1d(x2, weight, bias, final, True, activation="silu", backend="triton")
    y_full = F.silu(causal_conv1d_reference(torch.cat([x, x2], 1), weight, bias, win))
    assert_rel_close(y2, y_full[:, seqlen:], TOL[F32])


def count_saved(fn: Callable[[], object]) -> int:
    """How many tensors autograd saves while fn runs."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(saved)


def test_no_grad_paths_save_nothing() -> None:
    gen = torch.Generator().manual_seed(6)
    x = randn(gen, 2, 5, 4).requires_grad_(True)
    weight = randn(gen, 4, 3).requires_grad_(True)
    gate = randn(gen, 2, 5, 4).requires_grad_(True)
    nweight = randn(gen, 4).requires_grad_(True)

    def conv() -> object:
        return causal_conv1d(x, weight, activation="silu", backend="triton")

    def norm() -> object:
        return gated_rms_norm_op(x, gate, nweight, group_size=2, backend="triton")

    for op in (conv, norm):
        assert count_saved(op) > 0  # the hook sees the saves of the autograd path
        with torch.no_grad():
            assert count_saved(op) == 0
            assert op().grad_fn is None
    # Inputs that need no grad, grad mode on: also nothing saved.
    assert count_saved(lambda: causal_conv1d(x.detach(), weight.detach(), backend="triton")) == 0
    assert count_saved(lambda: rms_norm_op(x.detach(), nweight.detach(), backend="triton")) == 0


# --------------------------------------------------------------------------------------------
# (gated) RMS norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 12, 4, 3])
def test_gated_rms_norm_fp32(group_size: int | None) -> None:
    """One group (None, 12) and several groups, incl. a non-power-of-two group (3)."""
    gen = torch.Generator().manual_seed(8)
    inputs = [randn(gen, 3, 5, 12), randn(gen, 3, 5, 12), 1.0 + randn(gen, 12)]

    def fn(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm_op(x, gate, weight, 1e-5, group_size, backend="triton")

    def ref(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm(x, gate, weight, 1e-5, group_size)

    compare_with_grads(fn, ref, inputs, TOL[F32])


@pytest.mark.parametrize("programs", [4, 2, 1])
def test_gated_rms_norm_many_programs(monkeypatch: pytest.MonkeyPatch, programs: int) -> None:
    """Two rows per block (as on a GPU with long rows), and fewer backward programs than blocks
    (each walks several, as with the SM-count grid): partial dweight rows and row masks."""
    monkeypatch.setattr(norm_triton, "_block_r", lambda rows, block_n: 2)
    monkeypatch.setattr(norm_triton, "_row_programs", lambda device: programs)
    gen = torch.Generator().manual_seed(9)
    inputs = [randn(gen, 7, 8), randn(gen, 7, 8), randn(gen, 8)]

    def fn(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm_op(x, gate, weight, 1e-5, 4, backend="triton")

    def ref(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm(x, gate, weight, 1e-5, 4)

    compare_with_grads(fn, ref, inputs, TOL[F32])


@pytest.mark.parametrize("dtype", [F16, pytest.param(BF16, marks=SKIP_BF16)])
def test_gated_rms_norm_half(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10)
    inputs = [randn(gen, 4, 16, dtype=dtype), randn(gen, 4, 16, dtype=dtype), randn(gen, 16)]

    def fn(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm_op(x, gate, weight, 1e-5, 8, backend="triton")

    def ref(x: T, gate: T, weight: T) -> T:
        return gated_rms_norm(x, gate, weight, 1e-5, 8)

    compare_with_grads(fn, ref, inputs, TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F16])
def test_rms_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    inputs = [randn(gen, 2, 3, 10, dtype=dtype), randn(gen, 10, dtype=dtype)]

    def fn(x: T, weight: T) -> T:
        return rms_norm_op(x, weight, 1e-6, backend="triton")

    def ref(x: T, weight: T) -> T:
        return rms_norm(x, weight, 1e-6)

    compare_with_grads(fn, ref, inputs, TOL[dtype])


# --------------------------------------------------------------------------------------------
# decoding steps: iterated over time they equal the full-sequence references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "act", "dtype"), [(4, "silu", F32), (2, None, F32), (1, "silu", F32), (4, None, F16)]
)
def test_conv1d_step_iterated(width: int, act: str | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(12)
    x = randn(gen, 2, 6, 5, dtype=dtype)
    weight, bias = randn(gen, 5, width), randn(gen, 5)
    window = randn(gen, 2, 5, width - 1, dtype=dtype)
    y_ref, final_ref = causal_conv1d_reference(x, weight, bias, window, True)
    if act is not None:
        y_ref = F.silu(y_ref)
    ys = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y_t, window = causal_conv1d_step_op(
                window, x[:, t], weight, bias, activation=act, backend="triton"
            )
            ys.append(y_t)
    assert_rel_close(torch.stack(ys, 1), y_ref, TOL[dtype])
    assert torch.equal(window, final_ref)


@pytest.mark.parametrize(
    ("ngroups", "d_shape", "x_dtype"),
    [(1, "h", F32), (2, "hp", F32), (4, None, F32), (2, "h", F16)],
)
def test_ssd_step_iterated(ngroups: int, d_shape: str | None, x_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(13)
    b, seqlen, h, p, n = 2, 5, 4, 3, 6
    x = randn(gen, b, seqlen, h, p, dtype=x_dtype)
    dt = F.softplus(randn(gen, b, seqlen, h) - 1.0)
    A = -torch.exp(0.5 * randn(gen, h))
    B, C = randn(gen, b, seqlen, ngroups, n), randn(gen, b, seqlen, ngroups, n)
    D = {"h": randn(gen, h), "hp": randn(gen, h, p), None: None}[d_shape]
    state = randn(gen, b, h, p, n)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, 4, D, state, True)
    ys = []
    with torch.no_grad():
        for t in range(seqlen):
            y_t, state = ssd_step_op(
                state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, backend="triton"
            )
            ys.append(y_t)
    assert_rel_close(torch.stack(ys, 1), y_ref, TOL[x_dtype])
    assert_rel_close(state, final_ref, TOL[F32])


def test_step_ops_match_reference_step_fp16_state() -> None:
    """State kept in float16: the new state is returned in the state's dtype."""
    from ilm_kernels import ssd_step

    gen = torch.Generator().manual_seed(14)
    state = randn(gen, 1, 2, 3, 4, dtype=F16)
    args = (randn(gen, 1, 2, 3), torch.rand(1, 2).to(DEVICE), -torch.rand(2).to(DEVICE))
    bc = (randn(gen, 1, 1, 4), randn(gen, 1, 1, 4))
    y, s = ssd_step_op(state, *args, *bc, backend="triton")
    y_ref, s_ref = ssd_step(state, *args, *bc)
    assert_rel_close(y, y_ref, TOL[F16])
    assert_rel_close(s, s_ref, TOL[F16])


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------


def test_auto_on_cpu_is_the_reference() -> None:
    if ON_GPU:
        pytest.skip("auto picks Triton on CUDA")
    gen = torch.Generator().manual_seed(15)
    x, w = randn(gen, 2, 4, 3).double(), randn(gen, 3, 4).double()
    y = causal_conv1d(x, w, activation="silu")
    assert y.dtype == torch.float64
    assert torch.equal(y, F.silu(causal_conv1d_reference(x, w)))
    g = randn(gen, 2, 4, 3)
    assert torch.equal(
        gated_rms_norm_op(x.float(), g, w[:, 0].float()),
        gated_rms_norm(x.float(), g, w[:, 0].float()),
    )


def test_dispatcher_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(16)
    x, w = randn(gen, 2, 4, 3), randn(gen, 3, 4)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        causal_conv1d(x, w, backend="cuda")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, w[:2], backend="triton")
    with pytest.raises(ValueError, match="initial_window"):
        causal_conv1d(x, w, initial_window=randn(gen, 2, 3, 2), backend="triton")
    with pytest.raises(TypeError, match="supports"):
        causal_conv1d(x.double(), w.double(), backend="triton")
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_op(x, x, w[:, 0], group_size=2, backend="triton")
    if not ON_GPU:
        with pytest.raises(BackendUnavailableError):  # not installed, or CPU tensors
            gated_rms_norm_op(x, x, w[:, 0], backend="mamba_ssm")
        with pytest.raises(BackendUnavailableError):
            ssd_step_op(*[torch.ones(1)] * 6, backend="mamba_ssm")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            causal_conv1d(x, w, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Step kernels have no autograd: refuse rather than silently drop the graph.
    with pytest.raises(RuntimeError, match="no_grad"):
        causal_conv1d_step_op(
            randn(gen, 2, 3, 3), x[:, 0].requires_grad_(True), w, backend="triton"
        )
    with pytest.raises(ValueError, match="multiple of ngroups"):
        with torch.no_grad():
            ssd_step_op(
                randn(gen, 1, 3, 2, 4),
                randn(gen, 1, 3, 2),
                torch.ones(1, 3, device=DEVICE),
                -torch.ones(3, device=DEVICE),
                randn(gen, 1, 2, 4),
                randn(gen, 1, 2, 4),
                backend="triton",
            )


# --------------------------------------------------------------------------------------------
# Offsets past 2**31 elements, without allocating such tensors
# --------------------------------------------------------------------------------------------


@triton.jit
def _offsets_kernel(out_ptr, i, si, j, sj, k, sk):
    tl.store(out_ptr + 0, ssd_triton._base3(i, si, j, sj, k, sk))
    tl.store(out_ptr + 1, conv1d_triton._base(i, si, j, sj, k, sk))
    tl.store(out_ptr + 2, norm_triton._row_base(j, sj))


def test_base_offsets_are_int64_past_2_31() -> None:
    """The kernels' scalar base-offset helpers give exact offsets where int32 would wrap (a
    (b, l, c) tensor of more than 2**31 elements), run on the same backend as the kernels."""
    offsets = _offsets_kernel
    # batch 7 of a (8, 2**20, 4352)-like view: stride_b 2**32 - 5 is itself past int32's range
    # for the product; j * sj = 2**20 * 4352 ~ 4.6e9.
    cases = [(7, 2**31 - 5, 2**20, 4352, 63, 1), (3, 4096, 900_000, 4096, 5, 64)]
    for i, si, j, sj, k, sk in cases:
        out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
        offsets[(1,)](out, i, si, j, sj, k, sk)
        want = i * si + j * sj + k * sk
        assert out.tolist() == [want, want, j * sj], (out.tolist(), want)
        assert want > 2**31


def test_gated_rms_norm_reads_strided_views() -> None:
    """x and gate as column slices of one wider tensor (Mamba2's in_proj output): the same
    values and gradients as contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    packed = randn(gen, 2, 5, 40)
    weight = 1.0 + randn(gen, 16)
    outs = []
    for contiguous in (False, True):
        src = packed.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        x, gate = src[..., 3:19], src[..., 20:36]
        if contiguous:
            x, gate = x.contiguous(), gate.contiguous()
        y = gated_rms_norm_op(x, gate, w, 1e-5, 8, backend="triton")
        (y * torch.arange(y.numel(), device=y.device).view_as(y).cos()).sum().backward()
        outs.append((y, src.grad, w.grad))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
