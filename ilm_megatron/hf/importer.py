"""``ilm-import``: a Hugging Face folder back to an ilm-megatron checkpoint (docs/huggingface.md).

    ilm-import --hf-dir DIR --out DIR [--tp N --pp M] [--implicit] [--eval-data SHARDS]
    ilm-import --hf-dir NATIVE_DIR --compare CHECKPOINT --eval-data SHARDS

Inputs: a folder written by ``ilm-export`` (either format: ``ilm_megatron.json`` restores the
exact model and solver configs, so export -> import -> export is exact), or a transformers
``Mamba2ForCausalLM`` / ``LlamaForCausalLM`` folder such as a public pretrained model.

``--implicit`` initialises an implicit model from an explicit one by this rule: every shared
weight is copied, the injection is zero (``injection.weight = 0``, ``injection.bias = 0``,
``injection_norm.weight = 1``) and the solver starts from the embedding
(``model.iterate_init=embedding``). The first evaluation of ``F`` is then exactly the explicit
model; further iterations move away from it until fine-tuning has learnt the injection. With
``--eval-data`` the tool reports the loss of the explicit model (transformers' own class) and
of the implicit one on the first batches of a shards folder; ``--compare`` reports the same gap
for any checkpoint, e.g. after a fine-tune with ``ilm-train train.init_checkpoint=OUT``.

The output folder holds ``model.safetensors`` (the whole model, which every layout loads and
reshards), the ``config.yaml`` to train it with (``parallel.tp``/``pp`` set and checked) and
``manifest.json``; it is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ilm_megatron.config import (
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    SolverConfig,
    check_layout,
    config_to_yaml,
)
from ilm_megatron.errors import UserError
from ilm_megatron.hf.export import (
    _WN_G,
    _WN_V,
    INDEX,
    SIDE_FILE,
    WEIGHTS,
    ConversionError,
    check_state,
    expected_shapes,
)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    f = hf_dir / "config.json"
    if not f.is_file():
        raise ConversionError(f"{f} is missing (not a Hugging Face model folder)")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index names.

    Raises:
        ConversionError: no weights, a shard missing or unreadable (named).
    """
    from safetensors import safe_open

    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index}: unreadable ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS).is_file():
        weight_map, files = None, [WEIGHTS]
    else:
        raise ConversionError(f"{hf_dir}: no {WEIGHTS} and no {INDEX}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = hf_dir / name
        if not f.is_file():
            raise ConversionError(f"{f} is missing (named by {index.name})")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    state[k] = fh.get_tensor(k)
        except Exception as e:  # truncated or corrupt: safetensors' own error type
            raise ConversionError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(state))
        if lost:
            raise ConversionError(f"{index}: tensor {lost[0]} is not in {weight_map[lost[0]]}")
    return state


def _model_from_native(hf: dict[str, Any]) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "mamba2":
        d, heads, hd = hf["hidden_size"], hf["num_heads"], hf["head_dim"]
        if hf.get("expand", 2) * d != heads * hd:
            raise ConversionError(f"config.json: num_heads*head_dim != expand*hidden_size ({hf})")
        if hf.get("use_bias") or not hf.get("use_conv_bias", True):
            raise ConversionError("config.json: mamba2 with use_bias=true or no conv bias")
        return ModelConfig(
            arch="mamba2",
            implicit=False,
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            d_state=hf["state_size"],
            headdim=hd,
            expand=hf.get("expand", 2),
            ngroups=hf.get("n_groups", 1),
            d_conv=hf.get("conv_kernel", 4),
            chunk_size=hf.get("chunk_size", 256),
        )
    if mt == "llama":
        kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        if kv != hf["num_attention_heads"]:
            raise ConversionError(
                f"config.json: grouped-query attention (num_key_value_heads={kv}) is not "
                "supported; ilm-megatron's Llama uses full multi-head attention"
            )
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConversionError("config.json: llama with attention or MLP biases")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ConversionError(f"config.json: RoPE scaling {rope} is not supported")
        return ModelConfig(
            arch="llama",
            implicit=False,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            n_heads=hf["num_attention_heads"],
            ffn_hidden_size=hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        )
    raise ConversionError(f"config.json: model_type {mt!r} is not supported (ilm, mamba2 or llama)")


