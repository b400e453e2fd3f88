"""``ilm-eval``: evaluate trained checkpoints on downstream tasks, and the paper's analyses.

    ilm-eval state-tracking --checkpoint RUN_DIR_OR_FILE --lengths 32,64,128,256
                            [--batches N] [--mode simultaneous|sequential] [--json]
    ilm-eval catbabi | lm-eval | ppl-by-position | duality | jacobian | adaptive-compute ...

The analyses live in :mod:`ilm_megatron.analysis` (``docs/analysis.md``).

Each task is a subcommand registered in :data:`SUBCOMMANDS` (``name -> (add_arguments, run)``), so
another task (e.g. ``catbabi``) is added by appending one entry. ``main`` returns the exit code:
0 success, 2 usage or input error (missing checkpoint, bad lengths, wrong group).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ilm_megatron.argtypes import comma_list

PROG = "ilm-eval"


class EvalError(Exception):
    """A user-facing error: printed as ``ilm-eval: error: ...`` with exit code 2."""


#: ``"32,64,128"`` -> ``[32, 64, 128]``; every length must be a positive integer
parse_lengths = comma_list(int, lambda n: n > 0, "positive integers")


# --------------------------------------------------------------------------- state-tracking


def _add_state_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory written by ilm-train, or its model.safetensors",
    )
    p.add_argument("--lengths", type=parse_lengths, default=[32, 64, 128, 256])
    p.add_argument("--batches", type=int, default=4, help="batches per length (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mode", choices=("simultaneous", "sequential"), default="simultaneous")
    p.add_argument(
        "--group",
        default=None,
        help="word problem (S3, S5, A5, A5xR3, ...); default: data.group of the config stored "
        "in the checkpoint",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--easy-frac", type=float, default=0.0)
    p.add_argument(
        "--cap-mult",
        type=float,
        default=2.5,
        help="simultaneous solver cap = max(configured eval cap, ceil(CAP_MULT * length))",
    )
    p.add_argument("--max-iter", type=int, default=0, help="fixed solver cap (overrides the rule)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _run_state_tracking(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ilm_megatron.tasks.state_tracking import (
        EvalSpec,
        evaluate_lengths,
        resolve_checkpoint,
        run_config_group,
    )
    from ilm_megatron.train.checkpoint import load_model

    if args.batches <= 0 or args.batch_size <= 0:
        raise EvalError("--batches and --batch-size must be positive")
    try:
        path, run_dir = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    group, train_len = run_config_group(run_dir, path)
    group = args.group or group
    if group is None:
        raise EvalError(
            f"no word problem known for {args.checkpoint}: no config.yaml of a word-problem run "
            "next to it; pass --group (e.g. --group S5)"
        )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but CUDA is not available")
    try:
        model = load_model(path).to(device)
    except (ValueError, OSError) as e:
        raise EvalError(f"cannot load {path}: {e}") from None
    spec = EvalSpec(
        group=group,
        batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
        easy_frac=args.easy_frac,
        mode=args.mode,
        cap_mult=args.cap_mult,
        max_iter=args.max_iter,
    )
    try:
        rows = evaluate_lengths(model, spec, args.lengths)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return {
        "task": "state-tracking",
        "checkpoint": str(path),
        "group": group,
        "train_length": train_len,
        "model": {
            "arch": model.config.arch,
            "implicit": model.config.implicit,
            "n_layers": model.config.n_layers,
            "d_model": model.config.d_model,
        },
        "mode": args.mode,
        "samples_per_length": args.batches * args.batch_size,
        "rows": rows,
    }


def format_table(rows: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """A fixed-width text table of evaluation rows (``extra`` columns first, e.g. ``model``)."""
    cols = [*extra, "length", "acc_last10", "acc_all", "iters_mean", "iters_max"]
    lines = ["  ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float) and c.startswith("acc"):
                cells.append(f"{v:>10.3f}")
            elif isinstance(v, float):
                cells.append(f"{v:>10.1f}")
            else:
                cells.append(f"{v!s:>10}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _print_state_tracking(result: dict[str, Any]) -> None:
    m = result["model"]
    kind = "implicit" if m["implicit"] else "explicit"
    print(
        f"{result['group']} word problem, {kind} {m['arch']} ({m['n_layers']} layer(s), "
        f"d_model {m['d_model']}), trained at length {result['train_length']}, "
        f"{result['mode']} mode, {result['samples_per_length']} samples per length"
    )
    print(format_table(result["rows"]))


Subcommand = tuple[
    str,
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.Namespace], dict[str, Any]],
    Callable[[dict[str, Any]], None],
]

#: ``(help, add_arguments, run, print_human)`` per subcommand; ``run`` returns a JSON-able dict.
SUBCOMMANDS: dict[str, Subcommand] = {
    "state-tracking": (
        "length generalisation on word problems (S_n, A_n, A5xR3)",
        _add_state_tracking,
        _run_state_tracking,
        _print_state_tracking,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``ilm-eval`` parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a trained checkpoint on a task.")
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (help_text, add, _, _) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ilm-eval``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    warnings.filterwarnings("ignore", module="megatron")
    _, _, run, show = SUBCOMMANDS[args.task]
    from ilm_megatron.errors import UserError

    try:
        result = run(args)
    except (EvalError, UserError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


def _add_catbabi(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir or model.safetensors")
    p.add_argument("--data", required=True, help="folder written by tools/make_catbabi.py")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--seq-len", type=int, default=200, help="window length (200)")
    p.add_argument("--batch-size", type=int, default=1, help="stream rows (test: 1, file order)")
    p.add_argument("--max-windows", type=int, default=0, help="stop after N windows (0: all)")
    p.add_argument(
        "--mode",
        choices=("simultaneous", "sequential"),
        default="simultaneous",
        help="solve each window at once, or token by token (iterations per token)",
    )
    p.add_argument(
        "--length-bins",
        type=comma_list(int, lambda v: v > 0, "increasing positive lengths", increasing=True),
        default=None,
        help="story-length bucket bounds (default 50,100,200,400)",
    )
    p.add_argument("--max-iter", type=int, default=0, help="solver cap (0: the model's eval cap)")
    p.add_argument(
        "--carry-state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry each row's recurrent state from one window to the next (default: as the "
        "run was trained, data.carry_state of its config; off when unknown)",
    )
    p.add_argument("--json", action="store_true")


def run_catbabi(args: argparse.Namespace) -> dict[str, Any]:
    """QA accuracy (answers after ``?``) per task and per story length, with solver iterations.

    Windows are solved in simultaneous mode, each from the state the previous window left on
    its rows (``--carry-state``, the default for runs trained with ``data.carry_state``) or
    from an empty state (``--no-carry-state``); ``carry_state`` in the result says which.
    """
    import torch

    from ilm_megatron.analysis.common import stored_run_config
    from ilm_megatron.tasks.catbabi import AccuracyMeter, iter_batches, load_stream
    from ilm_megatron.tasks.state_tracking import resolve_checkpoint
    from ilm_megatron.train.carry import CarriedState
    from ilm_megatron.train.checkpoint import load_model

    try:
        path, run_dir = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    # the run's data settings: stored with the weights, else the run directory's config.yaml
    stored = stored_run_config(path, run_dir)
    data_cfg = stored.get("data", {}) if stored is not None else {}
    carry_state = args.carry_state
    if carry_state is None:
        carry_state = bool(data_cfg.get("carry_state", False))
    # attention keeps as many previous positions as in training (data.carry_kv_window)
    carry = CarriedState(int(data_cfg.get("carry_kv_window", 0) or args.seq_len))
    try:
        stream = load_stream(args.data, args.split, args.batch_size, args.seq_len)
    except (OSError, ValueError) as e:
        raise EvalError(f"{args.data}: {e}") from None
    model = load_model(path).eval()
    meter = AccuracyMeter(args.length_bins) if args.length_bins else AccuracyMeter()
    iters = []
    cap = args.max_iter or None
    with torch.no_grad():
        for i, batch in enumerate(iter_batches(stream)):
            if args.max_windows and i >= args.max_windows:
                break
            before = carry.get(0) if carry_state else None
            if args.mode == "sequential":  # the caches advance token by token, in place
                caches = before if before is not None else None
                out = model.forward_sequential(batch.x, caches=caches, max_iter=cap)
                it = out.stats.sample_iters.float()  # (b, l): per token
            else:
                out = model(batch.x, max_iter=cap, caches=before, return_caches=carry_state)
                it = out.stats.sample_iters.float()[:, None].expand(batch.x.shape)  # per row
            if carry_state:
                carry.put(0, out.caches)
            meter.update_batch(out.logits[..., : model.config.vocab_size], batch, it)
            iters.append(it.flatten())
    it = torch.cat(iters) if iters else torch.zeros(1)
    res = meter.result()
    if not args.json:  # the printed table does not say it: which mode ran
        how = "carried across windows" if carry_state else "empty at every window"
        print(f"{PROG} catbabi: recurrent state {how}", file=sys.stderr)
    return {
        "task": "catbabi",
        "checkpoint": str(path),
        "split": args.split,
        "carry_state": carry_state,
        "accuracy": res["accuracy"],
        "per_task": res["per_task"],
        "per_length": res["per_length"],
        "iters_per_length": res["iters_per_length"],
        "story_length_mean": res["story_length_mean"],
        "per_task_length": res["per_task_length"],
        "mode": args.mode,
        "answers": res["count"],
        "iters_mean": it.mean().item(),
        "iters_max": it.max().item(),
    }


def _print_catbabi(result: dict[str, Any]) -> None:
    print(f"CatbAbI {result['split']}: accuracy {result['accuracy']:.3f} over "
          f"{result['answers']} answers, solver iterations {result['iters_mean']:.1f}"
          f"/{result['iters_max']:.0f}")  # fmt: skip
    for task, acc in sorted(result["per_task"].items(), key=lambda kv: int(kv[0])):
        print(f"  task {int(task):2d}: {acc:.3f}")
    iters = result.get("iters_per_length", {})
    for bucket, acc in result["per_length"].items():
        extra = f"  iterations {iters[bucket]:.1f}" if bucket in iters else ""
        print(f"  stories {bucket:>6s}: {acc:.3f}{extra}")


SUBCOMMANDS["catbabi"] = (
    "CatbAbI QA accuracy per task and per story length",
    _add_catbabi,
    run_catbabi,
    _print_catbabi,
)


# --------------------------------------------------------------------------- lm-eval


def _override(text: str) -> tuple[str, Any]:
    from ilm_megatron.hf.lm_eval import parse_override

    try:
        return parse_override(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--override {e}") from None


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(
            f"--tasks expects comma-separated task names, got {text!r}"
        )
    return tasks


def _add_lm_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="Hugging Face folder (config.json, weights)")
    p.add_argument(
        "--tasks", required=True, type=_task_list, help="lm-eval tasks, e.g. piqa,arc_easy"
    )
    p.add_argument("--limit", type=int, default=None, help="first N documents per task (all)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None, help="context length (model config)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--output", default=None, help="write the results JSON here (atomically)")
    p.add_argument(
        "--override",
        action="append",
        type=_override,
        default=[],
        metavar="KEY=VALUE",
        help="from_pretrained keyword argument, e.g. f_tol=1e-4 or dtype=float32 (repeatable; "
        "values parsed as int, float, true/false, none or string)",
    )
    p.add_argument("--log-samples", action="store_true", help="keep per-document records")
    p.add_argument("--json", action="store_true", help="print the results JSON")


def _run_lm_eval(args: argparse.Namespace) -> dict[str, Any]:
    """lm-evaluation-harness on a Hugging Face folder (see ``ilm_megatron.hf.lm_eval``)."""
    from pathlib import Path

    from ilm_megatron.errors import UserError
    from ilm_megatron.hf.lm_eval import run_lm_eval

    try:
        return run_lm_eval(
            args.hf_dir,
            args.tasks,
            args.limit,
            args.include_path,
            args.batch_size,
            args.device,
            dict(args.override),
            Path(args.output) if args.output else None,
            log_samples=args.log_samples,
            max_length=args.max_length,
        )
    except UserError as e:
        raise EvalError(str(e)) from None


def _print_lm_eval(result: dict[str, Any]) -> None:
    solver = ", ".join(f"{k}={v}" for k, v in result["solver"].items()) or "none recorded"
    limit = f", first {result['limit']} documents per task" if result["limit"] else ""
    print(f"lm-eval on {result['hf_dir']} ({result['device']}{limit}); solver: {solver}")
    print(f"{'task':<24}  {'metric':<16}  {'value':>8}  {'stderr':>8}")
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")  # lm-eval's keys are "metric,filter"
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{name}_stderr,{filt}")
            err_s = f"{err:8.4f}" if isinstance(err, (int, float)) else f"{'':>8}"
            label = name if filt in ("", "none") else f"{name} ({filt})"
            print(f"{task:<24}  {label:<16}  {value:8.4f}  {err_s}")
    if result.get("output"):
        print(f"results: {result['output']}")


SUBCOMMANDS["lm-eval"] = (
    "lm-evaluation-harness tasks on a Hugging Face folder (an export)",
    _add_lm_eval,
    _run_lm_eval,
    _print_lm_eval,
)


# --------------------------------------------------------------------------- analyses


def _register_analyses() -> None:
    """One subcommand per module of :data:`ilm_megatron.analysis.ANALYSES` (imported here: each
    keeps its heavy imports inside ``run``)."""
    import importlib

    from ilm_megatron.analysis import ANALYSES

    for name, module in ANALYSES.items():
        mod = importlib.import_module(module)
        SUBCOMMANDS[name] = (mod.HELP, mod.add_arguments, mod.run, mod.show)


_register_analyses()


if __name__ == "__main__":
    sys.exit(main())
