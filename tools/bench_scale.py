"""Memory per rank and checkpoint cost of a ~100M-parameter model at PP=2 and TP=2 x PP=2.

Each layout runs under torchrun on CPU (gloo); every rank builds the training engine of
``ilm-train`` for a Mamba2 of about 100M parameters (small vocabulary, so weights and AdamW
dominate), trains one step, saves a checkpoint and loads it back. Per rank it reports
(docs/benchmarks/scale_cpu.md):

* ``rss_model_bytes``: resident memory added by building the engine and one step (``VmHWM``, the
  kernel's peak resident set, after minus before; weights, gradients and AdamW moments, the
  step's few activations at batch 2 x 16);
* ``params_bytes``: the fp32 parameters the rank trains, ``plan_params_bytes`` what
  ``tools/plan_memory.py`` predicts for it on ``meta``; ``state_bytes``: those plus AdamW's
  state, counted from the rank's tensors;
* ``save_s`` / ``load_s``: wall time of ``engine.save`` and of ``engine.setup`` from it;
* ``written_bytes``: the bytes of the step folder this rank wrote.

``ratio`` is the largest rank's ``rss_model_bytes`` over the one-process run's and
``state_ratio`` the same for ``state_bytes``, against the ideal ``1 / (tp * pp)`` (target: at
most 1.1 times it). ``--repo DIR`` runs the same workers on
another checkout (``PYTHONPATH``), e.g. an older commit for before/after numbers::

    python tools/bench_scale.py --json --output docs/benchmarks/scale_cpu.json
    git worktree add /tmp/old <commit> && python tools/bench_scale.py --repo /tmp/old --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, emit_report, machine_info, now_iso

MODEL = [
    "model.arch=mamba2",
    "model.implicit=true",
    "model.vocab_size=4096",
    "model.pad_vocab_multiple=16",
    "model.d_model=768",
    "model.n_layers=24",
    "model.d_state=64",
    "model.headdim=64",
    "model.ngroups=2",
    "data.seq_len=16",
    "data.eval_seq_len=0",
    "train.batch_size=2",
    "train.device=cpu",
    "train.tensorboard=false",
    "solver.f_max_iter=2",
    "solver.phantom_steps=1",
]
LAYOUTS = {"one": (1, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--repo", default=str(REPO_ROOT), help="checkout whose package is measured")
    p.add_argument("--json", action="store_true")
    p.add_argument("--output")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a rank's result folder
    p.add_argument("overrides", nargs="*", help="extra config overrides")
    return p.parse_args(argv)


def _vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    """Restart the kernel's peak-RSS counter at the current RSS (``echo 5 > clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(out: Path, overrides: list[str]) -> None:
    """One rank: engine, one step, save, load; writes ``rank-R.json`` into ``out``."""
    import torch

    from ilm_megatron.config import load_config
    from ilm_megatron.train.data import build_train_data
    from ilm_megatron.train.engines import build_engine

    rank = int(os.environ.get("RANK", "0"))
    run = out / "run"
    cfg = load_config([], [*MODEL, *overrides, f"run_dir={run}"])
    _reset_hwm()
    before = _vm("VmRSS")
    engine = build_engine(cfg)
    data = build_train_data(cfg, engine.dp_rank, engine.dp_size)
    engine.setup(data, None)
    built = _vm("VmHWM")
    from ilm_megatron.train.curriculum import phase_at

    x, y = data.next_batch()
    solver = phase_at(0, cfg).solver
    engine.train_step(x.to(engine.device), y.to(engine.device), solver, False, lambda loss: loss)
    stepped = _vm("VmHWM")
    params = getattr(engine, "params", None) or list(engine.module.parameters())
    params_bytes = sum(p.numel() * p.element_size() for p in params if not p.is_meta)
    grads_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt = getattr(engine, "opt", None)
    moments = [t for st in getattr(opt, "state", {}).values() for t in st.values()]
    opt_bytes = sum(t.numel() * t.element_size() for t in moments if torch.is_tensor(t))
    state = {"rng_torch": torch.get_rng_state(), "data": data.state_dict(), "counters": {
        "step": 1, "tokens": 0, "nan_streak": 0, "nan_skipped": 0, "unconverged": 0}}  # fmt: skip
    engine.barrier()
    t0 = time.perf_counter()
    folder = engine.save(run / "checkpoints", state)
    save_s = time.perf_counter() - t0
    engine.barrier()
    t0 = time.perf_counter()
    if os.environ.get("BENCH_SCALE_PROFILE"):  # where a load spends its time, per rank
        import cProfile

        cProfile.runctx(
            "engine.setup(data, folder)", globals(), locals(), str(out / f"load-{rank}.prof")
        )
    else:
        engine.setup(data, folder)
    load_s = time.perf_counter() - t0
    engine.barrier()
    res = {
        "rank": rank,
        "rss_before_bytes": before,
        "rss_built_bytes": built - before,
        "rss_model_bytes": stepped - before,
        "params_bytes": params_bytes,
        # weights + AdamW state this rank holds, counted from its tensors (gradients are freed
        # after the step)
        "state_bytes": params_bytes + opt_bytes,
        "grads_bytes": grads_bytes,
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "folder": str(folder),
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(res))


