"""PyTorch reference implementation of the Mamba2 state-space-dual (SSD) scan.

Notation (shapes):

* ``b`` batch, ``l`` sequence length, ``h`` heads, ``p`` head dim, ``g`` groups of B/C,
  ``n`` state dim, ``c`` number of chunks, ``L`` chunk length (``chunk_size``).

The recurrence, for every batch ``b`` and head ``h`` (head ``h`` reads group
``h // (nheads // ngroups)`` of ``B`` and ``C``)::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t        # S_t: (p, n)
    y_t = S_t @ C_t + D_h * x_t                                        # y_t: (p,)

Three implementations are provided:

* :func:`ssd_scan_reference` -- the chunked SSD algorithm (quadratic attention-like form
  inside a chunk, linear state passing between chunks). Differentiable; used in training.
* :func:`ssd_naive` -- the plain loop over time; the independent reference for tests.
* :func:`ssd_step` -- one token of the recurrence, for autoregressive decoding.

All of them compute in at least float32 (float64 stays float64). Outputs ``y`` are returned in
the dtype of ``x``; states are returned in the compute dtype (float32 or wider), as mamba-ssm
does, except :func:`ssd_step`, which returns the new state in the dtype of the given state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtype import compute_dtype as _compute_dtype

__all__ = ["segsum", "ssd_naive", "ssd_scan_reference", "ssd_step"]


def _expand_groups(t: Tensor, nheads: int) -> Tensor:
    """Repeat the group dimension (dim -2) of ``t`` (..., g, n) so it becomes (..., h, n).

    Head ``h`` takes group ``h // (nheads // g)``.
    """
    ngroups = t.shape[-2]
    if ngroups <= 0 or nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    return t.repeat_interleave(nheads // ngroups, dim=-2)


def _d_term(D: Tensor | None, x: Tensor) -> Tensor | int:
    """The skip connection ``D * x`` for x (..., h, p) and D (h,) or (h, p); 0 if D is None."""
    if D is None:
        return 0
    D = D.to(x.dtype)
    if D.dim() == 1:
        D = D[:, None]
    return D * x


def segsum(a: Tensor) -> Tensor:
    """Numerically stable segment sum of log-decays along the last dimension.

    Args:
        a: (..., T) log-decays ``dt * A``.

    Returns:
        (..., T, T) tensor ``out`` with ``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for
        ``i >= j`` (0 on the diagonal) and ``-inf`` for ``i < j``, so that ``exp(out)`` is the
        lower-triangular matrix of decays from position ``j`` to position ``i``.

    Instead of the difference of two cumulative sums (which cancels catastrophically for
    long sequences), each column is summed directly: the masked values are zeroed *before* the
    cumulative sum and replaced by ``-inf`` after it.
    """
    T = a.shape[-1]
    # 1. a_rep[..., i, j] = a[..., i]
    a_rep = a[..., :, None].expand(*a.shape, T)
    # 2. keep only the strictly-lower part: entries k > j contribute to column j
    strict_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    a_rep = a_rep.masked_fill(~strict_lower, 0.0)
    # 3. cumulative sum down the rows: out[..., i, j] = sum_{j < k <= i} a[..., k]
    out = torch.cumsum(a_rep, dim=-2)
    # 4. positions above the diagonal are not reachable (causality): log-decay -inf
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_scan_reference(
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
    """Chunked SSD scan (Mamba2), differentiable, for any sequence length.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) positive step sizes (softplus/bias already applied by the caller).
        A: (h,) negative per-head decay rates.
        B: (b, l, g, n) input projections; ``h`` must be a multiple of ``g``.
        C: (b, l, g, n) output projections.
        chunk_size: chunk length ``L`` (> 0). ``l`` need not be a multiple of it.
        D: (h,) or (h, p) skip connection, or None.
        initial_states: (b, h, p, n) state before the first token, or None (zeros).
        return_final_states: also return the state after the last token.

    Returns:
        y: (b, l, h, p) in ``x.dtype``; and, if ``return_final_states``, final_states
        (b, h, p, n) in the compute dtype (float32 or wider).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    chunk_size = max(1, min(chunk_size, seqlen))  # a sequence shorter than a chunk is one chunk
    dstate = B.shape[-1]
    dtype = _compute_dtype(x, dt, A, B, C, D, initial_states)
    out_dtype = x.dtype

    # 1. Compute dtype; expand the B/C groups to heads: (b, l, g, n) -> (b, l, h, n).
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = _expand_groups(B.to(dtype), nheads)
    C = _expand_groups(C.to(dtype), nheads)

    # 2. Pad the length to a multiple of chunk_size. Padded steps have dt = 0 and x = 0, so
    #    they neither decay (exp(0 * A) = 1) nor write to the state; their outputs are sliced off.
    pad = (-seqlen) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size

    # 3. Split into chunks: (b, c*L, ...) -> (b, c, L, ...).
    x = x.reshape(batch, nchunks, chunk_size, nheads, headdim)
    dt = dt.reshape(batch, nchunks, chunk_size, nheads)
    B = B.reshape(batch, nchunks, chunk_size, nheads, dstate)
    C = C.reshape(batch, nchunks, chunk_size, nheads, dstate)

    # 4. Log-decays per step, heads first: dA (b, h, c, L) and their cumsum within each chunk.
    dA = (dt * A).permute(0, 3, 1, 2)
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 5. Intra-chunk (diagonal blocks): quadratic "attention" form
    #    y_l = sum_{s <= l} (C_l . B_s) * exp(dA_{s+1} + ... + dA_l) * dt_s * x_s
    decay = torch.exp(segsum(dA))  # (b, h, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay  # (b, h, c, L, L)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x * dt[..., None])

    # 6. State contributed by each chunk alone (zero state at the chunk start), at its end.
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # (b, h, c, L)
    chunk_states = torch.einsum("bclhn,bhcl,bclh,bclhp->bchpn", B, decay_to_end, dt, x)

    # 7. Inter-chunk recurrence: pass the states across chunk boundaries. Prepend the initial
    #    state, then states_in[z] = sum_{c <= z} exp(total decay of chunks c..z-1) * states[c].
    if initial_states is None:
        initial_states = x.new_zeros(batch, nheads, headdim, dstate)
    states = torch.cat([initial_states.to(dtype)[:, None], chunk_states], dim=1)  # (b, c+1, ...)
    chunk_decay = torch.exp(segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_states = states[:, :-1], states[:, -1]  # state at the start of each chunk

    # 8. Off-diagonal blocks: contribution of the state entering the chunk to each output.
    decay_from_start = torch.exp(dA_cumsum)  # (b, h, c, L)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_from_start)

    # 9. Merge the chunks, drop the padding, add the skip connection D * x.
    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    y = y + _d_term(D, x.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen])
    y = y.to(out_dtype)
    if return_final_states:
        return y, final_states
    return y