def _from_native_names(mcfg: ModelConfig, state: dict[str, torch.Tensor]):
    """transformers' names -> ilm-megatron's (the inverse of ``export.native_state``)."""
    out: dict[str, torch.Tensor] = {}
    if mcfg.arch == "mamba2":
        for k, t in state.items():
            if k == "backbone.embeddings.weight":
                out["embedding.weight"] = t
            elif k == "backbone.norm_f.weight":
                out["stack.final_norm.weight"] = t
            elif k.startswith("backbone.layers."):
                out["stack.layers." + k[len("backbone.layers.") :]] = t
            elif k == "lm_head.weight" and not mcfg.tie_embeddings:
                out[k] = t
        return out
    renames = {
        "input_layernorm.weight": "norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "self_attn.o_proj.weight": "mixer.out_proj.weight",
        "mlp.down_proj.weight": "mlp.fc2.weight",
    }
    for k, t in state.items():
        if k == "model.embed_tokens.weight":
            out["embedding.weight"] = t
        elif k == "model.norm.weight":
            out["stack.final_norm.weight"] = t
        elif k == "lm_head.weight" and not mcfg.tie_embeddings:
            out[k] = t
    for i in range(mcfg.n_layers):
        pre = f"model.layers.{i}."

        def get(name: str, pre: str = pre) -> torch.Tensor:
            if pre + name not in state:
                raise ConversionError(f"tensor {pre + name} is missing")
            return state[pre + name]

        for src, dst in renames.items():
            out[f"stack.layers.{i}.{dst}"] = get(src)
        qkv = [get(f"self_attn.{n}_proj.weight") for n in "qkv"]
        out[f"stack.layers.{i}.mixer.qkv_proj.weight"] = torch.cat(qkv, dim=0)
        fc1 = [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]
        out[f"stack.layers.{i}.mlp.fc1.weight"] = torch.cat(fc1, dim=0)
    return out


