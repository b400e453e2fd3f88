"""Kernel backend selection, shared by every dispatching entry point.

``backend`` is one of:

* ``"auto"`` — our Triton kernels for CUDA tensors, the PyTorch reference for everything else;
* ``"reference"`` — the PyTorch reference (any device);
* ``"triton"`` — our Triton kernels; on CPU tensors only under the Triton interpreter
  (``TRITON_INTERPRET=1``, used by the tests);
* ``"mamba_ssm"`` — mamba-ssm's kernels (CUDA only, optional dependency).

Importing this module never imports triton, CUDA libraries or mamba-ssm.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Any

import torch

BACKENDS = ("auto", "reference", "triton", "mamba_ssm")


class BackendUnavailableError(RuntimeError):
    """The requested kernel backend cannot run here; the message says why and what to do."""


def triton_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_module(name: str) -> bool:
    """True when the top-level package of ``name`` is installed (nothing is imported)."""
    return importlib.util.find_spec(name.split(".")[0]) is not None


_OPTIONAL: dict[tuple[str, str | None], Any] = {}


def optional_import(module: str, attr: str | None = None) -> Any | None:
    """Import an optional GPU package once; the module (or its ``attr``), or None.

    None when the package is not installed, or when it is installed but fails to import (an
    ABI-broken CUDA extension raises ImportError, OSError or RuntimeError at import): that case
    warns once with the reason, and callers fall back to ilm_kernels' own kernels.
    """
    key = (module, attr)
    if key in _OPTIONAL:
        return _OPTIONAL[key]
    obj = None
    if has_module(module):
        try:
            obj = importlib.import_module(module)
            if attr is not None:
                obj = getattr(obj, attr)
        except Exception as exc:  # noqa: BLE001 - any import-time failure means "unusable"
            warnings.warn(
                f"{module}{'.' + attr if attr else ''} is installed but unusable "
                f"({type(exc).__name__}: {exc}); using ilm_kernels' own kernels instead",
                RuntimeWarning,
                stacklevel=2,
            )
            obj = None
    _OPTIONAL[key] = obj
    return obj


def optional_failure(module: str, attr: str | None = None) -> str:
    """Why :func:`optional_import` returned None: "not installed" or "failed to import"."""
    return "is not installed" if not has_module(module) else "failed to import (see the warning)"


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Map a requested backend to the one that will run for these tensors.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: the backend cannot run for these tensors on this machine.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and has_module("triton") else "reference"
    if backend == "triton":
        if not has_module("triton"):
            raise BackendUnavailableError("backend 'triton' requested but triton is not installed")
        if not on_cuda and not triton_interpreter():
            raise BackendUnavailableError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing ilm_kernels (or use backend='reference')"
            )
    if backend == "mamba_ssm":
        if not has_module("mamba_ssm"):
            raise BackendUnavailableError(
                "backend 'mamba_ssm' requested but mamba-ssm is not installed "
                "(pip install 'ilm-megatron[gpu]' --no-build-isolation)"
            )
        if not on_cuda:
            raise BackendUnavailableError("backend 'mamba_ssm' runs on CUDA tensors only")
    return backend


def launch_warps(elements: int, per_thread: int = 32) -> dict[str, int]:
    """``{"num_warps": w}`` for a tile of ``elements``: about ``per_thread`` elements per thread,
    4 to 8 warps (``{}`` in the interpreter, which ignores it)."""
    if triton_interpreter():
        return {}
    warps = 4
    while warps < 8 and elements > warps * 32 * per_thread:
        warps *= 2
    return {"num_warps": warps}
