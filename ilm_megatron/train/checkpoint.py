"""Model weights as safetensors, written atomically, with the run's config in the metadata.

A file is written under a temporary name in the same folder and renamed into place, so a crash
mid-write never leaves a truncated checkpoint under the real name. Loading checks that the stored
model config matches the model it is loaded into and names every mismatching field.

Training checkpoints (``run_dir/checkpoints/step-NNNNNNNN/``) hold the weights, the trainer
state, the run's ``config.yaml`` and, written last, ``manifest.json``: the size and SHA-256 of
every file. :func:`choose_resume` verifies them newest first and falls back past a damaged or
unfinished folder, saying which file is wrong (``docs/reliability.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ilm_megatron.config import Config, ModelConfig, SolverConfig, config_to_yaml
from ilm_megatron.errors import UserError
from ilm_megatron.models.lm import ImplicitLM

# Fields that change the parameter shapes or the function computed.
_ARCH_FIELDS = (
    "arch", "implicit", "vocab_size", "pad_vocab_multiple", "d_model", "n_layers", "d_state",
    "headdim", "expand", "ngroups", "d_conv", "n_heads", "ffn_hidden_size", "tie_embeddings",
    "weight_norm", "iterate_init",
)  # fmt: skip


def save_model(model: ImplicitLM, cfg: Config, path: Path) -> None:
    """Write ``model``'s weights and ``cfg`` (model and solver sections) to ``path`` atomically."""
    save_state_dict(model.state_dict(), cfg, path)


def save_state_dict(state: dict[str, torch.Tensor], cfg: Config, path: Path) -> None:
    """Write a (single-process) state dict and ``cfg``'s model and solver sections atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {
        "format": "ilm-megatron/1",
        "model": json.dumps(dataclasses.asdict(cfg.model)),
        "solver": json.dumps(dataclasses.asdict(cfg.solver)),
        "config": config_to_yaml(cfg),  # the whole run config (ilm-eval reads data.* from it)
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        set_user_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stored_config_text(path: Path) -> str | None:
    """The whole run config (YAML) stored in a checkpoint's metadata; None for older files."""
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("config")


def set_user_mode(path: Path) -> None:
    """Give a file made by ``tempfile`` (0600, or 0700 for a folder) the mode the umask gives."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def read_configs(path: Path) -> tuple[ModelConfig, SolverConfig]:
    """The model and solver configs stored in a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != "ilm-megatron/1":
        raise ValueError(
            f"{path}: not an ilm-megatron checkpoint (metadata format={meta.get('format')!r})"
        )
    return ModelConfig(**json.loads(meta["model"])), SolverConfig(**json.loads(meta["solver"]))


def load_model(path: Path, model: ImplicitLM | None = None) -> ImplicitLM:
    """Load a checkpoint into ``model`` (or into a new model built from the stored config).

    Raises:
        ValueError: the stored architecture differs from ``model``'s; the message lists the fields.
    """
    path = Path(path)
    mcfg, scfg = read_configs(path)
    if model is None:
        model = ImplicitLM(mcfg, scfg)
    else:
        check_architecture(path, model.config)
    state = {}
    with safe_open(str(path), framework="pt") as fh:
        for k in fh.keys():
            state[k] = fh.get_tensor(k)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return model


def check_architecture(path: Path, config: ModelConfig) -> None:
    """Raise ValueError naming every architecture field where ``path`` differs from ``config``."""
    mcfg, _ = read_configs(path)
    diff = [
        f"{k}: checkpoint {getattr(mcfg, k)!r} vs model {getattr(config, k)!r}"
        for k in _ARCH_FIELDS
        if getattr(mcfg, k) != getattr(config, k)
    ]
    if diff:
        raise ValueError(f"{path}: checkpoint does not match the model: " + "; ".join(diff))


def weights_file(path: str | Path) -> Path:
    """``model.safetensors`` of a folder written by ilm-train or ilm-import, or ``path`` itself.

    Raises:
        CheckpointError: nothing loadable there (the message names the path).
    """
    p = Path(path)
    f = p / "model.safetensors" if p.is_dir() else p
    if not f.is_file() and is_sharded(p):
        raise CheckpointError(
            f"{p} holds a sharded checkpoint (written by several ranks): make the whole model "
            f"first with python tools/consolidate_checkpoint.py {p}"
        )
    if not f.is_file():
        what = "a folder without model.safetensors" if p.is_dir() else "missing"
        raise CheckpointError(f"{p}: {what} (expected a checkpoint folder or a .safetensors file)")
    return f


