"""CatbAbI accuracy and solver iterations against story length (the paper's Figure 13 c, d).

Runs ``ilm-eval catbabi`` (the same parser and code) on each ``--run NAME=RUN_DIR`` over one
CatbAbI split, with the state carried across windows as each run was trained, and writes::

    {"data", "split", "seq_len", "mode", "length_bins", "rows": [{"model", "story_length",
     "bucket", "accuracy", "iters_mean", "answers"}], "task_rows": [{"model", "task", ...the
     same keys}], "runs": {NAME: ilm-eval's result}, "machine", "date"}

``story_length`` is the mean story length of the answers in the bucket. ``task_rows`` holds the
same buckets for each task alone: with several tasks, story length and task are confounded (each
task has its own range of lengths), and only the per-task rows show what length alone does. With
``--plot``, two panels: accuracy and mean iterations against story length, one line per run (per
run and task with ``--plot-tasks``). Extra arguments
after ``--`` go to ``ilm-eval catbabi`` unchanged (e.g. ``-- --max-windows 50``). Usage::

    python tools/bench_catbabi.py --run implicit=runs/catbabi-implicit \\
        --run explicit=runs/catbabi-explicit --data data/catbabi --seq-len 128 \\
        --length-bins 200,300,400,500,600,800,1000 --output docs/benchmarks/catbabi_cpu.json \\
        --plot docs/benchmarks/catbabi_cpu.png --plot-tasks
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import emit_report, fail, machine_info, now_iso

from ilm_megatron.tasks.eval import build_parser, run_catbabi

PROG = "bench_catbabi.py"


def _run(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"--run expects NAME=RUN_DIR, got {text!r}")
    return name, path


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=_run, action="append", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--data", required=True, help="folder written by tools/make_catbabi.py")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--seq-len", default="200", help="window length (200)")
    p.add_argument("--length-bins", default="50,100,200,400", help="story-length bucket bounds")
    p.add_argument("--mode", choices=("simultaneous", "sequential"), default="simultaneous")
    p.add_argument("--output", default=None, help="write the JSON here (atomically)")
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument(
        "--plot-tasks", action="store_true", help="plot one line per run and task (task_rows)"
    )
    p.add_argument("--json", action="store_true", help="print the JSON report")
    return p.parse_args(argv), extra


def evaluate(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """``ilm-eval catbabi`` on every run; the rows of the report."""
    from ilm_megatron.errors import UserError
    from ilm_megatron.tasks.eval import EvalError

    parser = build_parser()
    rows, task_rows, runs = [], [], {}
    for name, path in args.run:
        cli = ["catbabi", "--checkpoint", path, "--data", args.data, "--split", args.split,
               "--seq-len", args.seq_len, "--length-bins", args.length_bins, "--mode", args.mode,
               "--json", *extra]  # fmt: skip
        try:
            res = run_catbabi(parser.parse_args(cli))
        except SystemExit:  # argparse already printed the usage error
            fail(PROG, f"bad arguments for ilm-eval catbabi: {' '.join(cli)}")
        except (EvalError, UserError) as e:
            fail(PROG, f"--run {name}={path}: {e}")
        runs[name] = res
        iters = res["iters_per_length"]
        for bucket, acc in res["per_length"].items():
            rows.append(
                {
                    "model": name,
                    "story_length": res["story_length_mean"][bucket],
                    "bucket": bucket,
                    "accuracy": acc,
                    "iters_mean": iters[bucket],
                    "answers": sum(
                        b[bucket]["answers"] for b in res["per_task_length"].values() if bucket in b
                    ),
                }
            )
        for task, buckets in res["per_task_length"].items():
            for bucket, cell in buckets.items():
                task_rows.append(
                    {
                        "model": name,
                        "task": int(task),
                        "story_length": cell["story_length_mean"],
                        "bucket": bucket,
                        "accuracy": cell["accuracy"],
                        "iters_mean": cell["iters_mean"],
                        "answers": cell["answers"],
                    }
                )
        print(f"{name}: accuracy {res['accuracy']:.3f} over {res['answers']} answers, "
              f"carry_state={res['carry_state']}", file=sys.stderr)  # fmt: skip
    return {
        "data": args.data,
        "split": args.split,
        "seq_len": int(args.seq_len),
        "mode": args.mode,
        "length_bins": [int(b) for b in args.length_bins.split(",")],
        "rows": rows,
        "task_rows": task_rows,
        "runs": runs,
        "machine": machine_info(),
        "date": now_iso(),
    }


def plot(report: dict[str, Any], path: Path, by_task: bool = False) -> None:
    """Accuracy and mean solver iterations against story length, one line per run (per run and
    task with ``by_task``: one colour per run, one line style per task)."""
    from ilm_megatron.tasks.plots import close, pyplot

    plt = pyplot()
    fig, (ax_acc, ax_it) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    rows = report["task_rows"] if by_task else report["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = sorted({r["task"] for r in rows}) if by_task else [None]
    styles = ("-", "--", ":", "-.")
    for m, name in enumerate(models):
        for t, task in enumerate(tasks):
            pts = sorted((r["story_length"], r["accuracy"], r["iters_mean"]) for r in rows
                         if r["model"] == name and r.get("task") == task)  # fmt: skip
            if not pts:
                continue
            kw = {"color": f"C{m}", "ls": styles[t % len(styles)], "marker": "o",
                  "label": name if task is None else f"{name}, task {task}"}  # fmt: skip
            ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
            ax_it.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("answer accuracy")
    ax_it.set_ylabel("solver iterations (mean over answers)")
    for ax in (ax_acc, ax_it):
        ax.set_xlabel("story length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"CatbAbI {report['split']}: accuracy and iterations against story length")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    report = evaluate(args, extra)
    if args.plot:
        plot(report, Path(args.plot), by_task=args.plot_tasks)
    emit_report(report, args.output, show=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
