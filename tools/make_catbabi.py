"""Generate a CatbAbI dataset (all 20 bAbI task types) in the FWM text format.

Writes ``train.txt``, ``valid.txt`` and ``test.txt`` (one story per line: ``task_id<TAB>story``,
lowercase tokens, each question followed by its one-token answer), ``vocab.json`` (tokens in id
order, ``<pad>`` = 0, ``<eos>`` = 1) and ``meta.json`` (arguments and counts). Every file is
written atomically. Each split has its own seed and no story appears in two splits. Unless
``--no-check``, the independent checker (:mod:`ilm_megatron.tasks.catbabi_check`) re-derives every
answer of the written files and the tool fails if one disagrees.

Usage::

    python tools/make_catbabi.py --output data/catbabi --stories 1000 --seed 1 [--tasks 1,2,3]
    # long stories of tasks 1-3 (5 to 40 questions each), for accuracy against story length
    python tools/make_catbabi.py --output data/catbabi-long --stories 1 --eval-stories 150 \
        --tasks 1,2,3 --questions 5,40 --seed 1

Load for training with :func:`ilm_megatron.tasks.catbabi.load_stream` (model ``vocab_size`` =
``len(VOCAB)``). Exit codes: 0 on success, 2 on bad arguments, 1 if the check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ilm_megatron.argtypes import positive_int
from ilm_megatron.tasks.catbabi import (
    ANSWERS,
    LENGTH_TASKS,
    NUM_TASKS,
    VOCAB_FILE,
    check_questions,
    format_story_line,
    generate_splits,
    vocab_json,
)
from ilm_megatron.tasks.catbabi_check import check_story_lines


def task_list(text: str) -> list[int]:
    """argparse type: comma-separated task ids in 1..20, e.g. ``1,2,19``."""
    try:
        tasks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task ids like 1,2,3, got {text!r}") from None
    if not tasks or any(t < 1 or t > NUM_TASKS for t in tasks):
        raise argparse.ArgumentTypeError(f"task ids must be in 1..{NUM_TASKS}, got {text!r}")
    return tasks


def question_range(text: str) -> tuple[int, int]:
    """argparse type: ``LO,HI`` questions per story (or one number for both), e.g. ``5,40``."""
    try:
        parts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 5,40, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return parts[0], parts[1]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="make_catbabi.py", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument("--stories", type=positive_int, required=True, help="train stories per task")
    p.add_argument(
        "--eval-stories",
        type=positive_int,
        default=None,
        help="valid and test stories per task (default: max(1, stories // 9))",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (each split derives its own)")
    p.add_argument("--tasks", type=task_list, default=list(range(1, NUM_TASKS + 1)))
    p.add_argument(
        "--questions",
        type=question_range,
        default=None,
        help="LO,HI: questions per story drawn uniformly in [LO, HI], the story running as long "
        f"as it takes (tasks {','.join(map(str, sorted(LENGTH_TASKS)))} only; default: each "
        "task's own 5). Long stories of one task, for accuracy against story length",
    )
    p.add_argument("--no-check", action="store_true", help="skip the independent answer check")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_questions(args.questions, args.tasks)
    except ValueError as err:
        parser.error(f"--questions: {err}")
    n_eval = args.eval_stories or max(1, args.stories // 9)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_splits(args.stories, n_eval, args.seed, args.tasks, args.questions)
    meta: dict[str, object] = {
        "seed": args.seed,
        "tasks": args.tasks,
        "questions_per_story": list(args.questions) if args.questions else None,
        "stories_per_task": {"train": args.stories, "valid": n_eval, "test": n_eval},
        "format": "task_id<TAB>space-separated tokens; answer = token after '?'",
    }
    counts: dict[str, dict[str, int]] = {}
    for split, stories in splits.items():
        lines = [format_story_line(s) for s in stories]
        if not args.no_check:
            report = check_story_lines(lines)
            bad = [
                (s.task_id, a) for s in stories for a in s.answers if a not in ANSWERS[s.task_id]
            ]
            if not report.ok or bad:
                print(
                    f"make_catbabi.py: check failed on {split}: "
                    f"{report.mismatches[:3]} {report.unparsed[:3]} {bad[:3]}",
                    file=sys.stderr,
                )
                return 1
        _atomic_write_text(out / f"{split}.txt", "".join(line + "\n" for line in lines))
        counts[split] = {
            "stories": len(stories),
            "questions": sum(len(s.answer_positions) for s in stories),
            "tokens": sum(len(s.tokens) + 1 for s in stories),
        }
    meta["counts"] = counts
    _atomic_write_text(out / VOCAB_FILE, json.dumps(vocab_json(), indent=1) + "\n")
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps({"output": str(out), **counts}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
