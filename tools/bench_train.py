"""Training throughput of implicit models against the analytic cost model.

    python tools/bench_train.py [--config CFG] [--steps N] [--json]

For one tiny config it times full training steps (forward, backward, AdamW) of

* the explicit model (one pass of the stack),
* the bounded curriculum phase (4 solver iterations + 1 phantom step),
* the free phase (24 solver iterations + 4 phantom steps),

with the no-grad solve forced to run exactly its cap (``f_tol`` tiny), and compares each implicit
step with the analytic cost ``(iterations + 3k) / 3`` explicit steps: a no-grad evaluation of the
stack costs about one forward, a phantom step about a forward plus its backward (3 forwards), and an
explicit step 3 forwards. Target: measured / analytic <= 1.15.

It runs on ``train.device`` (``auto``: CUDA when available) with ``train.precision`` (``auto``:
bf16 autocast on CUDA), synchronises the device around each timed step, and reports each phase's
model TFLOP/s (solver iterations counted, as ``ilm-train`` logs them) and, on a known accelerator
or with ``train.peak_tflops``, the MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from _common import machine_info  # noqa: E402

from ilm_megatron.argtypes import positive_int  # noqa: E402

PHASES = {"explicit": None, "pretrain_4+1": (4, 1), "free_24+4": (24, 4)}


def step_times(cfg, phase, steps: int, warmup: int) -> list[float]:
    import torch

    from ilm_megatron.data.word_problem import sample_word_problem
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.train.engines import use_bf16
    from ilm_megatron.train.loop import resolve_device, token_loss

    device = resolve_device(cfg.train.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cfg.model.implicit = phase is not None
    if phase is not None:
        cfg.solver.f_max_iter, cfg.solver.phantom_steps = phase
        cfg.solver.f_tol = 1e-30  # run exactly the cap
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).to(device).train()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x, y = sample_word_problem(cfg.data.group, cfg.train.batch_size, cfg.data.seq_len, gen)
        x, y = x.to(device), y.to(device)
        sync()
        t0 = time.perf_counter()
        with amp:
            out = model(x)
            loss = token_loss(out.logits, y, cfg.model.vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if phase is not None:
            assert out.stats.iters == phase[0], out.stats.iters
    return times, model


def run(args: argparse.Namespace) -> dict:
    from ilm_megatron.config import load_config

    warnings.filterwarnings("ignore")
    from ilm_megatron.train.engines import use_bf16
    from ilm_megatron.train.loop import resolve_device
    from ilm_megatron.train.metrics import flops_per_token, peak_tflops

    base = load_config([args.config] if args.config else [], args.overrides)
    device = resolve_device(base.train.device)
    peak = peak_tflops(device, base.train.peak_tflops)
    results: dict[str, dict] = {}
    for name, phase in PHASES.items():
        cfg = load_config([args.config] if args.config else [], args.overrides)
        times, model = step_times(cfg, phase, args.steps, args.warmup)
        t = statistics.median(times)
        tokens = cfg.train.batch_size * cfg.data.seq_len
        tflops = tokens / t * flops_per_token(model, cfg)(phase[0] if phase else 1.0) / 1e12
        results[name] = {"step_s": t, "tokens_per_s": tokens / t, "model_tflops": tflops}
        if peak > 0:
            results[name]["mfu"] = tflops / peak
        del model
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
    return {
        "config": args.config or "built-in default",
        "batch": base.train.batch_size,
        "seq_len": base.data.seq_len,
        "steps": args.steps,
        "device": str(device),
        "precision": "bf16" if use_bf16(base, device) else "fp32",
        "peak_tflops": peak,
        "phases": results,
        "target_measured_over_analytic": 1.15,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="", help="YAML config (default: the built-in default)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per phase (10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
