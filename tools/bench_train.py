"""Training throughput of implicit models against the analytic cost model.

    python tools/bench_train.py [--config CFG] [--steps N] [--json]

For one config (default: the built-in tiny one) it times full training steps (forward, backward,
AdamW) of

* the explicit model (one pass of the stack),
* the bounded curriculum phase (4 solver iterations + 1 phantom step),
* the free phase (24 solver iterations + 4 phantom steps),

with the no-grad solve forced to run exactly its cap (``f_tol`` tiny), and compares each implicit
step with the analytic cost ``(iterations + 3k) / 3`` explicit steps: a no-grad evaluation of the
stack costs about one forward, a phantom step about a forward plus its backward (3 forwards), and an
explicit step 3 forwards. Target: measured / analytic <= 1.15.

All three models are built first; then the phases take turns, one step each per round
(``--warmup`` untimed rounds, then ``--steps`` timed ones; each phase's median is reported), so
that a burst of other load on a shared machine slows every phase alike instead of one. The JSON
records the intra-op threads, the load average before and after the timed rounds, the machine and
the date.

It runs on ``train.device`` (``auto``: CUDA when available) with ``train.precision`` (``auto``:
bf16 autocast on CUDA), synchronises the device around each timed step, and reports each phase's
model TFLOP/s (:func:`~ilm_megatron.train.metrics.flops_per_token` with the phase's iterations and
phantom steps, as ``ilm-train`` logs them) and, on a known accelerator or with
``train.peak_tflops``, the MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from _common import machine_info, now_iso  # noqa: E402

from ilm_megatron.argtypes import positive_int  # noqa: E402

PHASES = {"explicit": None, "pretrain_4+1": (4, 1), "free_24+4": (24, 4)}


def phase_config(base, phase):
    """``base`` for one phase: explicit (``None``) or ``(iterations, phantom steps)`` at the cap."""
    if phase is None:
        return dataclasses.replace(base, model=dataclasses.replace(base.model, implicit=False))
    iters, k = phase
    solver = dataclasses.replace(
        base.solver, f_max_iter=iters, phantom_steps=k, f_tol=1e-30
    )  # f_tol tiny: the solve runs exactly its cap
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, implicit=True), solver=solver
    )


class PhaseRun:
    """One phase's model, AdamW and batches; :meth:`step` times one full training step."""

    def __init__(self, cfg, phase, device) -> None:
        import torch

        from ilm_megatron.models.lm import build_model
        from ilm_megatron.train.engines import use_bf16

        self.cfg, self.phase, self.device = cfg, phase, device
        torch.manual_seed(0)
        self.model = build_model(cfg.model, cfg.solver).to(device).train()
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator().manual_seed(0)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        """Seconds of one step (forward, backward, AdamW), the device synchronised around it."""
        from ilm_megatron.data.word_problem import sample_word_problem
        from ilm_megatron.train.engines import token_loss

        c = self.cfg
        x, y = sample_word_problem(c.data.group, c.train.batch_size, c.data.seq_len, self.gen)
        x, y = x.to(self.device), y.to(self.device)
        self.sync()
        t0 = time.perf_counter()
        with self.amp:
            out = self.model(x)
            loss = token_loss(out.logits, y, c.model.vocab_size)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sync()
        dt = time.perf_counter() - t0
        if self.phase is not None:
            assert out.stats.iters == self.phase[0], out.stats.iters
        return dt


def step_times(runs: dict[str, PhaseRun], steps: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin: ``warmup + steps`` rounds of one step of every phase; the warmup is dropped.

    Interleaving the phases spreads a burst of other load on the machine over all of them
    instead of skewing the one phase that happened to run during it.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, r in runs.items():
            t = r.step()
            if i >= warmup:
                times[name].append(t)
    return times


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(args: argparse.Namespace) -> dict:
    import torch

    from ilm_megatron.config import load_config

    warnings.filterwarnings("ignore")
    from ilm_megatron.train.device import resolve_device
    from ilm_megatron.train.engines import use_bf16
    from ilm_megatron.train.metrics import flops_per_token, peak_tflops

    base = load_config([args.config] if args.config else [], args.overrides)
    device = resolve_device(base.train.device)
    peak = peak_tflops(device, base.train.peak_tflops)
    runs = {name: PhaseRun(phase_config(base, ph), ph, device) for name, ph in PHASES.items()}
    load_before = load_average()
    times = step_times(runs, args.steps, args.warmup)
    load_after = load_average()
    results: dict[str, dict] = {}
    tokens = base.train.batch_size * base.data.seq_len
    for name, phase in PHASES.items():
        r = runs[name]
        t = statistics.median(times[name])
        iters, k = phase if phase is not None else (1, 0)
        tflops = tokens / t * flops_per_token(r.model, r.cfg)(iters, k) / 1e12
        results[name] = {"step_s": t, "tokens_per_s": tokens / t, "model_tflops": tflops}
        if peak > 0:
            results[name]["mfu"] = tflops / peak
    t_exp = results["explicit"]["step_s"]
    for name, phase in PHASES.items():
        if phase is None:
            continue
        iters, k = phase
        analytic = (iters + 3 * k) / 3
        measured = results[name]["step_s"] / t_exp
        results[name].update(
            measured_over_explicit=measured,
            analytic_over_explicit=analytic,
            measured_over_analytic=measured / analytic,
        )
    machine = machine_info()
    machine["cpu_model"] = cpu_model()
    if device.type == "cuda":
        machine["device_name"] = torch.cuda.get_device_name(device)
    return {
        "config": args.config or "built-in default",
        "batch": base.train.batch_size,
        "seq_len": base.data.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "schedule": "round-robin",
        "device": str(device),
        "precision": "bf16" if use_bf16(base, device) else "fp32",
        "peak_tflops": peak,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "phases": results,
        "target_measured_over_analytic": 1.15,
        "machine": machine,
        "date": now_iso(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="", help="YAML config (default: the built-in default)")
    p.add_argument(
        "--steps", type=positive_int, default=10, help="timed rounds, one step of each phase (10)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if args.config and not Path(args.config).is_file():
        print(f"bench_train.py: error: config file not found: {args.config}", file=sys.stderr)
        return 2
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name, r in res["phases"].items():
            extra = (
                f", {r['measured_over_explicit']:.2f}x explicit (analytic "
                f"{r['analytic_over_explicit']:.2f}x, ratio {r['measured_over_analytic']:.2f})"
                if "measured_over_analytic" in r
                else ""
            )
            mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
            print(f"{name:14s} {r['tokens_per_s']:9.0f} tok/s{extra}{mfu}")
        print(
            f"{res['threads']} threads, load average {res['loadavg_before']} before, "
            f"{res['loadavg_after']} after ({res['schedule']}, {res['date']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
