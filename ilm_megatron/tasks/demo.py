"""``ilm-demo``: implicit vs explicit Mamba2 on a non-abelian word problem, on a CPU.

    ilm-demo [--out DIR] [--quick] [--group S3] [--train-length 16] [--steps 300] [--mults 1,2,4,8]

Trains a small implicit Mamba2 (one layer iterated to a fixed point) and a small explicit Mamba2
(two layers, one pass) on the S3 word problem at length ``L``, evaluates both at ``L, 2L, 4L, 8L``
(``--mults``), prints a table and writes into ``--out``::

    results.json          {"task", "train_length", "rows": [{"model", "length", "acc_last10",
                           "acc_all", "iters_mean", ...}], ...}
    length_generalization.png   accuracy and solver iterations vs length
    implicit/, explicit/  ilm-train run directories (config.yaml, metrics.jsonl, model.safetensors,
                          tensorboard/ with the training curves, the eval scalars and the plot)

The model settings are those of ``configs/tasks/demo_s3_{implicit,explicit}_mamba2.yaml``
(``demo_config`` builds the same configs in code so the demo runs from an installed package).
``--quick`` is a pipeline check for CI: a few steps on short sequences, seconds to a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilm_megatron.tasks.eval import parse_lengths

PROG = "ilm-demo"

# Shared by both models; the two differ only in the ``model`` section.
_COMMON = {
    "solver": {"f_max_iter": 24, "f_tol": 0.05, "phantom_steps": 4, "phantom_damping": 0.8},
    "train": {
        "max_steps": 300,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_steps": 20,
        "clip_grad": 0.25,
        "beta2": 0.95,
        "log_interval": 25,
        "eval_batches": 2,
        "seed": 1234,
        "device": "cpu",
        "resume": False,
        "tensorboard": True,
    },
    "data": {"task": "word_problem", "group": "S3", "seq_len": 16, "eval_seq_len": 0},
}
_MODELS = {
    "implicit": {
        "arch": "mamba2",
        "implicit": True,
        "vocab_size": 6,
        "d_model": 64,
        "n_layers": 1,
        "d_state": 16,
        "headdim": 16,
        "expand": 2,
        "chunk_size": 64,
    },
    "explicit": {
        "arch": "mamba2",
        "implicit": False,
        "vocab_size": 6,
        "d_model": 64,
        "n_layers": 2,
        "d_state": 16,
        "headdim": 16,
        "expand": 2,
        "chunk_size": 64,
    },
}


class DemoInterruptedError(RuntimeError):
    """Training was stopped by a signal (SIGTERM/SIGINT) before it finished."""


def demo_config(kind: str, quick: bool = False, overrides: Sequence[str] = ()) -> Any:
    """The :class:`~ilm_megatron.config.Config` of the demo's ``implicit`` or ``explicit`` model.

    ``quick`` shrinks model and schedule to a pipeline check (d_model 32, length 8, 6 steps).
    """
    from omegaconf import OmegaConf

    from ilm_megatron.config import Config, load_config

    if kind not in _MODELS:
        raise ValueError(f"kind must be one of {list(_MODELS)}, got {kind!r}")
    sections = {"model": dict(_MODELS[kind]), **{k: dict(v) for k, v in _COMMON.items()}}
    base = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config()), sections))
    assert isinstance(base, Config)
    extra = list(overrides)
    if quick:
        extra = [
            "model.d_model=32",
            "model.headdim=8",
            "model.d_state=8",
            "solver.f_max_iter=8",
            "solver.phantom_steps=2",
            "train.max_steps=6",
            "train.batch_size=16",
            "train.warmup_steps=2",
            "train.log_interval=3",
            "train.eval_batches=1",
            "data.seq_len=8",
            *extra,
        ]
    return load_config((), extra, base=base)


def _log_to_tensorboard(run_dir: Path, rows: list[dict[str, Any]], image: Any) -> None:
    """Eval scalars (step = sequence length) and the plot into ``run_dir/tensorboard``."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    try:
        for r in rows:
            for key in ("acc_last10", "acc_all", "iters_mean"):
                w.add_scalar(f"length_generalization/{key}", r[key], r["length"])
        if image is not None:
            w.add_image("length_generalization/plot", image, 0, dataformats="HWC")
    finally:
        w.close()


