"""lm-evaluation-harness on a Hugging Face folder (an ``ilm-megatron`` export or any causal LM).

:func:`run_lm_eval` loads the folder with ``AutoModelForCausalLM`` / ``AutoTokenizer``
(``trust_remote_code=True``, local files only), wraps the model in lm-eval's ``HFLM``, runs
``lm_eval.simple_evaluate`` and returns one JSON-able dict: lm-eval's metrics plus what is needed
to reproduce them (the folder, the tasks, ``limit``, the loader overrides, the solver settings in
force read back from ``model.config``, package versions). ``ilm-eval lm-eval`` is its command line.

Nothing is downloaded: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``TRANSFORMERS_OFFLINE``
default to ``1`` (set them to ``0`` explicitly to let ``datasets`` fetch a task's data), and the
model and tokenizer are read with ``local_files_only=True``. See ``docs/lm_eval.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ilm_megatron.errors import UserError
from ilm_megatron.hf.configuration_ilm import SOLVER_KEYS

#: ``model.config`` attributes recorded as the solver settings in force (those that exist).
SOLVER_ATTRS = ("arch", "implicit", "iterate_init", *SOLVER_KEYS, "kernel_backend")

#: ``from_pretrained`` keyword arguments accepted by ``--override`` besides config attributes.
LOADER_KWARGS = frozenset({"dtype", "torch_dtype", "attn_implementation", "low_cpu_mem_usage"})

#: Packages whose versions are recorded in the results.
VERSIONED = ("ilm-megatron", "lm_eval", "transformers", "torch", "datasets", "tokenizers")

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class LMEvalError(UserError):
    """lm-eval cannot run: missing folder or ``config.json``, unknown task, bad override."""


def set_offline_defaults() -> None:
    """Default the Hugging Face offline switches to ``1`` (a value already set is kept).

    They are read when ``huggingface_hub`` / ``datasets`` are first imported, so this runs before
    those imports.
    """
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


def parse_value(text: str) -> Any:
    """A command-line value as int, float, bool (``true``/``false``), ``None`` (``none``) or str.

    ``"3"`` -> 3, ``"1e-4"`` -> 1e-4, ``"True"`` -> True, ``"none"`` -> None, ``"bf16"`` -> "bf16".
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, parse_value(value))``; raises ``ValueError`` without ``=``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`VERSIONED` (``None`` for a missing package)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def solver_settings(config: Any) -> dict[str, Any]:
    """The :data:`SOLVER_ATTRS` that ``config`` has, with their values."""
    return {a: getattr(config, a) for a in SOLVER_ATTRS if hasattr(config, a)}


def check_hf_dir(hf_dir: str | Path) -> Path:
    """``hf_dir`` as a resolved path; it must be a folder with a ``config.json``."""
    path = Path(hf_dir).expanduser()
    if not path.exists():
        raise LMEvalError(f"Hugging Face folder {path} does not exist")
    if not path.is_dir():
        raise LMEvalError(f"{path} is not a folder (pass the Hugging Face export folder)")
    if not (path / "config.json").is_file():
        raise LMEvalError(
            f"no config.json in {path}: not a Hugging Face model folder "
            "(write one with the ilm-megatron exporter)"
        )
    return path.resolve()


def build_task_manager(tasks: Sequence[str], include_path: str | Path | None) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``, or :class:`LMEvalError`.

    A task may be a registered name (built in, or defined by a YAML under ``include_path``, which
    wins over a built-in of the same name) or the path of a task YAML. Indexing the ~15k built-in
    task configs takes ~20 s on a small CPU, so when every task is a plain task (not a group or
    tag) of ``include_path``, only ``include_path`` is indexed: such tasks are built from their
    YAML alone, so the result is the same.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    if not tasks:
        raise LMEvalError("no task given (--tasks a,b,...)")
    if include_path is not None:
        inc = Path(include_path).expanduser()
        if not inc.is_dir():
            raise LMEvalError(f"--include-path {inc} is not a folder")
        local = TaskManager(include_path=str(inc), include_defaults=False)
        entries = [local.task_index.get(t) for t in tasks]
        if all(e is not None and e.kind in (Kind.TASK, Kind.PY_TASK) for e in entries):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.task_index and not Path(t).is_file()]
    if unknown:
        where = "lm-eval's built-in tasks" + (
            f" or the task YAMLs under {include_path}" if include_path is not None else ""
        )
        raise LMEvalError(
            f"unknown lm-eval task(s) {', '.join(repr(t) for t in unknown)}: not in {where} "
            "(a task YAML that fails to parse is skipped silently by lm-eval; "
            "`lm-eval ls tasks` lists the names)"
        )
    return manager


def _check_overrides(hf_dir: Path, overrides: dict[str, Any]) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise LMEvalError(f"cannot read {hf_dir / 'config.json'}: {exc}") from None
    bad = [k for k in overrides if k not in LOADER_KWARGS and not hasattr(config, k)]
    if bad:
        raise LMEvalError(
            f"--override {', '.join(bad)}: not a setting of {hf_dir / 'config.json'} "
            f"(nor one of {', '.join(sorted(LOADER_KWARGS))}); solver settings there: "
            f"{', '.join(solver_settings(config)) or 'none'}"
        )


