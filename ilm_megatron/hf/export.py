"""``ilm-export``: a training checkpoint to a Hugging Face folder (docs/huggingface.md).

    ilm-export --checkpoint RUN_DIR|STEP_FOLDER|model.safetensors --out DIR
               [--format auto|ilm|native] [--tokenizer byte|tokenizer.json] [--max-shard-size 5GB]

Every training layout (one process, DeepSpeed ZeRO, TP x PP) stores the whole single-process
model in ``model.safetensors`` with its config in the metadata, so one reader serves all of them;
a run directory resolves to its newest verified checkpoint. The export runs on the CPU.

Formats:

* ``ilm`` (the default for implicit models): ``config.json`` with ``auto_map``, the weights under
  ilm-megatron's own names, and the self-contained ``configuration_ilm.py`` /
  ``modeling_ilm.py``, loaded with ``trust_remote_code=True``.
* ``native`` (the default for explicit models): transformers' own ``Mamba2ForCausalLM`` or
  ``LlamaForCausalLM`` layout; no remote code.

Weight normalisation is folded into plain weights, the padded vocabulary rows are dropped (the
export's vocabulary is the tokenizer's), and ``ilm_megatron.json`` records the exact model and
solver configs so that ``ilm-import`` restores the training checkpoint. Everything is written
into a temporary folder that is renamed into place: a failure leaves no partial export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ilm_megatron.config import ModelConfig, SolverConfig
from ilm_megatron.errors import UserError

FORMAT = "ilm-megatron-hf/1"
SIDE_FILE = "ilm_megatron.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_HERE = Path(__file__).resolve().parent
REMOTE_FILES = ("configuration_ilm.py", "modeling_ilm.py")
_WN_G, _WN_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


class ConversionError(UserError, ValueError):
    """A checkpoint or folder that cannot be converted; the message names the file or key."""


# ------------------------------------------------------------------------------------------
# Reading a training checkpoint


@dataclass
class Source:
    """Where the weights come from: the ``model.safetensors`` file, the checkpoint folder that
    holds it (None for a bare file), the run's config text and notes for the console."""

    weights: Path
    folder: Path | None
    config_text: str | None
    notes: list[str] = field(default_factory=list)


def resolve_source(path: str | Path) -> Source:
    """The weights file for a run directory, a checkpoint folder or a ``.safetensors`` file.

    A run directory resolves to its newest checkpoint that matches its manifest (``latest`` is
    a hint, as for resuming), or to its final ``model.safetensors`` when it has no checkpoints.
    A folder with ``manifest.json`` is verified file by file.

    Raises:
        ConversionError: nothing loadable, or a damaged checkpoint (naming the file).
    """
    from ilm_megatron.train.checkpoint import (
        CheckpointError,
        choose_resume,
        step_folders,
        stored_config_text,
        verify_checkpoint,
    )
    from ilm_megatron.train.sharded import is_sharded

    p = Path(path)
    notes: list[str] = []
    if p.is_file():
        weights, folder = p, None
    elif p.is_dir():
        ckpts = p / "checkpoints"
        if step_folders(ckpts):
            try:
                choice = choose_resume(ckpts)
            except CheckpointError as e:
                raise ConversionError(str(e)) from None
            notes += choice.notes
            folder = choice.path
        elif (p / WEIGHTS).is_file():
            folder = p
        else:
            raise ConversionError(
                f"{p}: no {WEIGHTS} and no checkpoints/ (pass a run directory written by "
                "ilm-train, a checkpoint folder or a .safetensors file)"
            )
        problem = verify_checkpoint(folder) if (folder / "manifest.json").exists() else None
        if problem is not None:
            raise ConversionError(f"checkpoint {folder} is damaged: {problem}")
        weights = folder / WEIGHTS
        if not weights.is_file() and is_sharded(folder):
            weights = _consolidated(folder)
            notes.append(f"read the sharded checkpoint {folder} (consolidated for the export)")
        if not weights.is_file():
            raise ConversionError(f"{weights} is missing")
    else:
        raise ConversionError(f"{p} does not exist")
    try:
        text = stored_config_text(weights)
    except Exception as e:  # a truncated or foreign file: safetensors raises its own errors
        raise ConversionError(f"{weights}: not a readable safetensors file ({e})") from None
    if text is None and folder is not None and (folder / "config.yaml").is_file():
        text = (folder / "config.yaml").read_text()
    return Source(weights, folder, text, notes)


def _consolidated(folder: Path) -> Path:
    """The whole model of a sharded step folder as a ``model.safetensors`` in a temporary folder
    (removed when the process exits)."""
    import atexit
    import shutil
    import tempfile

    from ilm_megatron.train.checkpoint import save_state_dict
    from ilm_megatron.train.sharded import consolidate

    weights, _, cfg = consolidate(folder)
    tmp = Path(tempfile.mkdtemp(prefix="ilm-consolidated-"))
    atexit.register(shutil.rmtree, tmp, True)
    path = tmp / WEIGHTS
    save_state_dict(weights, cfg, path)
    return path


