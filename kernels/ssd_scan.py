"""Public entry point of the Mamba2 SSD scan, dispatching to a kernel backend.

Importing this module never imports triton, CUDA libraries or mamba-ssm: the Triton kernels
(:mod:`ilm_kernels.ssd_triton`) and mamba-ssm are imported on first use.
"""

from __future__ import annotations

from torch import Tensor

from .backend import BackendUnavailableError, resolve_backend
from .ssd import ssd_scan_reference

__all__ = ["ssd_scan"]


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba2) with mamba-ssm's ``mamba_chunk_scan_combined`` convention.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) positive step sizes (softplus/bias already applied).
        A: (h,) negative per-head decay rates.
        B: (b, l, g, n) input projections; head ``h`` reads group ``h // (nheads // g)``.
        C: (b, l, g, n) output projections.
        chunk_size: chunk length (> 0); ``l`` need not be a multiple of it.
        D: (h,) or (h, p) skip connection, or None.
        initial_states: (b, h, p, n) state before the first token, or None (zeros).
        return_final_states: also return the state after the last token.
        backend: "auto" | "reference" | "triton" | "mamba_ssm" (see :mod:`ilm_kernels.backend`).

    Returns:
        y: (b, l, h, p) in ``x.dtype``; and, if ``return_final_states``, final_states
        (b, h, p, n) in float32 (or wider for the reference on float64 inputs).

    Raises:
        ValueError: unknown backend.
        BackendUnavailableError: the backend cannot run for these tensors here.
    """
    which = resolve_backend(backend, x, dt, A, B, C, D, initial_states)
    if which == "reference":
        return ssd_scan_reference(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
            return_final_states=return_final_states,
        )  # fmt: skip
    if which == "triton":
        from .ssd_triton import ssd_scan_triton

        return ssd_scan_triton(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
            return_final_states=return_final_states,
        )  # fmt: skip
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as exc:  # installed but broken (e.g. CUDA extension mismatch)
        raise BackendUnavailableError(f"backend 'mamba_ssm' failed to import: {exc}") from exc
    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
        return_final_states=return_final_states,
    )  # fmt: skip