def _pad_vocab(mcfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    for k in ("embedding.weight", "lm_head.weight"):
        if k in state and state[k].shape[0] < mcfg.padded_vocab_size:
            t = state[k]
            pad = t.new_zeros(mcfg.padded_vocab_size - t.shape[0], *t.shape[1:])
            state[k] = torch.cat([t, pad], dim=0)


def _unfold_weight_norm(state: dict[str, torch.Tensor], want: dict[str, Any]) -> None:
    """Plain weights -> weight-norm ``(g, v)`` pairs with ``v = w``, ``g = |w|`` per row."""
    for k in list(want):
        if k.endswith(_WN_V):
            base = k[: -len(_WN_V)]
            w = state.pop(base + ".weight")
            state[k] = w
            state[base + _WN_G] = torch.norm_except_dim(w, 2, 0)


def load_hf_folder(
    hf_dir: str | Path, implicit: bool = False, pad_vocab_multiple: int | None = None
) -> tuple[ModelConfig, SolverConfig, dict[str, torch.Tensor], str]:
    """``(model config, solver config, ilm-megatron state dict, what it was)`` of a folder.

    Raises:
        ConversionError: unsupported model type, missing or corrupt weights, or weights whose
            names or shapes do not match the config (named).
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    side = hf_dir / SIDE_FILE
    meta = json.loads(side.read_text()) if side.is_file() else None
    scfg = SolverConfig()
    if meta is not None:  # an ilm-export folder: the exact configs
        try:
            mcfg = ModelConfig(**meta["model"])
            scfg = SolverConfig(**meta["solver"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{side}: unreadable ({e})") from None
        kind = f"ilm-export ({meta.get('export_format')})"
    elif hf.get("model_type") == "ilm":
        keys = {f.name for f in dataclasses.fields(ModelConfig)}
        mcfg = ModelConfig(**{k: v for k, v in hf.items() if k in keys and k != "tie_embeddings"})
        mcfg = dataclasses.replace(mcfg, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        skeys = {f.name for f in dataclasses.fields(SolverConfig)}
        scfg = SolverConfig(**{k: v for k, v in hf.items() if k in skeys})
        kind = "ilm"
    else:
        mcfg = _model_from_native(hf)
        kind = f"transformers {hf.get('model_type')}"
    hf_model_type = hf.get("model_type")
    state = read_hf_weights(hf_dir)
    if hf_model_type in ("mamba2", "llama"):
        state = _from_native_names(mcfg, state)
    if pad_vocab_multiple is not None:
        mcfg = dataclasses.replace(mcfg, pad_vocab_multiple=pad_vocab_multiple)
    _pad_vocab(mcfg, state)
    if implicit and not mcfg.implicit:
        if mcfg.weight_norm:
            raise ConversionError("--implicit needs a model without weight normalisation")
        mcfg = dataclasses.replace(mcfg, implicit=True, iterate_init="embedding")
        want = expected_shapes(mcfg)
        d = mcfg.d_model
        state["injection_norm.weight"] = torch.ones(d)
        state["injection.weight"] = torch.zeros(want["injection.weight"])
        state["injection.bias"] = torch.zeros(want["injection.bias"])
        kind += " -> implicit (zero injection, z0 = embedding)"
    want = expected_shapes(mcfg)
    if mcfg.weight_norm:
        _unfold_weight_norm(state, want)
    check_state(state, want, str(hf_dir))
    return mcfg, scfg, state, kind


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    implicit: bool = False,
    pad_vocab_multiple: int | None = None,
) -> tuple[Config, str]:
    """Write a training checkpoint folder ``out`` from a Hugging Face folder (atomically).

    Returns the config written to ``out/config.yaml`` and a description of the input.
    """
    from ilm_megatron.config import _validate_tensor_parallel
    from ilm_megatron.train.checkpoint import (
        _write_text_atomic,
        save_state_dict,
        set_user_mode,
        write_manifest,
    )

    mcfg, scfg, state, kind = load_hf_folder(hf_dir, implicit, pad_vocab_multiple)
    out = Path(out)
    if out.exists():
        raise ConversionError(f"{out} exists (choose another --out)")
    cfg = Config(model=mcfg, solver=scfg, parallel=ParallelConfig(tp=tp, pp=pp))
    try:
        check_layout(_validate_tensor_parallel(cfg))
        if tp > 1 and (mcfg.nheads % tp or (mcfg.arch == "mamba2" and mcfg.ngroups % tp)):
            raise ConfigError(
                f"parallel.tp={tp} must divide the model's heads ({mcfg.nheads})"
                + (f" and groups ({mcfg.ngroups})" if mcfg.arch == "mamba2" else "")
            )
    except ConfigError as e:
        raise ConversionError(f"--tp {tp} --pp {pp}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        set_user_mode(tmp)
        save_state_dict(state, cfg, tmp / WEIGHTS)
        _write_text_atomic(tmp / "config.yaml", config_to_yaml(cfg))
        write_manifest(tmp, cfg)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cfg, kind


# ------------------------------------------------------------------------------------------
# Loss gap between an explicit transformers model and an implicit checkpoint


def eval_batches(data_dir: str | Path, batches: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``batches * batch_size`` samples of a shards folder as (b, seq_len + 1) ids."""
    from ilm_megatron.data.loader import _ShardReader, load_manifest

    m = load_manifest(data_dir)
    n = min(m.samples, batches * batch_size)
    if n == 0:
        raise ConversionError(f"{data_dir}: no samples")
    reader = _ShardReader(m)
    try:
        rows = [torch.from_numpy(reader.read(i)) for i in range(n)]
    finally:
        reader.close()
    return [torch.stack(rows[i : i + batch_size]) for i in range(0, n, batch_size)]


@torch.no_grad()
def mean_loss(logits_fn, batches: list[torch.Tensor], vocab: int) -> float:
    """Mean next-token cross-entropy (nats) of ``logits_fn(x)`` over the batches."""
    total, count = 0.0, 0
    for b in batches:
        x, y = b[:, :-1], b[:, 1:]
        logits = logits_fn(x)[..., :vocab].float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), reduction="sum"
        ).item()
        count += y.numel()
    return total / count


