"""Shared helpers of the command-line tools in ``tools/``: config/checkpoint loading, timing.

The tools are scripts (``python tools/<name>.py``), so this module is imported as ``_common`` from
the script's folder. Heavy imports (torch, Megatron-Core, the package) happen inside the functions,
so that argument and file checks fail fast with exit code 2 before any of them is loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ilm_megatron.argtypes import positive_float, positive_int  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ilm_megatron.config import Config
    from ilm_megatron.models.lm import ImplicitLM

REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_USAGE = 2
DTYPES = ("float32", "float64")


class ToolError(Exception):
    """A problem with the arguments or the input files; the tool exits with code 2."""


def fail(prog: str, msg: str) -> NoReturn:
    """Print ``prog: error: msg`` on stderr and exit with code 2."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def check_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; raises :class:`ToolError` naming the file if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise ToolError(f"{what} not found: {p}")
    return p


def load_run_config(
    config: str | Path | None, overrides: Sequence[str] = (), checkpoint: str | Path | None = None
) -> Config:
    """The resolved config of a tool run.

    Without a checkpoint: ``config`` merged onto the defaults, then ``overrides``. With one, the
    model section stored in the checkpoint replaces that of ``config`` (the solver section comes
    from ``config`` when given, else from the checkpoint); ``overrides`` are applied last.

    Raises:
        ToolError: missing file, unreadable checkpoint, invalid config or override.
    """
    if config is None and checkpoint is None:
        raise ToolError("give --config or --checkpoint")
    # the files first: a missing one is reported before the package (and Megatron) is imported
    cfg_path = None if config is None else check_file(config, "config file")
    ckpt = None if checkpoint is None else check_file(checkpoint, "checkpoint")

    from ilm_megatron.config import Config, ConfigError, load_config, with_overrides

    try:
        if ckpt is None:
            return load_config([cfg_path], overrides)
        from ilm_megatron.train.checkpoint import read_configs

        try:
            mcfg, scfg = read_configs(ckpt)
        except Exception as e:  # safetensors header errors, bad metadata, unknown fields
            raise ToolError(f"cannot read checkpoint {ckpt}: {e}") from None
        base = Config(model=mcfg, solver=scfg)
        if cfg_path is not None:
            base = dataclasses.replace(base, solver=load_config([cfg_path]).solver)
        return with_overrides(base, overrides)
    except ConfigError as e:
        raise ToolError(str(e)) from None


def build_from_config(
    cfg: Config, checkpoint: str | Path | None = None, dtype: str = "float32"
) -> ImplicitLM:
    """Build the model of ``cfg`` (weights from ``checkpoint`` when given), cast to ``dtype``.

    Call ``torch.manual_seed`` first for reproducible random weights.

    Raises:
        ToolError: the checkpoint does not match ``cfg.model`` or cannot be loaded.
    """
    import torch

    from ilm_megatron.models.lm import build_model

    model = build_model(cfg.model, cfg.solver)
    if checkpoint is not None:
        from ilm_megatron.train.checkpoint import load_model

        try:
            load_model(Path(checkpoint), model)
        except Exception as e:  # mismatched architecture, missing or misshaped tensors
            raise ToolError(f"cannot load checkpoint {checkpoint}: {e}") from None
    return model.to(getattr(torch, dtype))


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    """Platform, processor, core count, torch version and intra-op threads."""
    import torch

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def now_iso() -> str:
    """Local date and time, ISO 8601 with the UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def dump_json(obj: Any) -> str:
    """``obj`` as indented JSON (keys in insertion order)."""
    return json.dumps(obj, indent=2)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (parents created): a
    reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def emit_report(report: Any, output: str | None, show: bool = True) -> str:
    """Write ``report`` as JSON to ``output`` atomically (if given), print it (``show``), and
    return the text."""
    text = dump_json(report)
    if output:
        write_atomic(output, text + "\n")
    if show:
        print(text)
    return text


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it, else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)