def run_demo(
    out: Path,
    quick: bool = False,
    group: str = "S3",
    train_length: int | None = None,
    steps: int | None = None,
    mults: Sequence[int] | None = None,
    eval_batches: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train both models, evaluate, plot and write ``out/results.json``; returns the results."""
    from ilm_megatron.data.word_problem import group_order
    from ilm_megatron.tasks import plots
    from ilm_megatron.tasks.eval import format_table
    from ilm_megatron.tasks.state_tracking import EvalSpec, evaluate_lengths
    from ilm_megatron.train.loop import train

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"data.group={group}", f"model.vocab_size={group_order(group)}"]
    if train_length:
        overrides.append(f"data.seq_len={train_length}")
    if steps:
        overrides.append(f"train.max_steps={steps}")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    rows: list[dict[str, Any]] = []
    per_model: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    cfg = None
    for kind in ("implicit", "explicit"):
        cfg = demo_config(kind, quick, overrides)
        run_dir = out / kind
        L = cfg.data.seq_len
        lengths = [m * L for m in (mults or ([1, 2, 4] if quick else [1, 2, 4, 8]))]
        say(f"{PROG}: training the {kind} model ({cfg.train.max_steps} steps, length {L}) ...")
        t0 = time.perf_counter()
        res = train(cfg, run_dir, quiet=quiet)
        if "preempted" in res.final:
            raise DemoInterruptedError(
                f"{kind} training stopped by {res.final['preempted']} at step "
                f"{res.final['step']}; checkpoint in {run_dir / 'checkpoints'}"
            )
        timings[f"train_{kind}_s"] = time.perf_counter() - t0
        from ilm_megatron.train.checkpoint import load_model

        model = load_model(run_dir / "model.safetensors")
        spec = EvalSpec(
            group=group,
            batches=eval_batches or (1 if quick else 2),
            batch_size=8 if quick else 64,
            seed=cfg.train.seed + 7,
        )
        say(f"{PROG}: evaluating the {kind} model at lengths {lengths} ...")
        t0 = time.perf_counter()
        evals = evaluate_lengths(model, spec, lengths)
        timings[f"eval_{kind}_s"] = time.perf_counter() - t0
        per_model[kind] = [{"model": kind, **r} for r in evals]
        rows.extend(per_model[kind])
    assert cfg is not None
    L = cfg.data.seq_len
    png = out / "length_generalization.png"
    image = None
    plot_note = str(png)
    try:
        fig = plots.plot_length_generalization(
            rows,
            png,
            title=f"{group} word problem, trained at length {L}",
            train_length=L,
            chance=1.0 / group_order(group),
        )
        image = plots.figure_to_array(fig)
        plots.close(fig)
    except plots.PlotUnavailableError as e:
        plot_note = f"not written ({e})"
        png = None
    for kind, krows in per_model.items():
        _log_to_tensorboard(out / kind, krows, image)
    wall = time.perf_counter() - t_start
    result = {
        "task": f"word_problem/{group}",
        "train_length": L,
        "quick": quick,
        "rows": rows,
        "wall_s": wall,
        "timings_s": timings,
        "plot": str(png) if png else None,
        "run_dirs": {k: str(out / k) for k in per_model},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    say("")
    say(format_table(rows, extra=("model",)))
    say("")
    say(f"{PROG}: done in {wall:.0f} s")
    say(f"  results:     {out / 'results.json'}")
    say(f"  plot:        {plot_note}")
    for kind in per_model:
        say(f"  {kind + ':':12} {out / kind}  (model.safetensors, metrics.jsonl, tensorboard/)")
    say(f"  tensorboard --logdir {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ilm-demo``; returns the process exit code."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Implicit vs explicit Mamba2 on a word problem: train, evaluate at longer "
        "lengths, plot.",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo-*)")
    p.add_argument("--quick", action="store_true", help="a few steps: pipeline check for CI")
    p.add_argument("--group", default="S3", help="word problem (default S3)")
    p.add_argument("--train-length", type=int, default=None, help="default 16 (8 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument(
        "--mults",
        type=parse_lengths,
        default=None,
        help="evaluate at these multiples of the train length (default 1,2,4,8; --quick 1,2,4)",
    )
    p.add_argument(
        "--eval-batches", type=int, default=None, help="batches of 64 per length (default 2)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for these tiny models, steadiest on busy "
        "cores; 0 keeps torch's default)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")
    out = args.out or Path("runs") / f"demo-state-tracking-{time.strftime('%Y%m%d-%H%M%S')}"
    import torch

    from ilm_megatron.config import ConfigError

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        run_demo(
            out,
            quick=args.quick,
            group=args.group,
            train_length=args.train_length,
            steps=args.steps,
            mults=args.mults,
            eval_batches=args.eval_batches,
            quiet=args.quiet,
        )
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except DemoInterruptedError as e:
        print(f"{PROG}: interrupted: {e}", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