def init_from_checkpoint(model: ImplicitLM, cfg: Config) -> Path | None:
    """Load ``train.init_checkpoint``'s weights into a freshly built single-process ``model``
    (fine-tuning start; the architecture must match). Returns the file loaded, or None."""
    if not cfg.train.init_checkpoint:
        return None
    f = weights_file(cfg.train.init_checkpoint)
    try:
        load_model(f, model)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"train.init_checkpoint={cfg.train.init_checkpoint}: {e}") from None
    return f


def load_state(path: Path, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: all of them, or only ``names`` (read lazily, nothing else)."""
    with safe_open(str(path), framework="pt") as fh:
        keys = fh.keys() if names is None else [k for k in fh.keys() if k in set(names)]
        return {k: fh.get_tensor(k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Training checkpoints: run_dir/checkpoints/step-NNNNNNNN/{model.safetensors,trainer.pt}


MANIFEST = "manifest.json"
SHARDED_DIR = "sharded"  # a multi-process step's shards (ilm_megatron.train.sharded)


def is_sharded(folder: Path) -> bool:
    """True for a step folder whose weights are shards (``sharded/``) written by several ranks."""
    return (Path(folder) / SHARDED_DIR).is_dir()


_STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one is needed; the message names the folder and the file."""


def _step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    set_user_mode(Path(tmp))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, files: Collection[Path]) -> dict[str, dict[str, Any]]:
    """``{path relative to folder: {"bytes", "sha256"}}`` of ``files`` (manifest entries; each
    rank of a sharded save hashes the files it wrote)."""
    out = {}
    for f in files:
        out[Path(f).relative_to(folder).as_posix()] = {
            "bytes": Path(f).stat().st_size,
            "sha256": _sha256(Path(f)),
        }
    return out


def write_manifest(
    folder: Path, cfg: Config, known: dict[str, dict[str, Any]] | None = None
) -> None:
    """Write the run's ``config.yaml`` into a checkpoint folder, then ``manifest.json`` (last):
    the size and SHA-256 of every file below ``folder``. Call it once all files are written.
    ``known``: entries already computed (by the ranks that wrote those files); the size of each
    is checked again here."""
    folder = Path(folder)
    (folder / "config.yaml").write_text(config_to_yaml(cfg))
    known = known or {}
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        entry = known.get(rel)
        if entry is None or entry["bytes"] != f.stat().st_size:
            entry = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        files[rel] = entry
    text = json.dumps({"format": "ilm-megatron-checkpoint/1", "files": files}, indent=1)
    _write_text_atomic(folder / MANIFEST, text + "\n")


def verify_checkpoint(folder: Path, legacy: bool = False) -> str | None:
    """What is wrong with a checkpoint folder (one line naming the file), or None when every
    file matches ``manifest.json``. ``legacy``: a folder from before manifests (none in the
    run has one) passes when its weights and trainer state exist."""
    folder = Path(folder)
    man = folder / MANIFEST
    if legacy and not man.exists():
        for name in ("model.safetensors", "trainer.pt"):
            if not (folder / name).is_file():
                return f"{folder / name} is missing"
        return None
    if not man.is_file():
        return f"{man} is missing (the save did not finish, or the file was removed)"
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        return f"{man} is unreadable ({type(e).__name__})"
    if not isinstance(files, dict) or not (
        "model.safetensors" in files or f"{SHARDED_DIR}/.metadata" in files
    ):
        return f"{man} lists no model.safetensors (nor sharded/.metadata)"
    for rel, want in files.items():
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its SHA-256 in the manifest (corrupted)"
    return None


