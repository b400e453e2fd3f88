"""Tests of the PyTorch reference kernels (``ilm_kernels``) against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ilm_kernels import (
    causal_conv1d_reference,
    causal_conv1d_step,
    gated_rms_norm,
    rms_norm,
    segsum,
    ssd_naive,
    ssd_scan_reference,
    ssd_step,
)

F64 = torch.float64


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max(|expected|, tiny), with equal shapes and dtypes."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"max abs err {err:.3e}, scale {scale:.3e}"


# --------------------------------------------------------------------------------------------
# SSD
# --------------------------------------------------------------------------------------------


def make_ssd_inputs(
    b: int = 2,
    seqlen: int = 13,
    h: int = 4,
    p: int = 3,
    g: int = 2,
    n: int = 5,
    dtype: torch.dtype = F64,
    with_D: bool = True,
    with_init: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    return {
        "x": randn(b, seqlen, h, p),
        "dt": F.softplus(randn(b, seqlen, h) - 1.0),
        "A": -torch.exp(randn(h) * 0.5),
        "B": randn(b, seqlen, g, n),
        "C": randn(b, seqlen, g, n),
        "D": randn(h) if with_D else None,
        "initial_states": randn(b, h, p, n) if with_init else None,
    }


def ssd_closed_form(x, dt, A, B, C, D=None, initial_states=None):
    """Explicit double sum, independent of the kernels (tiny sizes only):

    y[b,t,h,:] = sum_{s<=t} (C_t . B_s) exp(A_h sum_{s<k<=t} dt_k) dt_s x_s
                 + exp(A_h sum_{k<=t} dt_k) S0 C_t + D_h x_t,  with group = h // (h // g).
    """
    b, seqlen, h, p = x.shape
    g = B.shape[2]
    y = torch.zeros_like(x)
    final = torch.zeros(b, h, p, B.shape[3], dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            cum = torch.cumsum(dt[bi, :, hi], 0)  # cum[t] = sum_{k<=t} dt_k
            for t in range(seqlen):
                acc = torch.zeros(p, dtype=x.dtype)
                for s in range(t + 1):
                    decay = torch.exp(A[hi] * (cum[t] - cum[s]))
                    cb = torch.dot(C[bi, t, gi], B[bi, s, gi])
                    acc = acc + cb * decay * dt[bi, s, hi] * x[bi, s, hi]
                if initial_states is not None:
                    acc = acc + torch.exp(A[hi] * cum[t]) * (initial_states[bi, hi] @ C[bi, t, gi])
                if D is not None:
                    acc = acc + D[hi] * x[bi, t, hi]
                y[bi, t, hi] = acc
            # final state: sum_s exp(A sum_{s<k<=l} dt_k) dt_s x_s B_s^T  (+ decayed S0)
            st = torch.zeros(p, B.shape[3], dtype=x.dtype)
            for s in range(seqlen):
                decay = torch.exp(A[hi] * (cum[-1] - cum[s]))
                st = st + decay * dt[bi, s, hi] * torch.outer(x[bi, s, hi], B[bi, s, gi])
            if initial_states is not None:
                st = st + torch.exp(A[hi] * cum[-1]) * initial_states[bi, hi]
            final[bi, hi] = st
    return y, final


def test_segsum_matches_explicit_sums():
    a = torch.randn(2, 7, dtype=F64)
    out = segsum(a)
    assert out.shape == (2, 7, 7)
    for i in range(7):
        for j in range(7):
            if i >= j:
                expected = a[:, j + 1 : i + 1].sum(-1)
                assert torch.allclose(out[:, i, j], expected, rtol=0, atol=1e-12)
            else:
                assert torch.isneginf(out[:, i, j]).all()


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("h,g", [(4, 2), (1, 1)])
def test_ssd_naive_matches_closed_form(h, g, with_init):
    inp = make_ssd_inputs(b=1, seqlen=6, h=h, p=2, g=g, n=3, with_init=with_init, seed=1)
    y, final = ssd_naive(**inp, return_final_states=True)
    y_ref, final_ref = ssd_closed_form(**inp)
    assert_rel_close(y, y_ref, 1e-12)
    assert_rel_close(final, final_ref, 1e-12)


@pytest.mark.parametrize("seqlen", [1, 5, 8, 13, 16, 37])
@pytest.mark.parametrize(
    "h,g,with_D,with_init",
    [(4, 2, True, True), (4, 2, False, False), (1, 1, True, False), (4, 1, False, True)],
)
def test_ssd_chunked_matches_naive(seqlen, h, g, with_D, with_init):
    inp = make_ssd_inputs(seqlen=seqlen, h=h, g=g, with_D=with_D, with_init=with_init)
    y, final = ssd_scan_reference(**inp, chunk_size=8, return_final_states=True)
    y_ref, final_ref = ssd_naive(**inp, return_final_states=True)
    assert_rel_close(y, y_ref, 1e-10)
    assert_rel_close(final, final_ref, 1e-10)
    # y only, without final states
    assert_rel_close(ssd_scan_reference(**inp, chunk_size=8), y_ref, 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_ssd_chunk_size_invariance(chunk_size):
    inp = make_ssd_inputs(seqlen=20, h=4, g=4, seed=2)
    y, final = ssd_scan_reference(**inp, chunk_size=chunk_size, return_final_states=True)
    y_ref, final_ref = ssd_naive(**inp, return_final_states=True)
    assert_rel_close(y, y_ref, 1e-10)
    assert_rel_close(final, final_ref, 1e-10)


def test_ssd_D_per_channel():
    inp = make_ssd_inputs(seqlen=11, with_D=False, seed=3)
    D = torch.randn(4, 3, dtype=F64)
    y = ssd_scan_reference(**{**inp, "D": D}, chunk_size=4)
    y0 = ssd_naive(**inp)
    assert_rel_close(y, y0 + D * inp["x"], 1e-10)


@pytest.mark.parametrize("l1", [3, 8, 11])
def test_ssd_chunking_consistency(l1):
    inp = make_ssd_inputs(seqlen=21, seed=4)
    y, final = ssd_scan_reference(**inp, chunk_size=8, return_final_states=True)

    def part(sl, init):
        return {
            "x": inp["x"][:, sl],
            "dt": inp["dt"][:, sl],
            "A": inp["A"],
            "B": inp["B"][:, sl],
            "C": inp["C"][:, sl],
            "D": inp["D"],
            "initial_states": init,
        }

    y1, s1 = ssd_scan_reference(
        **part(slice(0, l1), inp["initial_states"]), chunk_size=8, return_final_states=True
    )
    y2, s2 = ssd_scan_reference(**part(slice(l1, None), s1), chunk_size=8, return_final_states=True)
    assert_rel_close(torch.cat([y1, y2], dim=1), y, 1e-10)
    assert_rel_close(s2, final, 1e-10)


def test_ssd_step_iterated_matches_naive():
    inp = make_ssd_inputs(seqlen=9, seed=5)
    y_ref, final_ref = ssd_naive(**inp, return_final_states=True)
    state = inp["initial_states"]
    ys = []
    for t in range(9):
        state_before = state.clone()
        y_t, new_state = ssd_step(
            state,
            inp["x"][:, t],
            inp["dt"][:, t],
            inp["A"],
            inp["B"][:, t],
            inp["C"][:, t],
            inp["D"],
        )
        assert torch.equal(state, state_before)  # not modified in place
        ys.append(y_t)
        state = new_state
    assert_rel_close(torch.stack(ys, dim=1), y_ref, 1e-12)
    assert_rel_close(state, final_ref, 1e-12)


@pytest.mark.parametrize("seqlen", [5, 19])
def test_ssd_gradients_match_naive(seqlen):
    inp = make_ssd_inputs(seqlen=seqlen, seed=6)
    names = ["x", "dt", "A", "B", "C", "D", "initial_states"]
    gen = torch.Generator().manual_seed(7)
    w_y = torch.randn(2, seqlen, 4, 3, generator=gen, dtype=F64)
    w_s = torch.randn(2, 4, 3, 5, generator=gen, dtype=F64)

    def grads(fn, **kw):
        leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in names}
        y, s = fn(**leaves, return_final_states=True, **kw)
        loss = (y * w_y).sum() + (s * w_s).sum()
        return torch.autograd.grad(loss, [leaves[k] for k in names])

    g_chunk = grads(ssd_scan_reference, chunk_size=8)
    g_naive = grads(ssd_naive)
    for name, gc, gn in zip(names, g_chunk, g_naive):
        assert gc.abs().max() > 0, name
        assert_rel_close(gc, gn, 1e-9)


def test_ssd_long_sequence_is_stable():
    # strong decay over a long chunk: no NaN/inf in values or gradients
    inp = make_ssd_inputs(b=1, seqlen=300, h=2, g=1, seed=8)
    inp["dt"] = inp["dt"] * 20.0
    x = inp.pop("x").requires_grad_(True)
    y, final = ssd_scan_reference(x, **inp, chunk_size=256, return_final_states=True)
    y_ref = ssd_naive(x, **inp)
    assert_rel_close(y, y_ref, 1e-9)
    (gx,) = torch.autograd.grad(y.sum() + final.sum(), x)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_dtypes(dtype):
    inp64 = make_ssd_inputs(seqlen=10, seed=9)
    inp = {k: (v.to(dtype) if v is not None else None) for k, v in inp64.items()}
    y, final = ssd_scan_reference(**inp, chunk_size=4, return_final_states=True)
    assert y.dtype == dtype
    assert final.dtype == torch.float32
    # reference on the same (rounded) inputs, in float64
    y_ref, final_ref = ssd_naive(
        **{k: v.double() for k, v in inp.items()}, return_final_states=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel_close(y.double(), y_ref, tol)
    assert_rel_close(final.double(), final_ref, 1e-5)

    y_n = ssd_naive(**inp)
    assert y_n.dtype == dtype
    y_t, s_t = ssd_step(
        inp["initial_states"],
        inp["x"][:, 0],
        inp["dt"][:, 0],
        inp["A"],
        inp["B"][:, 0],
        inp["C"][:, 0],
        inp["D"],
    )
    assert y_t.dtype == dtype and s_t.dtype == dtype


def test_ssd_rejects_bad_groups():
    inp = make_ssd_inputs(h=4, g=3, seqlen=4)
    with pytest.raises(ValueError):
        ssd_scan_reference(**inp, chunk_size=4)


# --------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------


def conv_loop(x, weight, bias=None, initial_window=None):
    """y_t[c] = bias[c] + sum_j weight[c, j] * x_{t-(w-1)+j}[c]; earlier inputs from the window."""
    b, seqlen, c = x.shape
    w = weight.shape[1]
    if initial_window is None:
        initial_window = torch.zeros(b, c, w - 1, dtype=x.dtype)
    y = torch.zeros_like(x)
    for t in range(seqlen):
        for j in range(w):
            src = t - (w - 1) + j
            if src >= 0:
                inp = x[:, src, :]
            else:
                inp = initial_window[:, :, (w - 1) + src]
            y[:, t, :] += weight[:, j] * inp
        if bias is not None:
            y[:, t, :] += bias
    return y


def make_conv_inputs(b=2, seqlen=10, c=6, w=4, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seqlen, c, generator=gen, dtype=F64).to(dtype)
    weight = torch.randn(c, w, generator=gen, dtype=F64).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=F64).to(dtype)
    window = torch.randn(b, c, w - 1, generator=gen, dtype=F64).to(dtype)
    return x, weight, bias, window


@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 7])
@pytest.mark.parametrize("use_bias,use_window", [(True, True), (False, False), (True, False)])
def test_conv_matches_loop(w, seqlen, use_bias, use_window):
    x, weight, bias, window = make_conv_inputs(seqlen=seqlen, w=w)
    bias = bias if use_bias else None
    window = window if use_window else None
    y = causal_conv1d_reference(x, weight, bias, initial_window=window)
    assert_rel_close(y, conv_loop(x, weight, bias, window), 1e-12)
    # the final window holds the last w-1 inputs, oldest first (zeros before the sequence)
    y2, final = causal_conv1d_reference(
        x, weight, bias, initial_window=window, return_final_window=True
    )
    assert torch.equal(y2, y)
    expected = torch.zeros(2, 6, w - 1, dtype=F64)
    for k in range(w - 1):
        src = seqlen - (w - 1) + k
        if src >= 0:
            expected[:, :, k] = x[:, src, :]
        elif window is not None:
            expected[:, :, k] = window[:, :, (w - 1) + src]
    assert final.shape == expected.shape
    assert torch.equal(final, expected)


def test_conv_matches_nn_conv1d():
    x, weight, bias, _ = make_conv_inputs(seqlen=9, c=5, w=4)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(weight[:, None, :])
        conv.bias.copy_(bias)
        expected = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    assert_rel_close(causal_conv1d_reference(x, weight, bias), expected, 1e-12)


def test_conv_step_iterated_matches_full():
    x, weight, bias, window = make_conv_inputs(seqlen=8)
    y, final_window = causal_conv1d_reference(
        x, weight, bias, initial_window=window, return_final_window=True
    )
    win = window
    ys = []
    for t in range(8):
        win_before = win.clone()
        y_t, new_win = causal_conv1d_step(win, x[:, t], weight, bias)
        assert torch.equal(win, win_before)  # not modified in place
        ys.append(y_t)
        win = new_win
    assert_rel_close(torch.stack(ys, dim=1), y, 1e-12)
    assert torch.equal(win, final_window)


@pytest.mark.parametrize("l1", [1, 2, 5])
def test_conv_split_with_carried_window(l1):
    x, weight, bias, window = make_conv_inputs(seqlen=9)
    y, final = causal_conv1d_reference(
        x, weight, bias, initial_window=window, return_final_window=True
    )
    y1, win1 = causal_conv1d_reference(
        x[:, :l1], weight, bias, initial_window=window, return_final_window=True
    )
    y2, win2 = causal_conv1d_reference(
        x[:, l1:], weight, bias, initial_window=win1, return_final_window=True
    )
    assert_rel_close(torch.cat([y1, y2], dim=1), y, 1e-12)
    assert torch.equal(win2, final)
    assert torch.equal(final, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("seqlen", [1, 2])
def test_conv_final_window_short_sequence(seqlen):
    x, weight, bias, window = make_conv_inputs(seqlen=seqlen, w=4)
    _, final = causal_conv1d_reference(
        x, weight, bias, initial_window=window, return_final_window=True
    )
    # the last 3 inputs, oldest first: the tail of the old window followed by x
    expected = torch.cat([window[:, :, seqlen:], x.transpose(1, 2)], dim=-1)
    assert final.shape == (2, 6, 3)
    assert torch.equal(final, expected)
    # without an initial window the missing inputs are zeros
    _, final0 = causal_conv1d_reference(x, weight, bias, return_final_window=True)
    assert torch.equal(final0[:, :, : 3 - seqlen], torch.zeros(2, 6, 3 - seqlen, dtype=F64))
    assert torch.equal(final0[:, :, 3 - seqlen :], x.transpose(1, 2))


def test_conv_gradcheck():
    x, weight, bias, window = make_conv_inputs(b=1, seqlen=5, c=3, w=3)
    args = [t.requires_grad_(True) for t in (x, weight, bias, window)]
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_reference(a[0], a[1], a[2], a[3], return_final_window=True),
        args,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_dtypes(dtype):
    x, weight, bias, window = make_conv_inputs(dtype=dtype)
    y, final = causal_conv1d_reference(x, weight, bias, window, return_final_window=True)
    assert y.dtype == dtype and final.dtype == dtype
    y_ref = conv_loop(x.double(), weight.double(), bias.double(), window.double())
    assert_rel_close(y.double(), y_ref, 1e-6 if dtype == torch.float32 else 1e-2)
    y_t, win_t = causal_conv1d_step(window, x[:, 0], weight, bias)
    assert y_t.dtype == dtype and win_t.dtype == dtype


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def test_rms_norm_matches_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=gen, dtype=F64)
    weight = torch.randn(8, generator=gen, dtype=F64)
    y = rms_norm(x, weight, eps=1e-6)
    expected = torch.empty_like(x)
    for i in range(2):
        for j in range(3):
            v = x[i, j]
            expected[i, j] = v / math.sqrt(float((v * v).sum()) / 8 + 1e-6) * weight
    assert_rel_close(y, expected, 1e-12)


@pytest.mark.parametrize("group_size", [None, 8, 4, 2])
def test_gated_rms_norm_matches_formula(group_size):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=gen, dtype=F64)
    gate = torch.randn(2, 3, 8, generator=gen, dtype=F64)
    weight = torch.randn(8, generator=gen, dtype=F64)
    y = gated_rms_norm(x, gate, weight, eps=1e-6, group_size=group_size)

    gs = 8 if group_size is None else group_size
    z = x * gate / (1 + torch.exp(-gate))  # x * silu(gate)
    expected = torch.empty_like(x)
    for start in range(0, 8, gs):
        zg = z[..., start : start + gs]
        ms = (zg * zg).sum(-1, keepdim=True) / gs
        expected[..., start : start + gs] = zg / torch.sqrt(ms + 1e-6)
    expected = expected * weight
    assert_rel_close(y, expected, 1e-12)


def test_gated_rms_norm_groups_differ_from_full():
    # guards against group_size being ignored
    gen = torch.Generator().manual_seed(2)
    x, gate = torch.randn(2, 2, 8, generator=gen, dtype=F64).unbind(0)
    weight = torch.ones(8, dtype=F64)
    assert not torch.allclose(
        gated_rms_norm(x, gate, weight, group_size=4), gated_rms_norm(x, gate, weight)
    )
    with pytest.raises(ValueError):
        gated_rms_norm(x, gate, weight, group_size=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_dtypes(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, generator=gen).to(dtype)
    gate = torch.randn(4, 16, generator=gen).to(dtype)
    weight = torch.randn(16, generator=gen)  # float32 weight with low-precision x
    y = rms_norm(x, weight)
    yg = gated_rms_norm(x, gate, weight, group_size=8)
    assert y.dtype == dtype and yg.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_rel_close(y.double(), rms_norm(x.double(), weight.double()), tol)
    yg_ref = gated_rms_norm(x.double(), gate.double(), weight.double(), group_size=8)
    assert_rel_close(yg.double(), yg_ref, tol)
