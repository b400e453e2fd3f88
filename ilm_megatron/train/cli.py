"""``ilm-train``: train a model from a config.

    ilm-train [--config FILE ...] [key=value ...]

With no arguments it trains the built-in default: a tiny implicit Mamba2 on the S3 word problem,
on the CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from ilm_megatron.config import ConfigError, load_config


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ilm-train: config error: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module="megatron")
    from ilm_megatron.train.loop import default_run_dir, train

    train(cfg, default_run_dir(cfg), quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
