"""Triton kernels for the Mamba2 chunked SSD scan, forward and backward.

Notation (shapes): ``b`` batch, ``l`` sequence length, ``h`` heads, ``p`` head dim, ``g`` groups
of B/C, ``n`` state dim, ``c = ceil(l / L)`` chunks of length ``L`` (``chunk_size``). Head ``h``
reads group ``h // (nheads // ngroups)``. Inside a chunk, ``a_i`` is the cumulative log-decay
``sum_{k <= i} dt_k * A_h`` and ``S_c`` (p, n) the state entering chunk ``c``.

Forward kernels (all intermediates in float32):

1. ``_chunk_cumsum_fwd``: ``dA_cumsum`` (b, h, c, L) = per-chunk cumsum of ``dt * A``.
2. ``_chunk_state``: state written by each chunk alone, (b, c, h, p, n),
   ``sum_j dt_j exp(a_last - a_j) x_j (outer) B_j``. With ``MODE=1`` the same kernel computes the
   backward's ``sum_i exp(a_i) dy_i (outer) C_i`` (gradient of the chunk-entry states).
3. ``_state_passing_fwd``: ``S_{c+1} = exp(a_last_c) S_c + chunk_state_c``, from the initial state;
   writes ``S_c`` for every chunk (b, c, h, p, n) and the final state (b, h, p, n).
4. ``_chunk_scan_fwd``: ``y_i = sum_{j <= i} (C_i . B_j) exp(a_i - a_j) dt_j x_j
   + exp(a_i) S_c C_i + D x_i``.

Backward kernels (the forward intermediates are recomputed, so only the inputs are saved):

5. ``_chunk_state`` (``MODE=1``) then ``_state_passing_bwd``: gradients of the chunk states
   (b, c, h, p, n), of the initial state, and the part of ``d a_last`` that flows through the
   state passing, ``<dS_{c+1}, S_{c+1}>``.
6. ``_chunk_scan_bwd_dx``: ``dx`` and the direct part of ``ddt``.
7. ``_chunk_scan_bwd_dc`` / ``_chunk_scan_bwd_db``: per-head ``dC`` / ``dB`` (summed to groups
   afterwards) and ``d a_i`` contributions ``dC_i . C_i`` and ``- dB_j . B_j``.
8. ``_chunk_cumsum_bwd``: reverse cumsum of ``d a`` to ``d(dt A)``, then ``ddt`` and per-chunk
   partial sums of ``dA``.

The small reductions left to PyTorch are: group sums of dB/dC, the sum of dA partials, the
head-dim partials of ``ddt`` (headdim > 64), and ``dD = sum(dy * x)``.

Sequence tails are masked (``l`` need not be a multiple of ``chunk_size``): masked steps have
``dt = 0`` (no decay, no write). Every kernel writes every element of its output that is read.

Matmul operands (``tl.dot``) are in the input dtype (bf16/fp16 tensor cores; fp32 states and
scores are cast down first, as mamba-ssm does) and accumulate in float32. Float32 inputs use
TF32 on the GPU, or exact IEEE fp32 with ``ILM_KERNELS_FP32_PRECISION=ieee`` (the GPU tests set
it to compare at 1e-5). x, dt, B, C and dy are read through their strides (no copies); every
scalar base offset is int64, tile offsets are int32. ``tools/kernel_report.py`` compiles every
kernel for sm_90a and reports registers, spills, shared memory and the MMA instruction.

Importing this module needs triton but never CUDA or mamba-ssm. On CPU tensors the kernels run
only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import triton_interpreter

__all__ = ["SSDScanFn", "poison_outputs", "ssd_scan_triton", "ssd_triton_bwd", "ssd_triton_fwd"]

# --------------------------------------------------------------------------------------------
# Test hook: fill every buffer the kernels write with NaN before the launch.
# --------------------------------------------------------------------------------------------

_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the context, every buffer allocated for a kernel to write is NaN-filled first.

    A kernel that forgets to write an element then leaks a NaN into the result (tests).
    """
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``; NaN-filled under :func:`poison_outputs`."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan"))
    return out


# --------------------------------------------------------------------------------------------
# Kernels
#
# Addressing: every program computes its scalar base offsets (batch, chunk start, head, group)
# in int64 and adds them to the pointers once; the offsets inside a tile (a chunk of at most
# chunk_size steps by one head's p or n) stay int32. Inputs x, dt, B, C and dy are read through
# their strides (the model passes views of the conv output), outputs and scratch are contiguous.
# Dot operands are in the input dtype ``OP`` (bf16/fp16 tensor cores; fp32 with ``PREC``),
# accumulation is float32.
# --------------------------------------------------------------------------------------------


@triton.jit
def _base3(i, stride_i, j, stride_j, k, stride_k):
    """``i * stride_i + j * stride_j + k * stride_k`` in int64: a scalar base offset (batch,
    chunk start, head or group) of a tensor that may pass 2**31 elements."""
    i64 = tl.int64
    return tl.cast(i, i64) * stride_i + tl.cast(j, i64) * stride_j + tl.cast(k, i64) * stride_k


