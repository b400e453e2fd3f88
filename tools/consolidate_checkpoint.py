"""Join a sharded training checkpoint into one ``model.safetensors`` (and optionally the AdamW
state by name), read in one process at any layout it was written with.

A multi-process ``ilm-train`` run writes each step as ``sharded/`` (every rank its own pieces;
docs/training.md, "Checkpoints"). The tools that take a single file (``ilm-eval``,
``train.init_checkpoint``) need the whole model::

    python tools/consolidate_checkpoint.py runs/x/checkpoints/step-00001000
    python tools/consolidate_checkpoint.py runs/x --out whole.safetensors --optimizer opt.pt

A run directory resolves to its newest checkpoint that verifies (as a resume would). The output
is written atomically (a failure leaves nothing behind); the default is ``model.safetensors``
inside the step folder, beside ``sharded/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import fail


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="consolidate_checkpoint.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("checkpoint", help="a step folder with sharded/, or a run directory")
    p.add_argument("--out", help="output .safetensors (default: <step folder>/model.safetensors)")
    p.add_argument("--optimizer", help="also write AdamW's state by parameter name (torch.save)")
    return p.parse_args(argv)


def _step_folder(path: Path) -> Path:
    from ilm_megatron.train.checkpoint import choose_resume, step_folders

    if (path / "checkpoints").is_dir() and step_folders(path / "checkpoints"):
        choice = choose_resume(path / "checkpoints")
        assert choice.path is not None
        return choice.path
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.checkpoint)
    if not path.is_dir():
        fail("consolidate_checkpoint.py", f"{path} is not a folder")
    from ilm_megatron.errors import UserError
    from ilm_megatron.train.checkpoint import save_state_dict, verify_checkpoint
    from ilm_megatron.train.sharded import consolidate

    t0 = time.perf_counter()
    try:
        folder = _step_folder(path)
        if (folder / "manifest.json").is_file():
            problem = verify_checkpoint(folder)
            if problem is not None:
                fail("consolidate_checkpoint.py", f"checkpoint {folder} is damaged: {problem}")
        weights, adamw, cfg = consolidate(folder)
    except UserError as e:
        fail("consolidate_checkpoint.py", str(e))
    out = Path(args.out) if args.out else folder / "model.safetensors"
    save_state_dict(weights, cfg, out)
    if args.optimizer:
        from ilm_megatron.parallel.checkpoint import atomic_save

        atomic_save(adamw, args.optimizer)
    report = {
        "checkpoint": str(folder),
        "out": str(out),
        "optimizer": args.optimizer,
        "tensors": len(weights),
        "bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