def loss_gap(
    native_dir: str | Path, checkpoint: str | Path | None, model: Any, batches: list[torch.Tensor]
) -> dict[str, Any]:
    """Loss of transformers' own explicit model in ``native_dir`` and of the implicit model
    (``model``, or loaded from ``checkpoint``) on ``batches``; the gap is implicit - explicit."""
    import transformers

    from ilm_megatron.train.checkpoint import load_model, weights_file

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(native_dir)).float().eval()
    if model is None:
        model = load_model(weights_file(checkpoint))
    model = model.eval()
    vocab = ref.config.vocab_size
    explicit = mean_loss(lambda x: ref(x, use_cache=False).logits, batches, vocab)
    iters: list[float] = []

    def implicit_logits(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        iters.append(out.stats.sample_iters.float().mean().item())
        return out.logits

    implicit = mean_loss(implicit_logits, batches, vocab)
    return {
        "explicit_loss": explicit,
        "implicit_loss": implicit,
        "gap": implicit - explicit,
        "implicit_iters_mean": sum(iters) / len(iters),
        "tokens": sum(b[:, 1:].numel() for b in batches),
        "solver": dataclasses.asdict(model.solver_config),
        "finite": math.isfinite(implicit),
    }


# ------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ilm-import",
        description="Convert a Hugging Face folder into an ilm-megatron checkpoint (CPU only).",
    )
    p.add_argument("--hf-dir", required=True, help="ilm-export folder or a transformers folder")
    p.add_argument("--out", help="the checkpoint folder to write (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train it at")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages to train it at")
    p.add_argument(
        "--implicit",
        action="store_true",
        help="initialise an implicit model from an explicit one (zero injection, z0 = e)",
    )
    p.add_argument("--pad-vocab-multiple", type=int, default=None)
    p.add_argument("--eval-data", help="shards folder: report the loss gap on its first batches")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument(
        "--compare", help="checkpoint to compare with --hf-dir's explicit model (no --out)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ilm-import`` and ``tools/convert_from_hf.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            if not args.eval_data:
                raise ConversionError("--compare needs --eval-data")
            batches = eval_batches(args.eval_data, args.eval_batches, args.eval_batch_size)
            print(json.dumps(loss_gap(args.hf_dir, args.compare, None, batches), indent=2))
            return 0
        if not args.out:
            raise ConversionError("--out is required (or --compare)")
        cfg, kind = import_hf(
            args.hf_dir, args.out, args.tp, args.pp, args.implicit, args.pad_vocab_multiple
        )
        print(f"ilm-import: wrote {args.out} from {args.hf_dir} ({kind})")
        print(
            f"ilm-import: fine-tune with: ilm-train --config {Path(args.out) / 'config.yaml'} "
            f"train.init_checkpoint={args.out} run_dir=RUN data.task=shards data.path=SHARDS"
        )
        if args.eval_data:
            from ilm_megatron.train.checkpoint import load_model

            batches = eval_batches(args.eval_data, args.eval_batches, args.eval_batch_size)
            model = load_model(Path(args.out) / WEIGHTS)
            print(json.dumps(loss_gap(args.hf_dir, None, model, batches), indent=2))
    except (UserError, OSError) as e:
        print(f"ilm-import: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