@triton.jit
def _chunk_cumsum_fwd(
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    A_ptr,  # (h,)
    dacs_ptr,  # out (b, h, c, L) float32
    seqlen,
    nheads,
    nchunks,
    chunk_size,
    s_db,
    s_dl,
    s_dh,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)  # over (b, h, c)
    ci = pid % nchunks
    bh = pid // nchunks
    hi = bh % nheads
    bi = (bh // nheads).to(tl.int64)
    t0 = ci * chunk_size
    offs = tl.arange(0, BLOCK_L)
    valid = (offs < chunk_size) & (offs < seqlen - t0)
    dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
    dt = tl.load(dt_base + offs * s_dl, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    cs = tl.cumsum(dt * a, axis=0)
    dacs_base = dacs_ptr + ((bi * nheads + hi) * nchunks + ci) * chunk_size
    tl.store(dacs_base + offs, cs, mask=offs < chunk_size)


@triton.jit
def _chunk_state(
    x_ptr,  # (b, l, h, p): x (MODE 0) or dy (MODE 1), strides s_xb, s_xl, s_xh, s_xp
    y_ptr,  # (b, l, g, n): B (MODE 0) or C (MODE 1), strides s_yb, s_yl, s_yg, s_yn
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    dacs_ptr,  # (b, h, c, L)
    out_ptr,  # out (b, c, h, p, n) float32
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    nchunks,
    chunk_size,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_yb,
    s_yl,
    s_yg,
    s_yn,
    s_db,
    s_dl,
    s_dh,
    MODE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    OP: tl.constexpr = x_ptr.dtype.element_ty
    pid_bch = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_n = tl.program_id(2)
    hi = pid_bch % nheads
    bc = pid_bch // nheads
    ci = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    gi = hi // heads_per_group
    t0 = ci * chunk_size
    nval = tl.minimum(chunk_size, seqlen - t0)  # steps of this chunk inside the sequence
    t0 = t0.to(tl.int64)
    x_base = x_ptr + _base3(bi, s_xb, t0, s_xl, hi, s_xh)
    y_base = y_ptr + _base3(bi, s_yb, t0, s_yl, gi, s_yg)
    dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
    dacs_base = dacs_ptr + ((bi * nheads + hi) * nchunks + ci) * chunk_size
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    a_last = tl.load(dacs_base + chunk_size - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kval = offs_k < nval
        xt = tl.load(
            x_base + offs_k[None, :] * s_xl + offs_p[:, None] * s_xp,
            mask=kval[None, :] & pmask[:, None],
            other=0.0,
        )  # (P, K)
        yk = tl.load(
            y_base + offs_k[:, None] * s_yl + offs_n[None, :] * s_yn,
            mask=kval[:, None] & nmask[None, :],
            other=0.0,
        )  # (K, N)
        a = tl.load(dacs_base + offs_k, mask=offs_k < chunk_size, other=0.0)
        if MODE == 0:
            dt = tl.load(dt_base + offs_k * s_dl, mask=kval, other=0.0)
            w = dt.to(tl.float32) * tl.exp(a_last - a)
        else:
            w = tl.exp(a)
        w = tl.where(kval, w, 0.0)
        yw = (yk.to(tl.float32) * w[:, None]).to(OP)
        acc += tl.dot(xt.to(OP), yw, input_precision=PREC)
    out = out_ptr + ((bi * nchunks + ci) * nheads + hi) * headdim * dstate
    tl.store(
        out + offs_p[:, None] * dstate + offs_n[None, :],
        acc,
        mask=pmask[:, None] & nmask[None, :],
    )


@triton.jit
def _state_passing_fwd(
    cs_ptr,  # (b, c, h, p*n) chunk states
    dacs_ptr,  # (b, h, c, L)
    init_ptr,  # (b, h, p*n)
    states_ptr,  # out (b, c, h, p*n): state entering each chunk (may alias cs_ptr)
    final_ptr,  # out (b, h, p*n) float32
    nheads,
    nchunks,
    chunk_size,
    dim,
    HAS_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1)
    hi = pid_bh % nheads
    bi = pid_bh // nheads
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    m = offs < dim
    if HAS_INIT:
        s = tl.load(init_ptr + pid_bh * dim + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    for ci in range(nchunks):
        base = ((bi * nchunks + ci) * nheads + hi) * dim
        own = tl.load(cs_ptr + base + offs, mask=m, other=0.0)  # read before the store:
        tl.store(states_ptr + base + offs, s, mask=m)  # states may alias cs (in place)
        a_last = tl.load(dacs_ptr + (pid_bh * nchunks + ci) * chunk_size + chunk_size - 1)
        s = tl.exp(a_last) * s + own
    tl.store(final_ptr + pid_bh * dim + offs, s, mask=m)


@triton.jit
def _chunk_scan_fwd(
    x_ptr,  # (b, l, h, p), strides s_xb, s_xl, s_xh, s_xp
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    dacs_ptr,  # (b, h, c, L)
    B_ptr,  # (b, l, g, n), strides s_bb, s_bl, s_bg, s_bn
    C_ptr,  # (b, l, g, n), strides s_cb, s_cl, s_cg, s_cn
    states_ptr,  # (b, c, h, p, n)
    D_ptr,  # (h,) or (h, p)
    y_ptr,  # out (b, l, h, p), contiguous
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    nchunks,
    chunk_size,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_db,
    s_dl,
    s_dh,
    s_bb,
    s_bl,
    s_bg,
    s_bn,
    s_cb,
    s_cl,
    s_cg,
    s_cn,
    HAS_D: tl.constexpr,
    D_HAS_P: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    OP: tl.constexpr = x_ptr.dtype.element_ty
    pid_bch = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_p = tl.program_id(2)
    hi = pid_bch % nheads
    bc = pid_bch // nheads
    ci = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    gi = hi // heads_per_group
    t0 = ci * chunk_size
    nval = tl.minimum(chunk_size, seqlen - t0)
    t0 = t0.to(tl.int64)
    x_base = x_ptr + _base3(bi, s_xb, t0, s_xl, hi, s_xh)
    dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
    b_base = B_ptr + _base3(bi, s_bb, t0, s_bl, gi, s_bg)
    c_base = C_ptr + _base3(bi, s_cb, t0, s_cl, gi, s_cg)
    y_base = y_ptr + ((bi * seqlen + t0) * nheads + hi) * headdim
    dacs_base = dacs_ptr + ((bi * nheads + hi) * nchunks + ci) * chunk_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    mval = offs_m < nval
    a_m = tl.load(dacs_base + offs_m, mask=offs_m < chunk_size, other=0.0)

    # Off-diagonal: exp(a_m) * C_m @ S^T, S (p, n) loaded as (n, p).
    c_m = tl.load(
        c_base + offs_m[:, None] * s_cl + offs_n[None, :] * s_cn,
        mask=mval[:, None] & nmask[None, :],
        other=0.0,
    ).to(OP)  # (M, N)
    s_base = states_ptr + ((bi * nchunks + ci) * nheads + hi) * headdim * dstate
    s = tl.load(
        s_base + offs_p[None, :] * dstate + offs_n[:, None],
        mask=pmask[None, :] & nmask[:, None],
        other=0.0,
    )  # (N, P)
    acc = tl.dot(c_m, s.to(OP), input_precision=PREC) * tl.exp(a_m)[:, None]

    # Diagonal block: causal (C_m . B_k) exp(a_m - a_k) dt_k x_k, k <= m.
    k_end = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    for k0 in range(0, k_end, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        kval = offs_k < nval
        bt = tl.load(
            b_base + offs_k[None, :] * s_bl + offs_n[:, None] * s_bn,
            mask=kval[None, :] & nmask[:, None],
            other=0.0,
        ).to(OP)  # (N, K)
        a_k = tl.load(dacs_base + offs_k, mask=offs_k < chunk_size, other=0.0)
        dt_k = tl.load(dt_base + offs_k * s_dl, mask=kval, other=0.0).to(tl.float32)
        causal = (offs_m[:, None] >= offs_k[None, :]) & kval[None, :]
        decay = tl.exp(tl.where(causal, a_m[:, None] - a_k[None, :], float("-inf")))
        scores = tl.dot(c_m, bt, input_precision=PREC) * decay * dt_k[None, :]
        xk = tl.load(
            x_base + offs_k[:, None] * s_xl + offs_p[None, :] * s_xp,
            mask=kval[:, None] & pmask[None, :],
            other=0.0,
        ).to(OP)  # (K, P)
        acc += tl.dot(scores.to(OP), xk, input_precision=PREC)

    iomask = mval[:, None] & pmask[None, :]
    if HAS_D:
        xm = tl.load(
            x_base + offs_m[:, None] * s_xl + offs_p[None, :] * s_xp, mask=iomask, other=0.0
        ).to(tl.float32)
        if D_HAS_P:
            d = tl.load(D_ptr + hi * headdim + offs_p, mask=pmask, other=0.0).to(tl.float32)
            acc += d[None, :] * xm
        else:
            acc += tl.load(D_ptr + hi).to(tl.float32) * xm
    y_off = offs_m[:, None] * (nheads * headdim) + offs_p[None, :]
    tl.store(y_base + y_off, acc.to(y_ptr.dtype.element_ty), mask=iomask)


@triton.jit
def _state_passing_bwd(
    dsl_ptr,  # (b, c, h, p*n): sum_i exp(a_i) dy_i (outer) C_i
    states_ptr,  # (b, c, h, p*n): state entering each chunk
    final_ptr,  # (b, h, p*n)
    dacs_ptr,  # (b, h, c, L)
    dfinal_ptr,  # (b, h, p*n)
    dcs_ptr,  # out (b, c, h, p*n): gradient of each chunk's own state (may alias dsl_ptr)
    dinit_ptr,  # out (b, h, p*n) float32
    dalast_ptr,  # out (b, h, c, nblocks): partial <dS_{c+1}, S_{c+1}>
    nheads,
    nchunks,
    chunk_size,
    dim,
    nblocks,
    HAS_DFINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1)
    hi = pid_bh % nheads
    bi = pid_bh // nheads
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    m = offs < dim
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + pid_bh * dim + offs, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    s_next = tl.load(final_ptr + pid_bh * dim + offs, mask=m, other=0.0)
    for i in range(nchunks):
        ci = nchunks - 1 - i
        base = ((bi * nchunks + ci) * nheads + hi) * dim
        dsl = tl.load(dsl_ptr + base + offs, mask=m, other=0.0)  # read before the store:
        tl.store(dcs_ptr + base + offs, g, mask=m)  # dcs may alias dsl (in place)
        tl.store(dalast_ptr + (pid_bh * nchunks + ci) * nblocks + pid_e, tl.sum(g * s_next))
        a_last = tl.load(dacs_ptr + (pid_bh * nchunks + ci) * chunk_size + chunk_size - 1)
        g = dsl + tl.exp(a_last) * g
        s_next = tl.load(states_ptr + base + offs, mask=m, other=0.0)
    tl.store(dinit_ptr + pid_bh * dim + offs, g, mask=m)


@triton.jit
def _chunk_scan_bwd_dx(
    x_ptr,  # (b, l, h, p), strides s_xb, s_xl, s_xh, s_xp
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    dacs_ptr,  # (b, h, c, L)
    B_ptr,  # (b, l, g, n), strides s_bb, s_bl, s_bg, s_bn
    C_ptr,  # (b, l, g, n), strides s_cb, s_cl, s_cg, s_cn
    dcs_ptr,  # (b, c, h, p, n)
    D_ptr,  # (h,) or (h, p)
    dy_ptr,  # (b, l, h, p), strides s_yb, s_yl, s_yh, s_yp
    dx_ptr,  # out (b, l, h, p), contiguous
    ddt_ptr,  # out (np, b, h, c, L) float32: direct part of ddt, one slice per p block
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    nchunks,
    chunk_size,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_db,
    s_dl,
    s_dh,
    s_bb,
    s_bl,
    s_bg,
    s_bn,
    s_cb,
    s_cl,
    s_cg,
    s_cn,
    s_yb,
    s_yl,
    s_yh,
    s_yp,
    HAS_D: tl.constexpr,
    D_HAS_P: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    OP: tl.constexpr = x_ptr.dtype.element_ty
    pid_bch = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_p = tl.program_id(2)
    hi = pid_bch % nheads
    bc = pid_bch // nheads
    ci = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    gi = hi // heads_per_group
    t0 = ci * chunk_size
    nval = tl.minimum(chunk_size, seqlen - t0)
    t0 = t0.to(tl.int64)
    x_base = x_ptr + _base3(bi, s_xb, t0, s_xl, hi, s_xh)
    dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
    b_base = B_ptr + _base3(bi, s_bb, t0, s_bl, gi, s_bg)
    c_base = C_ptr + _base3(bi, s_cb, t0, s_cl, gi, s_cg)
    dy_base = dy_ptr + _base3(bi, s_yb, t0, s_yl, hi, s_yh)
    dx_base = dx_ptr + ((bi * seqlen + t0) * nheads + hi) * headdim
    dacs_off = ((bi * nheads + hi) * nchunks + ci) * chunk_size
    dacs_base = dacs_ptr + dacs_off
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    jval = offs_j < nval
    a_j = tl.load(dacs_base + offs_j, mask=offs_j < chunk_size, other=0.0)
    a_last = tl.load(dacs_base + chunk_size - 1)

    b_j = tl.load(
        b_base + offs_j[:, None] * s_bl + offs_n[None, :] * s_bn,
        mask=jval[:, None] & nmask[None, :],
        other=0.0,
    ).to(OP)  # (J, N)
    dcs_base = dcs_ptr + ((bi * nchunks + ci) * nheads + hi) * headdim * dstate
    dcs_t = tl.load(
        dcs_base + offs_p[None, :] * dstate + offs_n[:, None],
        mask=pmask[None, :] & nmask[:, None],
        other=0.0,
    )  # (N, P)
    acc = tl.dot(b_j, dcs_t.to(OP), input_precision=PREC) * tl.exp(a_last - a_j)[:, None]

    for i0 in range(pid_j * BLOCK_M, chunk_size, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)
        ival = offs_i < nval
        c_t = tl.load(
            c_base + offs_i[None, :] * s_cl + offs_n[:, None] * s_cn,
            mask=ival[None, :] & nmask[:, None],
            other=0.0,
        ).to(OP)  # (N, I)
        a_i = tl.load(dacs_base + offs_i, mask=offs_i < chunk_size, other=0.0)
        causal = (offs_i[None, :] >= offs_j[:, None]) & ival[None, :]
        decay = tl.exp(tl.where(causal, a_i[None, :] - a_j[:, None], float("-inf")))
        scores = tl.dot(b_j, c_t, input_precision=PREC) * decay  # (J, I)
        dy_i = tl.load(
            dy_base + offs_i[:, None] * s_yl + offs_p[None, :] * s_yp,
            mask=ival[:, None] & pmask[None, :],
            other=0.0,
        ).to(OP)  # (I, P)
        acc += tl.dot(scores.to(OP), dy_i, input_precision=PREC)

    iomask = jval[:, None] & pmask[None, :]
    x_j = tl.load(
        x_base + offs_j[:, None] * s_xl + offs_p[None, :] * s_xp, mask=iomask, other=0.0
    ).to(tl.float32)
    dt_j = tl.load(dt_base + offs_j * s_dl, mask=jval, other=0.0).to(tl.float32)
    dx = acc * dt_j[:, None]
    if HAS_D:
        dy_j = tl.load(
            dy_base + offs_j[:, None] * s_yl + offs_p[None, :] * s_yp, mask=iomask, other=0.0
        ).to(tl.float32)
        if D_HAS_P:
            d = tl.load(D_ptr + hi * headdim + offs_p, mask=pmask, other=0.0).to(tl.float32)
            dx += d[None, :] * dy_j
        else:
            dx += tl.load(D_ptr + hi).to(tl.float32) * dy_j
    dx_off = offs_j[:, None] * (nheads * headdim) + offs_p[None, :]
    tl.store(dx_base + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=iomask)
    ddt = tl.where(jval, tl.sum(acc * x_j, axis=1), 0.0)
    nslice = tl.num_programs(0).to(tl.int64) * chunk_size  # b * c * h * L
    ddt_base = ddt_ptr + pid_p.to(tl.int64) * nslice + dacs_off
    tl.store(ddt_base + offs_j, ddt, mask=offs_j < chunk_size)


@triton.jit
def _chunk_scan_bwd_dc(
    x_ptr,  # (b, l, h, p), strides s_xb, s_xl, s_xh, s_xp
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    dacs_ptr,  # (b, h, c, L)
    B_ptr,  # (b, l, g, n), strides s_bb, s_bl, s_bg, s_bn
    C_ptr,  # (b, l, g, n), strides s_cb, s_cl, s_cg, s_cn
    states_ptr,  # (b, c, h, p, n)
    dy_ptr,  # (b, l, h, p), strides s_yb, s_yl, s_yh, s_yp
    dc_ptr,  # out (b, l, h // HEADS, n) float32: dC summed over each program's HEADS heads
    da_ptr,  # out (b, h, c, L) float32: dC_i . C_i per head
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    nchunks,
    chunk_size,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_db,
    s_dl,
    s_dh,
    s_bb,
    s_bl,
    s_bg,
    s_bn,
    s_cb,
    s_cl,
    s_cg,
    s_cn,
    s_yb,
    s_yl,
    s_yh,
    s_yp,
    HEADS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (b * c * h // HEADS, cdiv(L, BLOCK_M)): rows i of one chunk for HEADS consecutive
    heads of one group, whose dC contributions are summed here (the group sum is finished by
    the launcher over h // HEADS slices, not over h)."""
    OP: tl.constexpr = x_ptr.dtype.element_ty
    pid_bcq = tl.program_id(0)
    pid_i = tl.program_id(1)
    nq = nheads // HEADS
    q = pid_bcq % nq
    bc = pid_bcq // nq
    ci = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    h0 = q * HEADS
    gi = h0 // heads_per_group
    t0 = ci * chunk_size
    nval = tl.minimum(chunk_size, seqlen - t0)
    t0 = t0.to(tl.int64)
    b_base = B_ptr + _base3(bi, s_bb, t0, s_bl, gi, s_bg)
    c_base = C_ptr + _base3(bi, s_cb, t0, s_cl, gi, s_cg)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < dstate
    ival = offs_i < nval
    j_end = tl.minimum((pid_i + 1) * BLOCK_M, chunk_size)

    # One accumulator for the HEADS heads; each head's d a_i = dC_h,i . C_i is the change of
    # rowsum(acc * C_i) over that head.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    before = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for hh in range(HEADS):
        hi = h0 + hh
        x_base = x_ptr + _base3(bi, s_xb, t0, s_xl, hi, s_xh)
        dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
        dy_base = dy_ptr + _base3(bi, s_yb, t0, s_yl, hi, s_yh)
        dacs_off = ((bi * nheads + hi) * nchunks + ci) * chunk_size
        dacs_base = dacs_ptr + dacs_off
        s_base = states_ptr + ((bi * nchunks + ci) * nheads + hi) * headdim * dstate
        a_i = tl.load(dacs_base + offs_i, mask=offs_i < chunk_size, other=0.0)
        decay_i = tl.exp(a_i)
        # The head dim is a contraction here: tile it (one pass when headdim <= BLOCK_P).
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < headdim
            dy_i = tl.load(
                dy_base + offs_i[:, None] * s_yl + offs_p[None, :] * s_yp,
                mask=ival[:, None] & pmask[None, :],
                other=0.0,
            ).to(OP)  # (I, P)
            s = tl.load(
                s_base + offs_p[:, None] * dstate + offs_n[None, :],
                mask=pmask[:, None] & nmask[None, :],
                other=0.0,
            )  # (P, N)
            acc += tl.dot(dy_i, s.to(OP), input_precision=PREC) * decay_i[:, None]
            for j0 in range(0, j_end, BLOCK_M):
                offs_j = j0 + tl.arange(0, BLOCK_M)
                jval = offs_j < nval
                x_t = tl.load(
                    x_base + offs_j[None, :] * s_xl + offs_p[:, None] * s_xp,
                    mask=jval[None, :] & pmask[:, None],
                    other=0.0,
                ).to(OP)  # (P, J)
                a_j = tl.load(dacs_base + offs_j, mask=offs_j < chunk_size, other=0.0)
                dt_j = tl.load(dt_base + offs_j * s_dl, mask=jval, other=0.0).to(tl.float32)
                causal = (offs_i[:, None] >= offs_j[None, :]) & jval[None, :]
                decay = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf")))
                scores = tl.dot(dy_i, x_t, input_precision=PREC) * decay * dt_j[None, :]
                b_j = tl.load(
                    b_base + offs_j[:, None] * s_bl + offs_n[None, :] * s_bn,
                    mask=jval[:, None] & nmask[None, :],
                    other=0.0,
                ).to(OP)  # (J, N)
                acc += tl.dot(scores.to(OP), b_j, input_precision=PREC)
        c_i = tl.load(
            c_base + offs_i[:, None] * s_cl + offs_n[None, :] * s_cn,
            mask=ival[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)  # (I, N), reloaded per head (cache hits) rather than held
        after = tl.sum(acc * c_i, axis=1)
        tl.store(da_ptr + dacs_off + offs_i, tl.where(ival, after - before, 0.0),
                 mask=offs_i < chunk_size)  # fmt: skip
        before = after

    dc_base = dc_ptr + ((bi * seqlen + t0) * nq + q) * dstate
    tl.store(
        dc_base + offs_i[:, None] * (nq * dstate) + offs_n[None, :],
        acc,
        mask=ival[:, None] & nmask[None, :],
    )


@triton.jit
def _chunk_scan_bwd_db(
    x_ptr,  # (b, l, h, p), strides s_xb, s_xl, s_xh, s_xp
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    dacs_ptr,  # (b, h, c, L)
    B_ptr,  # (b, l, g, n), strides s_bb, s_bl, s_bg, s_bn
    C_ptr,  # (b, l, g, n), strides s_cb, s_cl, s_cg, s_cn
    dcs_ptr,  # (b, c, h, p, n)
    dy_ptr,  # (b, l, h, p), strides s_yb, s_yl, s_yh, s_yp
    db_ptr,  # out (b, l, h // HEADS, n) float32: dB summed over each program's HEADS heads
    da_ptr,  # out (b, h, c, L) float32: dB_j . B_j per head
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    nchunks,
    chunk_size,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_db,
    s_dl,
    s_dh,
    s_bb,
    s_bl,
    s_bg,
    s_bn,
    s_cb,
    s_cl,
    s_cg,
    s_cn,
    s_yb,
    s_yl,
    s_yh,
    s_yp,
    HEADS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (b * c * h // HEADS, cdiv(L, BLOCK_M)), as :func:`_chunk_scan_bwd_dc` for dB."""
    OP: tl.constexpr = x_ptr.dtype.element_ty
    pid_bcq = tl.program_id(0)
    pid_j = tl.program_id(1)
    nq = nheads // HEADS
    q = pid_bcq % nq
    bc = pid_bcq // nq
    ci = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    h0 = q * HEADS
    gi = h0 // heads_per_group
    t0 = ci * chunk_size
    nval = tl.minimum(chunk_size, seqlen - t0)
    t0 = t0.to(tl.int64)
    b_base = B_ptr + _base3(bi, s_bb, t0, s_bl, gi, s_bg)
    c_base = C_ptr + _base3(bi, s_cb, t0, s_cl, gi, s_cg)
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < dstate
    jval = offs_j < nval

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    before = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for hh in range(HEADS):
        hi = h0 + hh
        x_base = x_ptr + _base3(bi, s_xb, t0, s_xl, hi, s_xh)
        dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
        dy_base = dy_ptr + _base3(bi, s_yb, t0, s_yl, hi, s_yh)
        dacs_off = ((bi * nheads + hi) * nchunks + ci) * chunk_size
        dacs_base = dacs_ptr + dacs_off
        dcs_base = dcs_ptr + ((bi * nchunks + ci) * nheads + hi) * headdim * dstate
        a_j = tl.load(dacs_base + offs_j, mask=offs_j < chunk_size, other=0.0)
        a_last = tl.load(dacs_base + chunk_size - 1)
        # dB_j = dt_j * (...): dt_j scales the rows of this head's terms before they are summed.
        dt_j = tl.load(dt_base + offs_j * s_dl, mask=jval, other=0.0).to(tl.float32)
        w_j = tl.exp(a_last - a_j) * dt_j
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < headdim
            x_j = tl.load(
                x_base + offs_j[:, None] * s_xl + offs_p[None, :] * s_xp,
                mask=jval[:, None] & pmask[None, :],
                other=0.0,
            ).to(OP)  # (J, P)
            dcs = tl.load(
                dcs_base + offs_p[:, None] * dstate + offs_n[None, :],
                mask=pmask[:, None] & nmask[None, :],
                other=0.0,
            )  # (P, N)
            acc += tl.dot(x_j, dcs.to(OP), input_precision=PREC) * w_j[:, None]
            for i0 in range(pid_j * BLOCK_M, chunk_size, BLOCK_M):
                offs_i = i0 + tl.arange(0, BLOCK_M)
                ival = offs_i < nval
                dy_t = tl.load(
                    dy_base + offs_i[None, :] * s_yl + offs_p[:, None] * s_yp,
                    mask=ival[None, :] & pmask[:, None],
                    other=0.0,
                ).to(OP)  # (P, I)
                a_i = tl.load(dacs_base + offs_i, mask=offs_i < chunk_size, other=0.0)
                causal = (offs_i[None, :] >= offs_j[:, None]) & ival[None, :]
                decay = tl.exp(tl.where(causal, a_i[None, :] - a_j[:, None], float("-inf")))
                scores = tl.dot(x_j, dy_t, input_precision=PREC) * decay * dt_j[:, None]
                c_i = tl.load(
                    c_base + offs_i[:, None] * s_cl + offs_n[None, :] * s_cn,
                    mask=ival[:, None] & nmask[None, :],
                    other=0.0,
                ).to(OP)  # (I, N)
                acc += tl.dot(scores.to(OP), c_i, input_precision=PREC)
        b_j = tl.load(
            b_base + offs_j[:, None] * s_bl + offs_n[None, :] * s_bn,
            mask=jval[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)  # (J, N), reloaded per head (cache hits) rather than held
        after = tl.sum(acc * b_j, axis=1)
        tl.store(da_ptr + dacs_off + offs_j, tl.where(jval, after - before, 0.0),
                 mask=offs_j < chunk_size)  # fmt: skip
        before = after

    db_base = db_ptr + ((bi * seqlen + t0) * nq + q) * dstate
    tl.store(
        db_base + offs_j[:, None] * (nq * dstate) + offs_n[None, :],
        acc,
        mask=jval[:, None] & nmask[None, :],
    )


@triton.jit
def _chunk_cumsum_bwd(
    dt_ptr,  # (b, l, h), strides s_db, s_dl, s_dh
    A_ptr,  # (h,)
    da_c_ptr,  # (b, h, c, L): dC . C
    da_b_ptr,  # (b, h, c, L): dB . B
    dalast_ptr,  # (b, h, c): <dS_{c+1}, S_{c+1}>
    ddt_direct_ptr,  # (b, h, c, L)
    ddt_ptr,  # out (b, l, h) float32, contiguous
    dA_ptr,  # out (b, h, c) float32: partial sums of dA
    seqlen,
    nheads,
    nchunks,
    chunk_size,
    s_db,
    s_dl,
    s_dh,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)  # over (b, h, c)
    ci = pid % nchunks
    bh = pid // nchunks
    hi = bh % nheads
    bi = (bh // nheads).to(tl.int64)
    bh = bh.to(tl.int64)
    t0 = ci * chunk_size
    offs = tl.arange(0, BLOCK_L)
    lmask = offs < chunk_size
    valid = lmask & (offs < seqlen - t0)
    t0 = t0.to(tl.int64)
    base = (bh * nchunks + ci) * chunk_size + offs
    da = tl.load(da_c_ptr + base, mask=lmask, other=0.0) - tl.load(
        da_b_ptr + base, mask=lmask, other=0.0
    )
    # d(dA_m) = sum_{k >= m} d a_k, plus the chunk-end term, which reaches every step.
    dda = tl.cumsum(da, axis=0, reverse=True) + tl.load(dalast_ptr + bh * nchunks + ci)
    dt_base = dt_ptr + _base3(bi, s_db, t0, s_dl, hi, s_dh)
    dt = tl.load(dt_base + offs * s_dl, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    ddt = tl.load(ddt_direct_ptr + base, mask=lmask, other=0.0) + a * dda
    tl.store(ddt_ptr + (bi * seqlen + t0) * nheads + hi + offs * nheads, ddt, mask=valid)
    tl.store(dA_ptr + bh * nchunks + ci, tl.sum(tl.where(valid, dt * dda, 0.0), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

#: Environment switch of the float32 matmul precision on GPU: ``tf32`` (default, tensor cores)
#: or ``ieee`` (exact fp32 FMA, no tensor cores; the GPU tests set it to compare at 1e-5).
FP32_PRECISION_ENV = "ILM_KERNELS_FP32_PRECISION"


def fp32_precision() -> str:
    """The float32 dot precision in force: ``"tf32"`` unless ``ILM_KERNELS_FP32_PRECISION``."""
    value = os.environ.get(FP32_PRECISION_ENV, "tf32").strip().lower() or "tf32"
    if value not in ("tf32", "ieee"):
        raise ValueError(f"{FP32_PRECISION_ENV}={value!r}: choose 'tf32' or 'ieee'")
    return value


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(v))


def _precision(*tensors: Tensor | None) -> str:
    """Dot precision: :func:`fp32_precision` for float32 inputs; half precision ignores it."""
    wide = all(t is None or t.dtype in (torch.float32, torch.float64) for t in tensors)
    return fp32_precision() if wide else "tf32"


#: ``ILM_KERNELS_AUTOTUNE=1``: the chunk-scan kernels autotune num_warps x num_stages per
#: shape (:data:`TUNE_KEY` and the dtypes) on the GPU, instead of the pinned configurations.
AUTOTUNE_ENV = "ILM_KERNELS_AUTOTUNE"
TUNE_KEY = ["headdim", "dstate", "chunk_size", "heads_per_group"]
TUNE_SPACE = [(w, s) for w in (4, 8) for s in (1, 2, 3)]  # (num_warps, num_stages)
_TUNED: dict[str, object] = {}


def autotune_enabled() -> bool:
    """True under ``ILM_KERNELS_AUTOTUNE=1`` on compiled kernels (the interpreter never tunes)."""
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and not triton_interpreter()


def _launch(fn: object, opts: dict[str, int]) -> tuple[object, dict[str, int]]:
    """(kernel, launch options): by default ``fn`` with its pinned options (deterministic,
    what the tests and ``tools/kernel_report.py`` check); under :func:`autotune_enabled` the
    kernel wrapped in ``triton.autotune`` over :data:`TUNE_SPACE`, keyed on the shape. Every
    tuned kernel rewrites all of its outputs, so the tuning runs are harmless."""
    if not autotune_enabled():
        return fn, opts
    name = fn.__name__  # type: ignore[attr-defined]
    if name not in _TUNED:
        configs = [triton.Config({}, num_warps=w, num_stages=st) for w, st in TUNE_SPACE]
        _TUNED[name] = triton.autotune(configs=configs, key=TUNE_KEY)(fn)
    return _TUNED[name], {}


def _heads_per_program(dims: _Dims, programs: int) -> int:
    """Heads of one group each dB/dC program sums (a power of two dividing heads_per_group).

    ``programs``: the grid size at one head per program. As many heads as keep at least ~1024
    programs on the GPU (8 at most: the loop over heads is
    serial); the whole group in the interpreter. The per-head buffers of dB and dC
    (b, l, h, n) fp32 -- 2 x 1.07 GB per layer at b8/l4096/h64/n128 -- shrink by this factor.
    """
    hpg = dims.heads_per_group
    if triton_interpreter():
        return hpg
    heads = 1
    while heads < 8 and hpg % (2 * heads) == 0 and programs // (2 * heads) >= 1024:
        heads *= 2
    return heads


def _block_m(chunk_size: int) -> int:
    """Rows per tile inside a chunk: whole chunk in the interpreter (fewer programs)."""
    if triton_interpreter():
        return _pow2(chunk_size)
    return min(64, _pow2(chunk_size))


class _Dims:
    """Sizes of one SSD problem, with the chunk length clamped to the sequence length."""

    def __init__(self, x: Tensor, B: Tensor, chunk_size: int) -> None:
        self.batch, self.seqlen, self.nheads, self.headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if self.seqlen == 0:
            raise ValueError("ssd_scan needs a sequence length of at least 1")
        if self.ngroups <= 0 or self.nheads % self.ngroups != 0:
            raise ValueError(
                f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})"
            )
        self.heads_per_group = self.nheads // self.ngroups
        self.chunk_size = min(chunk_size, self.seqlen)
        self.nchunks = triton.cdiv(self.seqlen, self.chunk_size)
        self.block_m = _block_m(self.chunk_size)
        self.block_l = _pow2(self.chunk_size)
        self.block_n = _pow2(self.dstate)
        # Head-dim tile of the backward (a grid axis of dx, a contraction loop of dB/dC).
        full_p = _pow2(self.headdim)
        self.block_p = full_p if triton_interpreter() else min(full_p, 64)
        self.scan_opts: dict[str, int] = {}  # _chunk_scan_fwd, _chunk_scan_bwd_dx
        self.grad_opts: dict[str, int] = {}  # _chunk_scan_bwd_dc, _chunk_scan_bwd_db
        self.grad_block_m = self.block_m
        if not triton_interpreter():
            if self.block_n > 128:
                # Whole-d_state tiles of C, B and the states fit registers and shared memory
                # with 32 rows (fp32 at d_state 256 needs 241 KB at 64 rows; the limit is
                # 227 KB, and the dB/dC accumulators spill at 64 rows).
                self.block_m = min(self.block_m, 32)
            # Pinned launch configurations of the chunk-scan kernels, chosen from their sm_90a
            # build (tools/kernel_report.py, docs/kernels.md): no spills at d_state 128 and
            # 256 in fp32, fp16 and bf16. Two pipeline stages for 16-bit inputs; 64-row fp32
            # tiles are twice as large and spill with two, and so do the fp32 dB/dC kernels.
            half = x.element_size() <= 2
            warps = 8 if self.block_m * self.block_n >= 8192 else 4
            self.scan_opts = {
                "num_warps": warps,
                "num_stages": 2 if half or self.block_m < 64 else 1,
            }
            # dB/dC loop over several heads with one accumulator: one stage for 16-bit, and
            # 32-row fp32 tiles.
            self.grad_block_m = self.block_m if half else min(self.block_m, 32)
            gwarps = 8 if self.grad_block_m * self.block_n >= 4096 else 4
            self.grad_opts = {"num_warps": gwarps, "num_stages": 1 if half else 2}

    def common(self) -> tuple[int, ...]:
        """(seqlen, nheads, heads_per_group, headdim, dstate, nchunks, chunk_size)."""
        return (
            self.seqlen,
            self.nheads,
            self.heads_per_group,
            self.headdim,
            self.dstate,
            self.nchunks,
            self.chunk_size,
        )


def _check_shapes(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    initial_states: Tensor | None,
) -> None:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"dt must be {(b, l, h)} and A {(h,)}; got {dt.shape}, {A.shape}")
    if B.shape != (b, l, g, n) or C.shape != B.shape:
        raise ValueError(f"B and C must be (b, l, g, n) alike; got {B.shape}, {C.shape}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be {(h,)} or {(h, p)}, got {tuple(D.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must be {(b, h, p, n)}, got {initial_states.shape}")


def _states_fwd(
    dims: _Dims,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    initial_states: Tensor | None,
    prec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernels 1-3: returns dA_cumsum (b, h, c, L), states (b, c, h, p, n), final (b, h, p, n)."""
    d, dev = dims, x.device
    f32 = torch.float32
    dacs = _empty(d.batch, d.nheads, d.nchunks, d.chunk_size, dtype=f32, device=dev)
    _chunk_cumsum_fwd[(d.batch * d.nheads * d.nchunks,)](
        dt, A, dacs, d.seqlen, d.nheads, d.nchunks, d.chunk_size, *dt.stride(),
        BLOCK_L=d.block_l,
    )  # fmt: skip
    shape = (d.batch, d.nchunks, d.nheads, d.headdim, d.dstate)
    cs = _empty(*shape, dtype=f32, device=dev)
    bp, bn = min(_pow2(d.headdim), 64), min(d.block_n, 64)
    grid = (d.batch * d.nchunks * d.nheads, triton.cdiv(d.headdim, bp), triton.cdiv(d.dstate, bn))
    _chunk_state[grid](
        x, B, dt, dacs, cs, *d.common(), *x.stride(), *B.stride(), *dt.stride(),
        MODE=0, PREC=prec, BLOCK_K=d.block_m, BLOCK_P=bp, BLOCK_N=bn,
    )  # fmt: skip
    states = cs  # overwritten in place: chunk c's own state is read before S_c is stored
    final = _empty(d.batch, d.nheads, d.headdim, d.dstate, dtype=f32, device=dev)
    dim = d.headdim * d.dstate
    block = min(1024, triton.next_power_of_2(dim))
    _state_passing_fwd[(d.batch * d.nheads, triton.cdiv(dim, block))](
        cs, dacs, x if initial_states is None else initial_states, states, final,
        d.nheads, d.nchunks, d.chunk_size, dim,
        HAS_INIT=initial_states is not None, BLOCK=block,
    )  # fmt: skip
    return dacs, states, final


def _small(*tensors: Tensor | None) -> list[Tensor | None]:
    """Contiguous copies of the small per-head tensors (A, D, initial states, dfinal).

    x, dt, B, C and dy are read through their strides and never copied.
    """
    return [None if t is None else t.contiguous() for t in tensors]


def ssd_triton_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward SSD scan with the Triton kernels; allocates only y, the final state, scratch.

    Args:
        x: (b, l, h, p); dt: (b, l, h) positive; A: (h,); B, C: (b, l, g, n) (any strides:
        views of a larger tensor are read in place); chunk_size: chunk length (clamped to l);
        D: (h,) or (h, p) or None; initial_states: (b, h, p, n) or None.

    Returns:
        y (b, l, h, p) contiguous in ``x.dtype`` and final_states (b, h, p, n) in float32.
    """
    _check_shapes(x, dt, A, B, C, D, initial_states)
    A, D, initial_states = _small(A, D, initial_states)
    dims = _Dims(x, B, chunk_size)
    prec = _precision(x, dt, B, C)
    dacs, states, final = _states_fwd(dims, x, dt, A, B, initial_states, prec)
    d = dims
    y = _empty(*x.shape, dtype=x.dtype, device=x.device)
    bp = min(_pow2(d.headdim), 64)
    grid = (d.batch * d.nchunks * d.nheads, triton.cdiv(d.chunk_size, d.block_m),
            triton.cdiv(d.headdim, bp))  # fmt: skip
    kernel, opts = _launch(_chunk_scan_fwd, d.scan_opts)
    kernel[grid](
        x, dt, dacs, B, C, states, x if D is None else D, y, *d.common(),
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, D_HAS_P=D is not None and D.dim() == 2, PREC=prec,
        BLOCK_M=d.block_m, BLOCK_P=bp, BLOCK_N=d.block_n, **opts,
    )  # fmt: skip
    return y, final


def ssd_triton_bwd(
    dy: Tensor,
    dfinal: Tensor | None,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backward SSD scan; recomputes the forward's chunk states instead of saving them.

    Args:
        dy: (b, l, h, p) gradient of y (any strides); dfinal: (b, h, p, n) gradient of the
        final state or None; the other arguments as in :func:`ssd_triton_fwd`.

    Returns:
        dx (b, l, h, p), ddt (b, l, h), dA (h,), dB (b, l, g, n), dC (b, l, g, n),
        dD (shape of D, or None), d_initial_states ((b, h, p, n), or None), each in the dtype
        of its input.
    """
    A, D, initial_states, dfinal = _small(A, D, initial_states, dfinal)
    dims = _Dims(x, B, chunk_size)
    d, dev, f32 = dims, x.device, torch.float32
    prec = _precision(x, dt, B, C, dy)
    dacs, states, final = _states_fwd(dims, x, dt, A, B, initial_states, prec)
    shape = (d.batch, d.nchunks, d.nheads, d.headdim, d.dstate)
    bch = d.batch * d.nchunks * d.nheads

    # 5. Gradient of the chunk-entry states from y, then reverse state passing.
    dsl = _empty(*shape, dtype=f32, device=dev)
    bp, bn = min(_pow2(d.headdim), 64), min(d.block_n, 64)
    grid = (bch, triton.cdiv(d.headdim, bp), triton.cdiv(d.dstate, bn))
    _chunk_state[grid](
        dy, C, dt, dacs, dsl, *d.common(), *dy.stride(), *C.stride(), *dt.stride(),
        MODE=1, PREC=prec, BLOCK_K=d.block_m, BLOCK_P=bp, BLOCK_N=bn,
    )  # fmt: skip
    dcs = dsl  # overwritten in place, like the forward states
    dinit = _empty(d.batch, d.nheads, d.headdim, d.dstate, dtype=f32, device=dev)
    dim = d.headdim * d.dstate
    block = min(1024, triton.next_power_of_2(dim))
    nblocks = triton.cdiv(dim, block)
    dalast = _empty(d.batch, d.nheads, d.nchunks, nblocks, dtype=f32, device=dev)
    _state_passing_bwd[(d.batch * d.nheads, nblocks)](
        dsl, states, final, dacs, dy if dfinal is None else dfinal, dcs, dinit, dalast,
        d.nheads, d.nchunks, d.chunk_size, dim, nblocks,
        HAS_DFINAL=dfinal is not None, BLOCK=block,
    )  # fmt: skip

    # 6-7. dx and ddt (direct), dC and dB per head with their d(dA_cumsum) parts.
    nm = triton.cdiv(d.chunk_size, d.block_m)
    n_p = triton.cdiv(d.headdim, d.block_p)
    blocks = {"BLOCK_M": d.block_m, "BLOCK_P": d.block_p, "BLOCK_N": d.block_n}
    strides = (*x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride())
    dx = _empty(*x.shape, dtype=x.dtype, device=dev)
    ddt_parts = _empty(n_p, *dacs.shape, dtype=f32, device=dev)
    kernel, opts = _launch(_chunk_scan_bwd_dx, d.scan_opts)
    kernel[(bch, nm, n_p)](
        x, dt, dacs, B, C, dcs, x if D is None else D, dy, dx, ddt_parts, *d.common(), *strides,
        HAS_D=D is not None, D_HAS_P=D is not None and D.dim() == 2, PREC=prec, **blocks,
        **opts,
    )  # fmt: skip
    ddt_direct = ddt_parts[0] if n_p == 1 else ddt_parts.sum(0)
    # dB and dC come out summed over `heads` consecutive heads of a group (in the kernel);
    # the rest of the group sum is over h // heads slices.
    nm_g = triton.cdiv(d.chunk_size, d.grad_block_m)
    heads = _heads_per_program(d, bch * nm_g)
    nq = d.nheads // heads
    qshape = (d.batch, d.seqlen, nq, d.dstate)
    dC_q = _empty(*qshape, dtype=f32, device=dev)
    da_c = _empty(*dacs.shape, dtype=f32, device=dev)
    grid_q = (d.batch * d.nchunks * nq, nm_g)
    gblocks = {**blocks, "BLOCK_M": d.grad_block_m}
    kernel, opts = _launch(_chunk_scan_bwd_dc, d.grad_opts)
    kernel[grid_q](
        x, dt, dacs, B, C, states, dy, dC_q, da_c, *d.common(), *strides, HEADS=heads,
        PREC=prec, **gblocks, **opts,
    )  # fmt: skip
    dB_q = _empty(*qshape, dtype=f32, device=dev)
    da_b = _empty(*dacs.shape, dtype=f32, device=dev)
    kernel, opts = _launch(_chunk_scan_bwd_db, d.grad_opts)
    kernel[grid_q](
        x, dt, dacs, B, C, dcs, dy, dB_q, da_b, *d.common(), *strides, HEADS=heads,
        PREC=prec, **gblocks, **opts,
    )  # fmt: skip

    # 8. Reverse cumsum of d(dA_cumsum) -> ddt, dA.
    ddt = _empty(d.batch, d.seqlen, d.nheads, dtype=f32, device=dev)
    dA_part = _empty(d.batch, d.nheads, d.nchunks, dtype=f32, device=dev)
    _chunk_cumsum_bwd[(d.batch * d.nheads * d.nchunks,)](
        dt, A, da_c, da_b, dalast.sum(-1).contiguous(), ddt_direct, ddt, dA_part,
        d.seqlen, d.nheads, d.nchunks, d.chunk_size, *dt.stride(), BLOCK_L=d.block_l,
    )  # fmt: skip

    # Small reductions in PyTorch: groups, dA partials, dD.
    gshape = (d.batch, d.seqlen, d.ngroups, d.heads_per_group // heads, d.dstate)
    dB = dB_q.view(gshape).sum(3).to(B.dtype)
    dC = dC_q.view(gshape).sum(3).to(C.dtype)
    dA = dA_part.sum((0, 2)).to(A.dtype)
    dD = None
    if D is not None:
        prod = dy.float() * x.float()
        dD = prod.sum((0, 1)) if D.dim() == 2 else prod.sum((0, 1, 3))
        dD = dD.to(D.dtype)
    d_init = None if initial_states is None else dinit.to(initial_states.dtype)
    return dx, ddt.to(dt.dtype), dA, dB, dC, dD, d_init


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class SSDScanFn(torch.autograd.Function):
    """Autograd wrapper of the Triton SSD scan; saves only the inputs (states are recomputed).

    ``apply(x, dt, A, B, C, D, initial_states, chunk_size)`` returns ``(y, final_states)``:
    y (b, l, h, p) in ``x.dtype``, final_states (b, h, p, n) float32.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        initial_states: Tensor | None,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        y, final = ssd_triton_fwd(x, dt, A, B, C, chunk_size, D, initial_states)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_states)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor | None, dfinal: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, initial_states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        grads = ssd_triton_bwd(dy, dfinal, x, dt, A, B, C, ctx.chunk_size, D, initial_states)
        return (*grads, None)


def ssd_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton SSD scan with the argument convention of ``ssd_scan_reference``.

    When autograd is off or no input requires grad, runs the forward kernels directly: nothing
    is saved and only the outputs (plus transient scratch) are allocated.

    Returns:
        y (b, l, h, p) in ``x.dtype``; and, if ``return_final_states``, final_states
        (b, h, p, n) in float32.
    """
    inputs = (x, dt, A, B, C, D, initial_states)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, final = SSDScanFn.apply(x, dt, A, B, C, D, initial_states, chunk_size)
    else:
        y, final = ssd_triton_fwd(x, dt, A, B, C, chunk_size, D, initial_states)
    if return_final_states:
        return y, final
    return y