def _written_by_rank(folder: Path, world: int) -> list[int]:
    """Bytes of a step folder per writing rank: ``__R_*.distcp`` and ``trainer-rankR.pt`` to
    rank R, every other file (whole-model files, the index, config, manifest) to rank 0."""
    import re

    out = [0] * world
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        m = re.match(r"__(\d+)_\d+\.distcp$", f.name) or re.match(r"trainer-rank(\d+)\.pt$", f.name)
        out[int(m.group(1)) if m else 0] += f.stat().st_size
    return out


def run_layout(name: str, repo: str, overrides: list[str]) -> dict[str, Any]:
    tp, pp = LAYOUTS[name]
    world = tp * pp
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}"] + (
        ["parallel.microbatches=2"] if pp > 1 else []
    )
    keep = os.environ.get("BENCH_SCALE_KEEP")  # a folder to keep the workers' files in
    with tempfile.TemporaryDirectory() as d:
        out = Path(keep) / name if keep else Path(d)
        out.mkdir(parents=True, exist_ok=True)
        me = [str(Path(__file__).resolve()), "--worker", str(out), *layout, *overrides]
        if world == 1:
            cmd = [sys.executable, *me]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--master-addr", "127.0.0.1", "--master-port", str(_port()), *me]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: workers failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
        written = _written_by_rank(Path(ranks[0]["folder"]), world)
    for r, w in zip(ranks, written):
        r["written_bytes"] = w
        r.pop("folder")
    return {"layout": name, "tp": tp, "pp": pp, "ranks": ranks}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(tp: int, pp: int, overrides: list[str]) -> list[int]:
    """plan_memory's parameter bytes per stage (TP rank 0)."""
    from ilm_megatron.config import load_config
    from ilm_megatron.parallel.memory_plan import plan_memory

    cfg = load_config([], [*MODEL, *overrides])
    plan = plan_memory(cfg, tp, pp, 1, microbatches=2 if pp > 1 else 1, kernels="reference")
    return [s["params"] for s in plan["stages"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker), args.overrides)
        return 0
    rows = [run_layout(n, args.repo, args.overrides) for n in args.layouts]
    one = next((r for r in rows if r["layout"] == "one"), None)
    for row in rows:
        stages = _plan(row["tp"], row["pp"], args.overrides)
        for r in row["ranks"]:
            r["plan_params_bytes"] = stages[r["rank"] // row["tp"]]  # Megatron order, DP=1
        worst = max(r["rss_model_bytes"] for r in row["ranks"])
        state = max(r["state_bytes"] for r in row["ranks"])
        row["max_state_bytes"] = state
        row["max_rss_model_bytes"] = worst
        row["max_written_bytes"] = max(r["written_bytes"] for r in row["ranks"])
        row["save_s"] = max(r["save_s"] for r in row["ranks"])
        row["load_s"] = max(r["load_s"] for r in row["ranks"])
        if one is not None:
            base = one["ranks"][0]["rss_model_bytes"]
            ideal = 1.0 / (row["tp"] * row["pp"])
            row["ratio"] = round(worst / base, 3)
            row["ideal"] = ideal
            row["within_1.1x_ideal"] = worst / base <= 1.1 * ideal
            row["state_ratio"] = round(state / one["ranks"][0]["state_bytes"], 3)
            row["state_within_1.1x_ideal"] = row["state_ratio"] <= 1.1 * ideal
    report = {
        "benchmark": "scale_cpu",
        "date": now_iso(),
        "machine": machine_info(),
        "repo": args.repo,
        "model": MODEL + list(args.overrides),
        "rows": rows,
    }
    emit_report(report, args.output, show=args.json)
    if not args.json:
        for row in rows:
            print(
                f"{row['layout']}: max rss {row['max_rss_model_bytes'] / 2**20:.0f} MiB"
                + (f" ({row['ratio']:.2f} of one process)" if "ratio" in row else "")
                + f", save {row['save_s']:.2f} s, load {row['load_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