def read_checkpoint(weights: Path) -> tuple[ModelConfig, SolverConfig, dict[str, torch.Tensor]]:
    """The stored configs and every tensor, checked against the config's parameter shapes.

    Raises:
        ConversionError: unreadable file, foreign metadata, or a tensor missing, unexpected or
            of the wrong shape (named).
    """
    from safetensors import safe_open

    from ilm_megatron.train.checkpoint import read_configs

    try:
        mcfg, scfg = read_configs(weights)
        with safe_open(str(weights), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{weights}: {e}") from None
    except Exception as e:  # safetensors' own error type for a truncated or corrupt file
        raise ConversionError(f"{weights}: unreadable ({type(e).__name__}: {e})") from None
    check_state(state, expected_shapes(mcfg), str(weights))
    return mcfg, scfg, state


def expected_shapes(mcfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the single-process state dict of ``mcfg`` (built on the meta device)."""
    from ilm_megatron.models.lm import ImplicitLM

    with torch.device("meta"):
        model = ImplicitLM(dataclasses.replace(mcfg, backend="local"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(
    state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], where: str
) -> None:
    """Refuse a state dict whose names or shapes differ from ``want`` (naming the key)."""
    missing = sorted(set(want) - set(state))
    if missing:
        raise ConversionError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing)")
    extra = sorted(set(state) - set(want))
    if extra:
        raise ConversionError(f"{where}: unexpected tensor {extra[0]} for the stored config")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ConversionError(
                f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the config gives {shape}"
            )


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every ``(g, v)`` weight-norm pair by the plain ``weight = g * v / |v|`` (rows)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(_WN_G):
            continue
        if k.endswith(_WN_V):
            base = k[: -len(_WN_V)]
            out[base + ".weight"] = torch._weight_norm(v, state[base + _WN_G], 0)
        else:
            out[k] = v
    return out


def plain_state(mcfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folded weights with the embedding (and head) cut to the tokenizer's vocabulary."""
    out = fold_weight_norm(state) if mcfg.weight_norm else dict(state)
    for k in ("embedding.weight", "lm_head.weight"):
        if k in out:
            out[k] = out[k][: mcfg.vocab_size].contiguous()
    return out


# ------------------------------------------------------------------------------------------
# Writing


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` (bytes) -> bytes (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB)")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2) or "B"]
    return int(float(m.group(1)) * unit)


def write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def ilm_hf_config(mcfg: ModelConfig, scfg: SolverConfig, max_positions: int) -> dict[str, Any]:
    """``config.json`` of the ``ilm`` format (what ``IlmConfig`` reads)."""
    solver = {k: getattr(scfg, k) for k in _solver_keys()}
    return {
        "model_type": "ilm",
        "architectures": ["IlmForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_ilm.IlmConfig",
            "AutoModelForCausalLM": "modeling_ilm.IlmForCausalLM",
        },
        "torch_dtype": "float32",
        "arch": mcfg.arch,
        "implicit": mcfg.implicit,
        "vocab_size": mcfg.vocab_size,
        "d_model": mcfg.d_model,
        "n_layers": mcfg.n_layers,
        "norm_eps": mcfg.norm_eps,
        "tie_word_embeddings": mcfg.tie_embeddings,
        "iterate_init": mcfg.iterate_init,
        "d_state": mcfg.d_state,
        "headdim": mcfg.headdim,
        "expand": mcfg.expand,
        "ngroups": mcfg.ngroups,
        "d_conv": mcfg.d_conv,
        "chunk_size": mcfg.chunk_size,
        "n_heads": mcfg.n_heads,
        "ffn_hidden_size": mcfg.ffn_size,
        "rope_theta": mcfg.rope_theta,
        "max_position_embeddings": max_positions,
        "kernel_backend": "auto",
        "use_cache": False,
        **solver,
    }


def _solver_keys() -> tuple[str, ...]:
    from ilm_megatron.hf.configuration_ilm import SOLVER_KEYS

    return SOLVER_KEYS


def native_state(mcfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain (folded, unpadded) weights renamed and split to transformers' own layout."""
    out: dict[str, torch.Tensor] = {}
    d, ffn = mcfg.d_model, mcfg.ffn_size
    for k, t in state.items():
        m = re.fullmatch(r"stack\.layers\.(\d+)\.(.+)", k)
        if k == "embedding.weight":
            out["backbone.embeddings.weight" if mcfg.arch == "mamba2" else "model.embed_tokens.weight"] = t  # fmt: skip  # noqa: E501
        elif k == "lm_head.weight":
            out[k] = t
        elif k == "stack.final_norm.weight":
            out["backbone.norm_f.weight" if mcfg.arch == "mamba2" else "model.norm.weight"] = t
        elif m is None:
            raise ConversionError(f"tensor {k} has no place in the {mcfg.arch} native layout")
        elif mcfg.arch == "mamba2":
            out[f"backbone.layers.{m.group(1)}.{m.group(2)}"] = t
        else:
            pre, rest = f"model.layers.{m.group(1)}.", m.group(2)
            if rest == "norm.weight":
                out[pre + "input_layernorm.weight"] = t
            elif rest == "mlp_norm.weight":
                out[pre + "post_attention_layernorm.weight"] = t
            elif rest == "mixer.qkv_proj.weight":
                for name, part in zip(("q", "k", "v"), t.split(d, dim=0)):
                    out[pre + f"self_attn.{name}_proj.weight"] = part.contiguous()
            elif rest == "mixer.out_proj.weight":
                out[pre + "self_attn.o_proj.weight"] = t
            elif rest == "mlp.fc1.weight":
                gate, up = t.split(ffn, dim=0)
                out[pre + "mlp.gate_proj.weight"] = gate.contiguous()
                out[pre + "mlp.up_proj.weight"] = up.contiguous()
            elif rest == "mlp.fc2.weight":
                out[pre + "mlp.down_proj.weight"] = t
            else:
                raise ConversionError(f"tensor {k} has no place in the llama native layout")
    return out


def native_config(mcfg: ModelConfig, max_positions: int, ids: dict[str, int | None]) -> Any:
    """transformers' ``Mamba2Config`` / ``LlamaConfig`` for an explicit model."""
    import transformers

    tokens = {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if mcfg.arch == "mamba2":
        return transformers.Mamba2Config(
            vocab_size=mcfg.vocab_size,
            hidden_size=mcfg.d_model,
            num_hidden_layers=mcfg.n_layers,
            state_size=mcfg.d_state,
            head_dim=mcfg.headdim,
            num_heads=mcfg.nheads,
            n_groups=mcfg.ngroups,
            expand=mcfg.expand,
            conv_kernel=mcfg.d_conv,
            chunk_size=mcfg.chunk_size,
            layer_norm_epsilon=mcfg.norm_eps,
            use_bias=False,
            use_conv_bias=True,
            hidden_act="silu",
            residual_in_fp32=True,
            time_step_limit=(0.0, float("inf")),
            tie_word_embeddings=mcfg.tie_embeddings,
            **tokens,
        )
    return transformers.LlamaConfig(
        vocab_size=mcfg.vocab_size,
        hidden_size=mcfg.d_model,
        intermediate_size=mcfg.ffn_size,
        num_hidden_layers=mcfg.n_layers,
        num_attention_heads=mcfg.n_heads,
        num_key_value_heads=mcfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=mcfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": mcfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=mcfg.tie_embeddings,
        **tokens,
    )


def run_tokenizer(config_text: str | None) -> tuple[str | None, str | None, str]:
    """``(spec, fingerprint, why)`` of the tokenizer the run's data was made with.

    ``spec`` is "byte" or a tokenizer.json path found beside the shards; None when the run had
    none (synthetic tasks) or the file cannot be found (``why`` says which).
    """
    if not config_text:
        return None, None, "the checkpoint stores no run config"
    from omegaconf import OmegaConf

    data = OmegaConf.create(config_text).get("data", {}) or {}
    if data.get("task", "word_problem") != "shards" or not data.get("path"):
        return None, None, f"data.task={data.get('task')} has no text tokenizer"
    manifest = Path(str(data["path"])) / "manifest.json"
    try:
        info = json.loads(manifest.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, f"{manifest} is not readable here"
    name, fp = str(info.get("name", "")), info.get("fingerprint")
    if name == "byte":
        return "byte", fp, "the byte tokenizer"
    if name.startswith("hf:"):
        fname = name[3:]
        for cand in (manifest.parent / fname, manifest.parent.parent / fname):
            if cand.is_file():
                return str(cand), fp, f"{cand}"
        return None, fp, f"{fname} (named by {manifest}) is not beside the shards"
    return None, fp, f"unknown tokenizer {name!r} in {manifest}"


def _check_fingerprint(spec: str, want: str | None) -> None:
    if want is None:
        return
    from ilm_megatron.data.tokenizer import load_tokenizer

    try:
        got = load_tokenizer(spec).fingerprint()
    except Exception as e:
        raise ConversionError(f"--tokenizer {spec}: {e}") from None
    if got != want:
        raise ConversionError(
            f"--tokenizer {spec} is not the tokenizer the run's data was made with "
            f"(fingerprint {got[:12]} vs {want[:12]} in the data manifest)"
        )


@dataclass
class ExportResult:
    out: Path
    format: str
    weights: Path
    tokenizer: str | None
    notes: list[str]


def export(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "auto",
    tokenizer: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    max_positions: int = 0,
) -> ExportResult:
    """Convert ``checkpoint`` into a Hugging Face folder at ``out`` (atomically).

    Args:
        checkpoint: run directory, checkpoint folder or ``model.safetensors``.
        out: the folder to create (refused if it exists, unless ``overwrite``).
        fmt: "auto" (native for explicit models, ilm for implicit), "ilm" or "native".
        tokenizer: "byte" or a tokenizer.json; default: the run's, when it can be found.
        max_shard_bytes: shard the weights above this size (index file).
        max_positions: ``max_position_embeddings``; 0: max(2048, the run's data.seq_len).

    Raises:
        ConversionError: bad checkpoint, unsupported format for the model, existing ``out``.
    """
    src = resolve_source(checkpoint)
    mcfg, scfg, state = read_checkpoint(src.weights)
    notes = list(src.notes)
    if fmt == "auto":
        fmt = "ilm" if mcfg.implicit else "native"
    if fmt not in ("ilm", "native"):
        raise ConversionError(f"--format must be auto, ilm or native, got {fmt!r}")
    if fmt == "native" and mcfg.implicit:
        raise ConversionError(
            f"{src.weights} is an implicit model: transformers has no native class for it "
            "(use --format ilm)"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists (choose another --out, or pass --overwrite)")
    spec, want_fp, why = run_tokenizer(src.config_text)
    if tokenizer is not None:
        _check_fingerprint(tokenizer, want_fp)
        spec = tokenizer
    elif spec is None:
        notes.append(f"no tokenizer files written: {why} (pass --tokenizer)")
    if spec is not None:
        _check_tokenizer_size(spec, mcfg)
    if not max_positions:
        seq = 0
        if src.config_text:
            from omegaconf import OmegaConf

            seq = int((OmegaConf.create(src.config_text).get("data", {}) or {}).get("seq_len", 0))
        max_positions = max(2048, seq)
    plain = plain_state(mcfg, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        ids: dict[str, int | None] = {}
        if spec is not None:
            from ilm_megatron.hf.tokenizer import write_hf_tokenizer

            ids = write_hf_tokenizer(tmp, spec)
        if fmt == "ilm":
            _json(tmp / "config.json", ilm_hf_config(mcfg, scfg, max_positions) | ids)
            for name in REMOTE_FILES:
                shutil.copyfile(_HERE / name, tmp / name)
            write_weights(tmp, plain, max_shard_bytes)
        else:
            native_config(mcfg, max_positions, ids).save_pretrained(tmp)
            write_weights(tmp, native_state(mcfg, plain), max_shard_bytes)
        gen = {"_from_model_config": False, **{k: v for k, v in ids.items() if v is not None}}
        _json(tmp / "generation_config.json", gen)
        _json(
            tmp / SIDE_FILE,
            {
                "format": FORMAT,
                "export_format": fmt,
                "model": dataclasses.asdict(mcfg),
                "solver": dataclasses.asdict(scfg),
                "source": str(src.weights),
                "run_config": src.config_text,
            },
        )
        _set_modes(tmp)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, fmt, src.weights, spec, notes)


def _check_tokenizer_size(spec: str, mcfg: ModelConfig) -> None:
    from ilm_megatron.data.tokenizer import load_tokenizer

    try:
        n = load_tokenizer(spec).vocab_size
    except Exception as e:
        raise ConversionError(f"--tokenizer {spec}: {e}") from None
    if n > mcfg.vocab_size:
        raise ConversionError(
            f"tokenizer {spec} has {n} tokens, the model only {mcfg.vocab_size} (model.vocab_size)"
        )


def _set_modes(folder: Path) -> None:
    from ilm_megatron.train.checkpoint import set_user_mode

    set_user_mode(folder)
    for f in folder.iterdir():
        set_user_mode(f)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved away first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ilm-export",
        description="Convert an ilm-megatron checkpoint into a Hugging Face folder (CPU only).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint folder or .safetensors"
    )
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "ilm", "native"),
        help="auto: native transformers classes for explicit models, ilm (remote code) for "
        "implicit ones",
    )
    p.add_argument(
        "--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the run's)"
    )
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, help="default 5GB")
    p.add_argument("--max-position-embeddings", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ilm-export`` and ``tools/convert_to_hf.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        res = export(
            args.checkpoint,
            args.out,
            args.format,
            args.tokenizer,
            args.max_shard_size,
            args.overwrite,
            args.max_position_embeddings,
        )
    except UserError as e:
        print(f"ilm-export: error: {e}", file=sys.stderr)
        return 2
    for line in res.notes:
        print(f"ilm-export: {line}")
    print(f"ilm-export: wrote {res.out} ({res.format} format) from {res.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
