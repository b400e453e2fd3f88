"""Model weights as safetensors, written atomically, with the model config in the metadata.

A file is written under a temporary name in the same folder and renamed into place, so a crash
mid-write never leaves a truncated checkpoint under the real name. Loading checks that the stored
model config matches the model it is loaded into and names every mismatching field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ilm_megatron.config import Config, ModelConfig, SolverConfig
from ilm_megatron.models.lm import ImplicitLM

# Fields that change the parameter shapes or the function computed.
_ARCH_FIELDS = (
    "arch", "implicit", "vocab_size", "pad_vocab_multiple", "d_model", "n_layers", "d_state",
    "headdim", "expand", "ngroups", "d_conv", "n_heads", "ffn_hidden_size", "tie_embeddings",
    "weight_norm",
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
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (for tools)."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# ---------------------------------------------------------------------------------------------
# Training checkpoints: run_dir/checkpoints/step-NNNNNNNN/{model.safetensors,trainer.pt}


def _step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
        and (final / "model.safetensors").is_file()
        and (final / "trainer.pt").is_file()
    )


def save_training_checkpoint(
    ckpt_root: Path,
    step: int,
    model: ImplicitLM,
    cfg: Config,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    """Write a complete training checkpoint atomically and point ``latest`` at it.

    The folder is built under a temporary name and renamed into place; ``latest`` (a one-line
    text file) is replaced last. A process killed at any moment leaves the previous checkpoint
    loadable through ``latest``. Older checkpoints beyond ``keep_last`` are removed afterwards.
    """
    import shutil

    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(ckpt_root, step)
    if already_saved(ckpt_root, final):
        return final
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_model(model, cfg, tmp / "model.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        if final.exists():  # a stale folder of this step that ``latest`` does not name
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_text_atomic(ckpt_root / "latest", final.name + "\n")
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder ``latest`` points at, or None when there is no checkpoint yet."""
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    target = Path(ckpt_root) / pointer.read_text().strip()
    if not (target / "model.safetensors").is_file() or not (target / "trainer.pt").is_file():
        raise FileNotFoundError(f"{pointer} points at {target}, which is not a complete checkpoint")
    return target


def load_training_checkpoint(path: Path, model: ImplicitLM) -> dict:
    """Load weights into ``model`` (architecture checked) and return the trainer state."""
    load_model(Path(path) / "model.safetensors", model)
    return torch.load(Path(path) / "trainer.pt", weights_only=True)