def ssd_naive(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Step-by-step SSD recurrence (a Python loop over time); the reference for tests.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) positive step sizes.
        A: (h,) negative per-head decay rates.
        B: (b, l, g, n) input projections; ``h`` must be a multiple of ``g``.
        C: (b, l, g, n) output projections.
        D: (h,) or (h, p) skip connection, or None.
        initial_states: (b, h, p, n) or None (zeros).
        return_final_states: also return the state after the last token.

    Returns:
        y: (b, l, h, p) in ``x.dtype``; and, if ``return_final_states``, final_states
        (b, h, p, n) in the compute dtype (float32 or wider).
    """
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    dtype = _compute_dtype(x, dt, A, B, C, D, initial_states)
    out_dtype = x.dtype

    # 1. Compute dtype; expand the B/C groups to heads.
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = _expand_groups(B.to(dtype), nheads)  # (b, l, h, n)
    C = _expand_groups(C.to(dtype), nheads)

    # 2. Initial state.
    if initial_states is None:
        state = x.new_zeros(batch, nheads, headdim, dstate)
    else:
        state = initial_states.to(dtype)

    # 3. Loop: decay, write x_t (outer) B_t, read with C_t.
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        write = torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        state = decay[:, :, None, None] * state + write
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, nheads, headdim)

    # 4. Skip connection.
    y = (y + _d_term(D, x)).to(out_dtype)
    if return_final_states:
        return y, state
    return y


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the SSD recurrence (decoding). Does not modify ``state`` in place.

    Args:
        state: (b, h, p, n) state after the previous token.
        x: (b, h, p) input of the current token.
        dt: (b, h) positive step sizes.
        A: (h,) negative per-head decay rates.
        B: (b, g, n) input projection; ``h`` must be a multiple of ``g``.
        C: (b, g, n) output projection.
        D: (h,) or (h, p) skip connection, or None.

    Returns:
        y: (b, h, p) in ``x.dtype``; new_state: (b, h, p, n) in ``state.dtype``.
    """
    nheads = x.shape[1]
    dtype = _compute_dtype(state, x, dt, A, B, C, D)

    # 1. Compute dtype; expand the B/C groups to heads: (b, g, n) -> (b, h, n).
    s, xc, dtc, Ac = state.to(dtype), x.to(dtype), dt.to(dtype), A.to(dtype)
    Bh = _expand_groups(B.to(dtype), nheads)
    Ch = _expand_groups(C.to(dtype), nheads)

    # 2. Decay the state and write the new token: S = exp(dt A) S + dt x (outer) B.
    decay = torch.exp(dtc * Ac)[:, :, None, None]  # (b, h, 1, 1)
    new_state = decay * s + torch.einsum("bh,bhp,bhn->bhpn", dtc, xc, Bh)

    # 3. Read out with C and add the skip connection.
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch) + _d_term(D, xc)
    return y.to(x.dtype), new_state.to(state.dtype)
