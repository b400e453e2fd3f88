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
than layers, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EXIT_USAGE, ToolError, check_file, fail  # noqa: E402

from ilm_megatron.argtypes import positive_int  # noqa: E402

PROG = "check_parallel"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, spawn the TP x PP workers, print the comparison."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="model/run YAML")
    ap.add_argument("--tp", type=positive_int, default=2, help="tensor parallel size")
    ap.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    ap.add_argument("--microbatches", type=positive_int, default=1, help="micro-batches per step")
    ap.add_argument(
        "--in-flight", type=positive_int, default=2, help="micro-batches in the ring at once"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=positive_int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=positive_int, default=12)
    ap.add_argument("--init-checkpoint", help="take both models' weights from this checkpoint")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    args = ap.parse_args(argv)
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
        cfg = load_config(
            [cfg_path], [*args.overrides, f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"]
        )
    except ConfigError as e:
        fail(PROG, str(e))
    if args.pp > 1:
        if args.pp > cfg.model.n_layers:
            fail(
                PROG,
                f"--pp {args.pp} is larger than model.n_layers={cfg.model.n_layers}: "
                "every pipeline stage needs at least one layer",
            )
    if args.tp > 1:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="tp"))
    world = args.tp * args.pp
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus >= world else "gloo"

    from ilm_megatron.parallel.compare import compare_parallel, result_ok
    from ilm_megatron.parallel.state import spawn

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
