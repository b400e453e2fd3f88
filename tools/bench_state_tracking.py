"""Word-problem accuracy of trained models over lengths and hard-token fractions (D_p protocol).

The paper trains on words where each token is the identity with probability ``1 - p`` (a
fraction ``p`` of "hard" tokens) and evaluates at more hard tokens and longer lengths. This tool
evaluates each ``--run NAME=RUN_DIR`` at every ``--lengths`` x ``--hard-fractions`` point
(``ilm_megatron.tasks.state_tracking.evaluate_length`` with ``easy_frac = 1 - p``) and writes::

    {"group", "train_length", "train_hard_fraction", "rows": [{"model", "length",
     "hard_fraction", "acc_last10", "acc_all", "iters_mean", "iters_max", "converged_frac",
     "cap"}], "mode", "samples_per_point", "machine", "date"}

plus, with ``--plot``, last-10 accuracy against length, one line per model and hard fraction.
Usage::

    python tools/bench_state_tracking.py --run implicit=runs/s5-implicit \\
        --run explicit=runs/s5-explicit --lengths 32,64,128 --hard-fractions 0.1,0.25,0.5 \\
        --output docs/benchmarks/s5_cpu.json --plot docs/benchmarks/s5_cpu.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import emit_report, fail, machine_info, now_iso, positive_int

from ilm_megatron.argtypes import comma_list
from ilm_megatron.tasks.eval import parse_lengths

PROG = "bench_state_tracking.py"
#: argparse type of ``--hard-fractions``: at least one token in a word problem may be hard
hard_fractions = comma_list(float, lambda v: 0 < v <= 1, "hard fractions in (0, 1]")


def _run(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"--run expects NAME=RUN_DIR, got {text!r}")
    return name, path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=_run, action="append", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--lengths", type=parse_lengths, default=[32, 64, 128])
    p.add_argument("--hard-fractions", type=hard_fractions, default=[0.1, 0.25, 0.5])
    p.add_argument("--batches", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--mode", choices=("simultaneous", "sequential"), default="simultaneous")
    p.add_argument("--cap-mult", type=float, default=2.5, help="simultaneous cap = mult x length")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default=None, help="write the JSON here (atomically)")
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    return p.parse_args(argv)


def evaluate_runs(args: argparse.Namespace) -> dict[str, Any]:
    """Every run at every point of the grid (see the module docstring)."""
    from ilm_megatron.analysis.common import stored_run_config
    from ilm_megatron.tasks.state_tracking import (
        EvalSpec,
        evaluate_length,
        resolve_checkpoint,
        run_config_group,
    )
    from ilm_megatron.train.checkpoint import load_model

    rows: list[dict[str, Any]] = []
    groups, lengths, easy = set(), set(), set()
    for name, path in args.run:
        try:
            ckpt, run_dir = resolve_checkpoint(path)
            model = load_model(ckpt)
        except (FileNotFoundError, ValueError, OSError) as e:
            fail(PROG, f"--run {name}={path}: {e}")
        group, train_len = run_config_group(run_dir, ckpt)
        if group is None:
            fail(PROG, f"--run {name}={path}: not a word-problem run (no data.group)")
        groups.add(group)
        lengths.add(train_len)
        stored = stored_run_config(ckpt, run_dir)
        if stored is not None:
            easy.add(stored.get("data", {}).get("easy_frac", 0.0))
        for p in args.hard_fractions:
            spec = EvalSpec(
                group=group,
                batches=args.batches,
                batch_size=args.batch_size,
                seed=args.seed,
                easy_frac=1.0 - p,
                mode=args.mode,
                cap_mult=args.cap_mult,
            )
            for n in args.lengths:
                r = evaluate_length(model, spec, n)
                rows.append({"model": name, "hard_fraction": p, **r})
                print(
                    f"{name:>10} L={n:<4} hard={p:<5} acc_last10 {r['acc_last10']:.3f} "
                    f"acc_all {r['acc_all']:.3f} iters {r['iters_mean']:.1f}",
                    file=sys.stderr,
                )
    if len(groups) != 1:
        fail(PROG, f"the runs are on different word problems: {sorted(groups)}")
    return {
        "group": groups.pop(),
        "train_length": sorted(lengths)[0] if len(lengths) == 1 else sorted(lengths),
        "train_hard_fraction": [round(1 - e, 6) for e in sorted(easy)],
        "mode": args.mode,
        "samples_per_point": args.batches * args.batch_size,
        "rows": rows,
        "machine": machine_info(),
        "date": now_iso(),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Last-10 accuracy and mean iterations against length, a line per model and fraction."""
    from ilm_megatron.tasks.plots import close, plot_length_generalization

    rows = [
        {**r, "model": f"{r['model']} p={r['hard_fraction']}"}
        for r in report["rows"]
    ]  # fmt: skip
    train = report["train_length"] if isinstance(report["train_length"], int) else None
    fig = plot_length_generalization(
        rows, path, title=f"{report['group']} word problem", train_length=train
    )
    close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = evaluate_runs(args)
    if args.plot:
        plot(report, Path(args.plot))
    emit_report(report, args.output, show=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