def step_folders(ckpt_root: Path) -> list[Path]:
    """Complete-named step folders ``step-NNNNNNNN``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def step_of(folder: Path) -> int:
    """The step a checkpoint folder ``step-NNNNNNNN`` holds."""
    m = _STEP_RE.match(Path(folder).name)
    if m is None:
        raise ValueError(f"{folder} is not a checkpoint folder (step-NNNNNNNN)")
    return int(m.group(1))


def already_saved(ckpt_root: Path, final: Path) -> bool:
    """True when ``latest`` already names the complete folder ``final`` (the same step again).

    A second save of a step (a SIGTERM right after a periodic save, the end of a run right after
    one) is skipped: deleting the folder ``latest`` points at to rewrite it would leave no
    loadable checkpoint if the job died in between.
    """
    pointer = Path(ckpt_root) / "latest"
    return (
        pointer.is_file()
        and pointer.read_text().strip() == final.name
        and (final / MANIFEST).is_file()
    )


def prune(ckpt_root: Path, keep_last: int, final: Path) -> None:
    """Remove the oldest step folders beyond ``keep_last`` (never ``final``)."""
    for old in step_folders(ckpt_root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(
    ckpt_root: Path,
    step: int,
    model: ImplicitLM,
    cfg: Config,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    """Write a complete training checkpoint atomically and point ``latest`` at it.

    The folder is built under a temporary name (weights, trainer state, ``config.yaml``, then
    ``manifest.json``) and renamed into place; ``latest`` (a one-line text file) is replaced
    last. A process killed at any moment leaves the previous checkpoint loadable. Older
    checkpoints beyond ``keep_last`` are removed afterwards.
    """
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(ckpt_root, step)
    if already_saved(ckpt_root, final):
        return final
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        set_user_mode(tmp)
        save_model(model, cfg, tmp / "model.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        fault_point("save_before_manifest")
        write_manifest(tmp, cfg)
        if final.exists():  # a stale folder of this step that ``latest`` does not name
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fault_point("save_before_latest")
    _write_text_atomic(ckpt_root / "latest", final.name + "\n")
    prune(ckpt_root, keep_last, final)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder ``latest`` points at when it holds weights and trainer state, else None
    (for messages and tools; the trainer resumes through :func:`choose_resume`)."""
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    target = Path(ckpt_root) / pointer.read_text().strip()
    if not (target / "model.safetensors").is_file() or not (target / "trainer.pt").is_file():
        return None
    return target


@dataclass
class ResumeChoice:
    """Where a run resumes. ``path``: the newest verified step folder (None: no checkpoint);
    ``notes``: one line per folder skipped or pointer disagreement, for the console;
    ``damaged``: folders to move aside (they fail verification)."""

    path: Path | None
    notes: list[str] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)


def choose_resume(ckpt_root: Path) -> ResumeChoice:
    """The checkpoint to resume from: the newest step folder whose files match its manifest.

    ``latest`` is a hint, not the authority: a job killed between renaming a finished folder into
    place and rewriting ``latest`` left a newer complete folder, and a missing or broken pointer
    must not restart the run from step 0. Every folder skipped is named with its bad file.

    Raises:
        CheckpointError: step folders exist but none verifies (nothing is loaded or removed).
    """
    root = Path(ckpt_root)
    folders = step_folders(root)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    if not folders:
        if named:
            raise CheckpointError(f"{pointer} names {named}, but {root} holds no step folder")
        return ResumeChoice(None)
    legacy = not any((f / MANIFEST).exists() for f in folders)
    choice = ResumeChoice(None)
    for f in reversed(folders):
        problem = verify_checkpoint(f, legacy)
        if problem is None:
            choice.path = f
            break
        choice.notes.append(f"checkpoint {f.name} is not usable: {problem}")
        choice.damaged.append(f)
    if choice.path is None:
        raise CheckpointError(
            f"no usable checkpoint in {root}: " + "; ".join(choice.notes)
            + " (move the folder aside to start over, or set train.start_over=true)"
        )  # fmt: skip
    if named is None:
        choice.notes.append(f"{pointer} is missing; resuming from {choice.path.name}")
    elif named != choice.path.name and not any(d.name == named for d in choice.damaged):
        choice.notes.append(f"{pointer} names {named}; resuming from {choice.path.name}")
    if choice.damaged:
        choice.notes.append(f"falling back to {choice.path.name}")
    return choice


def move_aside(folder: Path, why: str) -> Path:
    """Rename ``folder`` to ``<name>.<why>-<time>`` beside it (never delete a user's data)."""
    folder = Path(folder)
    dest = folder.with_name(f"{folder.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = folder.with_name(f"{folder.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(folder, dest)
    return dest


def remove_unfinished(ckpt_root: Path) -> None:
    """Remove temporary folders ``.step-*.tmp`` left by saves that were killed (hold the run
    directory lock: another job's save in progress would look the same)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def load_training_checkpoint(path: Path, model: ImplicitLM) -> dict:
    """Load weights into ``model`` (architecture checked) and return the trainer state."""
    load_model(Path(path) / "model.safetensors", model)
    return torch.load(Path(path) / "trainer.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Fault points for the fault-injection tests: ILM_FAULT=name[@N] kills this process (SIGKILL,
# as the OOM killer or a node failure would) the N-th time (default 1st) it reaches ``name``.

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here when ``ILM_FAULT`` names this point (tests and ``tools/chaos_train.py``)."""
    spec = os.environ.get("ILM_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    rank_ok = os.environ.get("ILM_FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get(
        "RANK", "0"
    )
    if rank_ok and _FAULT_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), 9)