def load_hf_model(hf_dir: Path, overrides: dict[str, Any], device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``hf_dir`` on ``device``, in eval mode, with ``overrides`` applied.

    ``overrides`` are ``from_pretrained`` keyword arguments: config attributes (``f_tol=1e-4``)
    replace the values of ``config.json``; ``dtype`` etc. are passed to the loader.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LMEvalError(f"--device {device} but CUDA is not available")
    _check_overrides(hf_dir, overrides)
    try:
        # trust_remote_code: config.json of an ilm export has an auto_map; without it transformers
        # asks on stdin whether to run the folder's code, even for a plain tokenizer class
        tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LMEvalError(f"cannot load the tokenizer of {hf_dir}: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hf_dir, trust_remote_code=True, local_files_only=True, **overrides
        )
    except (OSError, ValueError, TypeError) as exc:
        raise LMEvalError(f"cannot load the model of {hf_dir}: {exc}") from None
    return model.to(device).eval(), tok


def _clean(obj: Any) -> Any:
    """``obj`` with tuples as lists and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_jsonable(obj: Any) -> Any:
    """A JSON round trip of ``obj`` (numpy scalars as numbers, other objects as ``str``)."""
    from lm_eval.utils import handle_non_serializable

    return _clean(json.loads(json.dumps(obj, default=handle_non_serializable)))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to a temporary file next to ``path``, then rename it."""
    from ilm_megatron.train.checkpoint import _write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def run_lm_eval(
    hf_dir: str | Path,
    tasks: list[str],
    limit: int | None,
    include_path: str | None,
    batch_size: int,
    device: str,
    model_overrides: dict[str, Any],
    output: Path | None,
    *,
    log_samples: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the Hugging Face folder ``hf_dir``; return (and write) the results.

    Args:
        hf_dir: folder with ``config.json``, the weights and the tokenizer files.
        tasks: lm-eval task names (or task YAML paths), e.g. ``["hellaswag", "piqa"]``.
        limit: evaluate only the first ``limit`` documents of each task (``None``: all).
        include_path: extra folder of task YAMLs (custom tasks, local copies of datasets).
        batch_size: requests per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        model_overrides: ``from_pretrained`` keyword arguments, e.g. ``{"f_tol": 1e-4}``.
        output: where to write the results JSON (atomically); ``None``: not written.
        log_samples: also keep lm-eval's per-document records (``samples``) in the results.
        max_length: context length for lm-eval (default: from the model config, else 2048).

    Returns:
        ``{"task": "lm-eval", "hf_dir", "tasks", "limit", "solver", "versions", "results", ...}``;
        ``results`` is lm-eval's ``{task: {"acc,none": ..., "acc_stderr,none": ...}}``.

    Raises:
        LMEvalError: missing folder or ``config.json``, unknown task, bad override or device.
    """
    path = check_hf_dir(hf_dir)
    if limit is not None and limit <= 0:
        raise LMEvalError(f"--limit must be positive, not {limit}")
    if batch_size <= 0:
        raise LMEvalError(f"--batch-size must be positive, not {batch_size}")
    set_offline_defaults()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise LMEvalError(
            f"lm-eval is not installed ({exc}); pip install 'lm-eval[hf]==0.4.13'"
        ) from None

    start = time.time()
    manager = build_task_manager(tasks, include_path)
    model, tok = load_hf_model(path, dict(model_overrides), device)
    lm = HFLM(
        pretrained=model,
        tokenizer=tok,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
    )
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            batch_size=batch_size,
            device=str(model.device),
            task_manager=manager,
            log_samples=log_samples,
        )
    except KeyError as exc:  # a split or a group member the task YAML names is missing
        raise LMEvalError(
            f"lm-eval could not load task(s) {', '.join(tasks)}: no {exc} (a split, field or task "
            "named in the task YAML; set the splits your local data lacks to null)"
        ) from None
    except (FileNotFoundError, ConnectionError) as exc:  # data files, or offline and not cached
        offline = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
        hint = (
            f" (HF_DATASETS_OFFLINE={offline}: the data set must be in the datasets cache, "
            "HF_DATASETS_CACHE, or a task YAML under --include-path must point at local files; "
            "see docs/lm_eval.md)"
        )
        raise LMEvalError(
            f"lm-eval could not load the data of task(s) {', '.join(tasks)}: {exc}{hint}"
        ) from None
    result: dict[str, Any] = {
        "task": "lm-eval",
        "hf_dir": str(path),
        "tasks": list(tasks),
        "limit": limit,
        "batch_size": batch_size,
        "device": str(model.device),
        "max_length": lm.max_length,
        "model_overrides": dict(model_overrides),
        "output": None if output is None else str(output),
        "solver": solver_settings(model.config),
        "model": {
            "model_type": getattr(model.config, "model_type", None),
            "class": type(model).__name__,
            "dtype": str(model.dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "versions": package_versions(),
        "results": raw["results"],
        "groups": raw.get("groups", {}),
        "n_samples": raw.get("n-samples", {}),
        "n_shot": raw.get("n-shot", {}),
        "task_versions": raw.get("versions", {}),
        "higher_is_better": raw.get("higher_is_better", {}),
        "task_configs": raw.get("configs", {}),
        "lm_eval_config": raw.get("config", {}),
        "elapsed_s": round(time.time() - start, 3),
    }
    if log_samples:
        result["samples"] = raw.get("samples", {})
    result = to_jsonable(result)
    if output is not None:
        write_json_atomic(Path(output), result)
    return result
