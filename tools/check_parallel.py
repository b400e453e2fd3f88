"""Compare a TP x PP run with the single-process model on this machine.

```
python tools/check_parallel.py --config configs/models/implicit_llama_tiny.yaml --tp 2 --json
python tools/check_parallel.py --config configs/models/implicit_mamba2_tiny.yaml \
    --tp 2 --pp 2 --microbatches 2 --json model.ngroups=2
```
Spawns ``--tp * --pp`` local processes (gloo on CPU, NCCL when there are enough GPUs) in
Megatron's layout (a TP group inside each pipeline stage). Each builds the single-process model
from ``--seed`` and the parallel model (its TP shard, split into its pipeline stage), runs
``--microbatches`` micro-batches of training (solve + phantom steps + backward; through the ring
schedule when ``--pp > 1``) and compares with the single-process model run micro-batch by
micro-batch: training-mode logits, losses, every parameter gradient, solver iteration counts on
every rank; then a checkpoint saved from the parallel run is loaded into a single-process model
(identical logits). With ``--init-checkpoint`` both models take their weights from that file (e.g.
one saved at another TP size). With ``--pp 1`` eval logits and sequential decoding are compared
too (``null`` in the JSON otherwise). See :mod:`ilm_megatron.parallel.compare`.

Prints ``max_abs_logit_diff``, ``max_rel_grad_diff``, ``loss_diff``, ``iters_equal`` and the other
diffs. Exit status 0 when every diff is below ``--tol`` and the iteration counts agree, 1
otherwise, 2 for usage errors (bad config, TP size not dividing the sharded dimensions, more stages
than layers, a flag contradicting an override, ...).

Flags and config keys: ``--tp``, ``--pp``, ``--microbatches``, ``--seed`` and ``--seq-len`` stand
for ``parallel.tp``, ``parallel.pp``, ``parallel.microbatches``, ``train.seed`` and
``data.seq_len``, and ``--batch`` x ``--microbatches`` for ``train.batch_size``. A command-line
override of such a key sets the value as the flag would; giving both with different values is
refused. Without either the flag's default applies (the config file's values of these keys are
not used).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EXIT_USAGE, ToolError, check_file, fail  # noqa: E402

from ilm_megatron.argtypes import non_negative_int, positive_int  # noqa: E402

PROG = "check_parallel"

# flags that stand for config keys: (flag, argparse attribute, config key, default)
DUPLICATES = (
    ("--tp", "tp", "parallel.tp", 2),
    ("--pp", "pp", "parallel.pp", 1),
    ("--microbatches", "microbatches", "parallel.microbatches", 1),
    ("--seed", "seed", "train.seed", 1234),
    ("--seq-len", "seq_len", "data.seq_len", 12),
)
DEFAULT_BATCH = 2

EPILOG = """\
flags and config keys: --tp, --pp, --microbatches, --seed and --seq-len stand for parallel.tp,
parallel.pp, parallel.microbatches, train.seed and data.seq_len; --batch x --microbatches for
train.batch_size. An override of such a key (parallel.tp=4) sets the value as the flag would;
a flag and an override with different values are refused (exit 2). Without either the flag's
default applies; the config file's values of these keys are not used.
"""


def override_values(overrides: list[str]) -> dict[str, Any]:
    """The values the command-line overrides give to the keys the flags stand for (the last one
    wins), as parsed by OmegaConf.

    Raises:
        ToolError: such a value is not an integer.
    """
    from omegaconf import OmegaConf

    keys = {key for _, _, key, _ in DUPLICATES} | {"train.batch_size", "train.global_batch_tokens"}
    out: dict[str, Any] = {}
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if "=" not in ov or key not in keys:
            continue
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([ov]), key)
        except Exception as e:  # unparsable: load_config names it
            raise ToolError(f"cannot parse override {ov!r}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ToolError(f"override {ov!r}: {key} expects int, got {value!r}")
        out[key] = value
    return out


def resolve_flags(args: argparse.Namespace, given: dict[str, Any]) -> None:
    """Fill the flags that stand for config keys in ``args``: the flag, else the override
    (``given``, from :func:`override_values`), else the default.

    Raises:
        ToolError: a flag and an override of its key disagree, ``train.batch_size`` does not split
            into the micro-batches, or ``train.global_batch_tokens`` is given (not used here).
    """
    for flag, attr, key, default in DUPLICATES:
        value = getattr(args, attr)
        if key in given:
            if value is not None and value != given[key]:
                raise ToolError(
                    f"{flag} {value} conflicts with the override {key}={given[key]}: "
                    "give one of them"
                )
            value = given[key]
        setattr(args, attr, default if value is None else value)
    if "train.global_batch_tokens" in given:
        raise ToolError(
            "train.global_batch_tokens is not used here: the batch is --batch x --microbatches "
            "sequences (or train.batch_size)"
        )
    mb = args.microbatches
    if "train.batch_size" in given:
        total = given["train.batch_size"]
        if args.batch is not None and args.batch * mb != total:
            raise ToolError(
                f"--batch {args.batch} x {mb} micro-batch(es) conflicts with the override "
                f"train.batch_size={total}: give one of them"
            )
        if total < 1 or total % mb:
            raise ToolError(f"train.batch_size={total} does not split into {mb} micro-batch(es)")
        args.batch = total // mb
    elif args.batch is None:
        args.batch = DEFAULT_BATCH


def flag_overrides(args: argparse.Namespace, pp: int | None = None) -> list[str]:
    """The resolved flags as overrides, so that the config records what runs (``pp`` instead of
    ``args.pp`` when given)."""
    return [
        f"parallel.tp={args.tp}",
        f"parallel.pp={args.pp if pp is None else pp}",
        f"parallel.microbatches={args.microbatches}",
        f"train.seed={args.seed}",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch * args.microbatches}",
        "train.global_batch_tokens=0",
    ] + (["parallel.sequence_parallel=true"] if args.sequence_parallel else [])


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (flags that stand for config keys default to ``None``: see
    :func:`resolve_flags`)."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="model/run YAML")
    ap.add_argument(
        "--tp", type=positive_int, default=None, help="tensor parallel size (parallel.tp; 2)"
    )
    ap.add_argument(
        "--pp", type=positive_int, default=None, help="pipeline parallel size (parallel.pp; 1)"
    )
    ap.add_argument(
        "--microbatches",
        type=positive_int,
        default=None,
        help="micro-batches per step (parallel.microbatches; 1)",
    )
    ap.add_argument(
        "--in-flight", type=positive_int, default=2, help="micro-batches in the ring at once"
    )
    ap.add_argument(
        "--seed", type=non_negative_int, default=None, help="weights and data (train.seed; 1234)"
    )
    ap.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help=f"sequences per micro-batch (train.batch_size / micro-batches; {DEFAULT_BATCH})",
    )
    ap.add_argument(
        "--seq-len", type=positive_int, default=None, help="tokens per sequence (data.seq_len; 12)"
    )
    ap.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="norms, residual stream and iterate split along the sequence over TP "
        "(parallel.sequence_parallel=true)",
    )
    ap.add_argument("--init-checkpoint", help="take both models' weights from this checkpoint")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, spawn the TP x PP workers, print the comparison."""
    args = build_parser().parse_args(argv)
    try:
        cfg_path = check_file(args.config, "config")
        init = None
        if args.init_checkpoint is not None:
            init = str(check_file(args.init_checkpoint, "init checkpoint").resolve())
    except ToolError as e:
        fail(PROG, str(e))

    import torch

    from ilm_megatron.config import ConfigError, load_config

    try:
        pp_flag = args.pp is not None
        resolve_flags(args, override_values(args.overrides))
        if pp_flag:  # name the flag (an override is named by load_config)
            single = load_config([cfg_path], [*args.overrides, *flag_overrides(args, pp=1)])
            n_layers = single.model.n_layers
            if args.pp > n_layers:
                raise ToolError(
                    f"--pp {args.pp} is larger than model.n_layers={n_layers}: "
                    "every pipeline stage needs at least one layer"
                )
        cfg = load_config([cfg_path], [*args.overrides, *flag_overrides(args)])
    except (ConfigError, ToolError) as e:
        fail(PROG, str(e))
    if args.tp > 1:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="tp"))
    world = args.tp * args.pp
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus >= world else "gloo"

    from ilm_megatron.core.parallel_state import spawn
    from ilm_megatron.parallel.compare import compare_parallel, result_ok

    with tempfile.TemporaryDirectory() as tmp:
        res, ckpt = Path(tmp) / "result.json", Path(tmp) / "ckpt.pt"
        spawn(
            compare_parallel,
            world,
            args=(
                cfg,
                args.seed,
                str(res),
                str(ckpt),
                args.batch,
                args.seq_len,
                args.microbatches,
                init,
                args.in_flight,
            ),
            tp=args.tp,
            pp=args.pp,
            backend=backend,
        )
        result = json.loads(res.read_text())
    result["backend"] = backend
    ok = result_ok(result, args.tol)
    result["ok"] = bool(ok)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(EXIT_USAGE)
