"""``ilm-train``: train a model from a config.

    ilm-train [--config FILE ...] [key=value ...]

With no arguments it trains the built-in default: a tiny implicit Mamba2 on the S3 word problem,
on the CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

from ilm_megatron.config import ConfigError, load_config
from ilm_megatron.errors import RunError, UserError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ilm-train",
        description="Train an implicit (or explicit) Mamba2/Llama model.",
        epilog="Overrides are dotted keys, e.g. solver.f_max_iter=32 train.max_steps=100",
    )
    p.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no per-step console lines")
    p.add_argument(  # the deepspeed launcher may add it; LOCAL_RANK in the environment rules
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)  # flags may come between overrides


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def report_error(prog: str, e: BaseException, kind: str = "error") -> int:
    """One line on stderr naming the culprit, and exit status 2. Errors every rank raises alike
    (a config value, a run directory check) are printed by rank 0 only; others say their rank.
    ``ILM_DEBUG=1`` prints the traceback as well."""
    if os.environ.get("ILM_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
    same_everywhere = isinstance(e, (ConfigError, RunError))
    if _rank() == 0:
        print(f"{prog}: {kind}: {e}", file=sys.stderr, flush=True)
    elif not same_everywhere:
        print(f"{prog}: {kind} on rank {_rank()}: {e}", file=sys.stderr, flush=True)
    else:  # the launcher stops every rank when the first exits: let rank 0 print first
        time.sleep(3.0)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return report_error("ilm-train", e, "config error")
    warnings.filterwarnings("ignore", module="megatron")
    from ilm_megatron.train.loop import default_run_dir, train

    try:
        train(cfg, default_run_dir(cfg), quiet=args.quiet)
    except (UserError, ValueError, OSError, FloatingPointError) as e:
        # a user's input, files or run directory (internal errors keep their traceback)
        return report_error("ilm-train", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
