"""Single-process training loop (the core that ``ilm-train`` runs).

One step: set the curriculum phase, draw a batch, no-grad fixed-point solve, ``k`` phantom steps
with autograd, loss, backward, clip, AdamW (non-finite steps are skipped and counted). Every
``log_interval`` steps it prints loss, accuracy, learning rate, grad norm, throughput and the
solver's iterations and residuals, and writes the same record to ``<run_dir>/metrics.jsonl`` and
TensorBoard. Checkpoints are atomic and resumable (``checkpoint.py``). At the end it evaluates,
saves the model and returns the final metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ilm_megatron.config import Config, config_to_yaml
from ilm_megatron.data.word_problem import sample_word_problem
from ilm_megatron.models.lm import ImplicitLM, build_model
from ilm_megatron.train.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    save_model,
    save_training_checkpoint,
)
from ilm_megatron.train.curriculum import apply_phase, phase_at
from ilm_megatron.train.data import IGNORE, build_train_data
from ilm_megatron.train.distributed import check_parallel, wants_deepspeed
from ilm_megatron.train.metrics import MetricsLogger, flops_per_token, memory_gb, peak_tflops


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    return torch.device(name)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` or, with ``lr_schedule=wsd``,
    warmup-stable-decay: constant, then linear decay over the last ``decay_fraction`` of steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "wsd":
        decay_steps = max(1, round(t.decay_fraction * t.max_steps))
        start = t.max_steps - decay_steps
        if step < start:
            return t.lr
        frac = min(1.0, (step - start + 1) / decay_steps)
        return t.lr * (1 - (1 - t.min_lr_ratio) * frac)
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_loss(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Cross-entropy over aligned targets (no shift). logits (b, l, V'), targets (b, l)."""
    return F.cross_entropy(logits[..., :vocab].flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def evaluate(
    model: ImplicitLM, cfg: Config, length: int, batches: int, seed: int, device: torch.device
) -> dict[str, float]:
    """Accuracy (all positions and last 10) and solver statistics at ``length``.

    The simultaneous solve needs about as many iterations as the sequence is long on state-tracking
    tasks, so the eval cap grows with ``length / data.seq_len`` (never below the configured cap).
    """
    cap = math.ceil(model.eval_max_iter() * max(1.0, length / cfg.data.seq_len))
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.model.vocab_size
    correct = last = total = total_last = 0
    loss_sum, iters, res = 0.0, [], []
    for _ in range(batches):
        x, y = sample_word_problem(
            cfg.data.group, cfg.train.batch_size, length, g, cfg.data.easy_frac
        )
        x, y = x.to(device), y.to(device)
        out = model(x, max_iter=cap)
        pred = out.logits[..., :vocab].argmax(-1)
        loss_sum += token_loss(out.logits, y, vocab).item()
        correct += (pred == y).sum().item()
        total += y.numel()
        last += (pred[:, -10:] == y[:, -10:]).sum().item()
        total_last += y[:, -10:].numel()
        iters.append(out.stats.sample_iters.float())
        res.append(out.stats.residual.float())
    model.train(was_training)
    it, r = torch.cat(iters), torch.cat(res)
    return {
        "length": length,
        "loss": loss_sum / batches,
        "acc_all": correct / total,
        "acc_last10": last / total_last,
        "iters_mean": it.mean().item(),
        "iters_max": it.max().item(),
        "residual_max": r.max().item(),
    }


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """Argmax accuracy over the targets that count (``-100`` targets are ignored)."""
    keep = targets != IGNORE
    hits = (logits[..., :vocab].argmax(-1) == targets) & keep
    return hits.sum().item() / max(1, keep.sum().item())


@torch.no_grad()
def evaluate_batches(
    model: ImplicitLM, batches: list[tuple[torch.Tensor, torch.Tensor]], vocab: int, device
) -> dict[str, float]:
    """Loss, perplexity, token accuracy and solver statistics over fixed ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    loss_sum = correct = total = 0.0
    iters, res = [], []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = model(x)
        n = (y != IGNORE).sum().item()  # targets that count (all but ignored positions)
        loss_sum += token_loss(out.logits, y, vocab).item() * n
        correct += ((out.logits[..., :vocab].argmax(-1) == y) & (y != IGNORE)).sum().item()
        total += n
        iters.append(out.stats.sample_iters.float().flatten())
        res.append(out.stats.residual.float().flatten())
    model.train(was_training)
    it, r = torch.cat(iters), torch.cat(res)
    loss = loss_sum / total
    return {
        "length": batches[0][0].shape[1],
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "acc_all": correct / total,
        "iters_mean": it.mean().item(),
        "iters_max": it.max().item(),
        "residual_max": r.max().item(),
    }


def validate(model: ImplicitLM, cfg: Config, data: Any, device: torch.device) -> dict[str, float]:
    """Periodic validation: the word problem at its training length, or the shards' val split."""
    if cfg.data.task == "word_problem":
        return evaluate(
            model, cfg, cfg.data.seq_len, cfg.train.eval_batches, cfg.train.seed + 2, device
        )
    batches = data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
    if not batches:
        raise ValueError(
            f"validation on {cfg.data.task} needs a validation split (data.val_fraction)"
        )
    return evaluate_batches(model, batches, cfg.model.vocab_size, device)


class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, save a checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: Config, run_dir: Path, quiet: bool = False) -> TrainResult:
    """Train ``cfg`` in this process and write ``run_dir``. Returns history and final metrics.

    Resumes from ``run_dir/checkpoints/latest`` when it exists (``train.resume``): model,
    optimizer, RNG and data-generator state, step and token counters, so that on a CPU the loss
    sequence is bitwise identical to an uninterrupted run. SIGTERM/SIGINT finish the current step,
    save a checkpoint and return (``result.final["preempted"]``).
    """
    check_parallel(cfg)
    if wants_deepspeed(cfg):
        return _train_deepspeed(cfg, run_dir, quiet)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = config_to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_text)
    ckpt_root = run_dir / "checkpoints"
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.solver).to(device)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        weight_decay=cfg.train.weight_decay,
    )
    data = build_train_data(cfg)
    counters = {"step": 0, "tokens": 0, "nan_streak": 0, "nan_skipped": 0, "unconverged": 0}
    log = MetricsLogger(run_dir, quiet, cfg.train.tensorboard, config_text, cfg.train.max_steps)
    log.set_flops(flops_per_token(model, cfg), peak_tflops(device, cfg.train.peak_tflops))
    latest = latest_checkpoint(ckpt_root) if cfg.train.resume else None
    if latest is not None:
        state = load_training_checkpoint(latest, model)
        if "optimizer" not in state:
            raise ValueError(
                f"{latest} was written by the DeepSpeed trainer (ZeRO / several processes): "
                "resume it with the same parallel.zero_stage and number of processes"
            )
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        data.load_state_dict(state["data"])
        counters.update(state["counters"])
        log.say(f"ilm-train: resumed from {latest} at step {counters['step']}")
    elif cfg.train.resume is False or not (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").write_text("")

    def save() -> Path:
        state = {
            "optimizer": opt.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "data": data.state_dict(),
            "counters": dict(counters),
        }
        return save_training_checkpoint(
            ckpt_root, counters["step"], model, cfg, state, cfg.train.keep_last
        )

    vocab = cfg.model.vocab_size
    result = TrainResult(run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.say(
        f"ilm-train: {'implicit' if cfg.model.implicit else 'explicit'} {cfg.model.arch}, "
        f"{n_params / 1e3:.1f}K params, {data.describe}, {cfg.train.max_steps} steps on {device}; "
        f"run dir {run_dir}"
    )
    t0 = time.perf_counter()
    tokens_at_start = counters["tokens"]
    window: list[dict[str, float]] = []
    iters_seen: list[torch.Tensor] = []
    preempted = None
    with _StopFlag() as stop:
        while counters["step"] < cfg.train.max_steps:
            step = counters["step"]
            phase = phase_at(counters["tokens"], cfg)
            apply_phase(phase, model.solver_config)
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = data.next_batch()
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = token_loss(out.logits, y, vocab)
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.train.clip_grad or float("inf")
                )
                finite = bool(torch.isfinite(gnorm))
            if finite:
                opt.step()
                counters["nan_streak"] = 0
            else:  # skip the update, count it, stop after too many in a row
                opt.zero_grad(set_to_none=True)
                counters["nan_streak"] += 1
                counters["nan_skipped"] += 1
                log.say(f"step {step + 1}: non-finite loss or gradient, update skipped")
                if counters["nan_streak"] >= cfg.train.max_nan_steps:
                    log.close()
                    raise FloatingPointError(
                        f"{counters['nan_streak']} non-finite steps in a row "
                        f"(train.max_nan_steps={cfg.train.max_nan_steps}); last checkpoint: "
                        f"{latest_checkpoint(ckpt_root)}"
                    )
            counters["step"] += 1
            counters["tokens"] += y.numel()
            log.advance(counters["step"])
            st = out.stats
            if cfg.model.implicit and st.converged_frac < 1.0:
                counters["unconverged"] += 1  # solver hit its cap before the tolerance
            iters_seen.append(st.sample_iters.detach().cpu())
            acc = token_accuracy(out.logits, y, vocab)
            window.append(
                {
                    "loss": loss.item(),
                    "acc": acc,
                    "grad_norm": gnorm.item() if finite else float("nan"),
                    **st.summary(),
                }
            )
            last = counters["step"] == cfg.train.max_steps
            if counters["step"] % cfg.train.log_interval == 0 or last:
                elapsed = time.perf_counter() - t0
                rec = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                rec["iters_max"] = max(w["iters_max"] for w in window)
                rec["residual_max"] = max(w["residual_max"] for w in window)
                rec.update(
                    step=counters["step"],
                    tokens=counters["tokens"],
                    lr=lr,
                    tokens_per_s=(counters["tokens"] - tokens_at_start) / elapsed,
                    mem_gb=memory_gb(device),
                    phase=phase.index,
                    unconverged_steps=counters["unconverged"],
                    nan_skipped=counters["nan_skipped"],
                )
                window = []
                if cfg.train.eval_interval and counters["step"] % cfg.train.eval_interval == 0:
                    ev = validate(model, cfg, data, device)
                    rec.update({f"val_{k}": v for k, v in ev.items() if k != "length"})
                result.history.append(rec)
                log.record(rec, torch.cat(iters_seen))
                iters_seen = []
                log.say(_format_record(rec, phase.name))
            if cfg.train.save_interval and counters["step"] % cfg.train.save_interval == 0:
                save()
            if stop.signum is not None and not last:
                path = save()
                preempted = signal.Signals(stop.signum).name
                log.say(f"ilm-train: {preempted} received, saved {path}; exiting")
                break
    log.close()
    if preempted:
        result.final = {"preempted": preempted, "step": counters["step"]}
        return result
    if cfg.data.task == "word_problem":
        lengths = [cfg.data.seq_len] + ([cfg.data.eval_seq_len] if cfg.data.eval_seq_len else [])
        evals = [
            evaluate(model, cfg, n, cfg.train.eval_batches, cfg.train.seed + 2, device)
            for n in lengths
        ]
    else:
        has_val = cfg.data.val_fraction > 0 or cfg.data.task == "catbabi"
        evals = [validate(model, cfg, data, device)] if has_val else []
    for ev in evals:
        log.say(
            f"eval length {ev['length']}: acc {ev['acc_all']:.3f}"
            + (f" (last 10: {ev['acc_last10']:.3f})" if "acc_last10" in ev else "")
            + f", loss {ev['loss']:.4f}, solver iters {ev['iters_mean']:.1f}/"
            f"{ev['iters_max']:.0f}, residual max {ev['residual_max']:.2e}"
        )
    save()
    save_model(model, cfg, run_dir / "model.safetensors")
    result.final = {"eval": evals, "train": result.history[-1] if result.history else {}}
    (run_dir / "final.json").write_text(json.dumps(result.final, indent=2))
    log.say(f"saved {run_dir / 'model.safetensors'} (+ config.yaml, metrics.jsonl, final.json)")
    return result


def _format_record(rec: dict[str, Any], phase: str) -> str:
    return (
        f"step {rec['step']:5d} | loss {rec['loss']:.4f} | acc {rec['acc']:.3f} | "
        f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | iters {rec['iters_mean']:.1f}"
        f"/{rec['iters_max']:.0f} ({phase}) | res {rec['residual_mean']:.2e}"
        f"/{rec['residual_max']:.2e} | conv {rec['converged_frac']:.2f} | "
        f"{rec['tokens_per_s']:.0f} tok/s"
        + (f" | mfu {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
        + (f" | val acc {rec['val_acc_all']:.3f}" if "val_acc_all" in rec else "")
    )


def default_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("ILM_RUNS", "runs")) / f"{cfg.model.arch}-{stamp}"


# ---------------------------------------------------------------------------------------------
# Data parallel with DeepSpeed ZeRO (torchrun / deepspeed launchers, or zero_stage>0 alone)

_CRASH_MARKER = ".ilm_test_crashed"


def _test_hooks(step: int, rank: int, world: int, run_dir: Path, loss: torch.Tensor | None):
    """Fault injection for the distributed tests, driven by environment variables.

    ``ILM_TEST_CRASH_AT_STEP=N``: the last rank dies (``os._exit(1)``) before step ``N + 1``,
    once per run directory (a marker file keeps a restarted job from dying again).
    ``ILM_TEST_NAN_AT_STEPS=a,b``: the last rank's loss is NaN at those (1-based) steps.
    """
    if rank != world - 1:
        return loss
    if loss is None:
        crash = os.environ.get("ILM_TEST_CRASH_AT_STEP")
        marker = run_dir / _CRASH_MARKER
        if crash and step == int(crash) and not marker.exists():
            marker.write_text(f"crashed before step {step + 1}\n")
            os._exit(1)
        return None
    nan_steps = os.environ.get("ILM_TEST_NAN_AT_STEPS", "")
    if nan_steps and str(step + 1) in nan_steps.split(","):
        return loss * float("nan")
    return loss


def _ds_save(engine: Any, ctx: Any, ckpt_root: Path, cfg: Config, state: dict) -> Path:
    """Save a DeepSpeed checkpoint on all ranks with the same atomic scheme as one process.

    Every rank writes into ``checkpoints/.step-N.tmp`` (DeepSpeed's model and ZeRO optimizer
    shards, plus ``trainer-rankRRRRR.pt``); rank 0 adds ``model.safetensors`` and
    ``trainer.pt``. After a barrier, rank 0 renames the folder to ``step-N``, rewrites
    ``latest`` and prunes beyond ``keep_last``; a final barrier keeps the ranks together.
    """
    import shutil

    from ilm_megatron.train.checkpoint import _step_dir, _write_text_atomic

    final = _step_dir(ckpt_root, state["counters"]["step"])
    tmp = ckpt_root / f".{final.name}.tmp"
    if ctx.is_rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    ctx.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tmp.name, client_state={}, save_latest=False)
    torch.save(state, tmp / f"trainer-rank{ctx.rank:05d}.pt")
    if ctx.is_rank0:
        save_model(engine.module, cfg, tmp / "model.safetensors")
        torch.save(state, tmp / "trainer.pt")
    ctx.barrier()
    if ctx.is_rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(ckpt_root / "latest", final.name + "\n")
        steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
        for old in steps[: -cfg.train.keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def _ds_saved_world(latest: Path) -> int:
    """How many ranks wrote the DeepSpeed checkpoint ``latest`` (its ``trainer-rank*.pt``)."""
    return len(list(latest.glob("trainer-rank*.pt")))


def _ds_prepare_resume(ctx: Any, cfg: Config, latest: Path, data: Any) -> Path | None:
    """Check ``latest`` before the engine exists; convert it when the world size changed.

    Same number of ranks: returns None (a plain DeepSpeed load). Another number (ZeRO-1/2 and
    ``data.task=word_problem`` only): rank 0 converts the checkpoint's DeepSpeed state once into
    DeepSpeed's universal format at ``latest/universal`` (written to ``.universal.tmp`` and
    renamed, so a crash never leaves half a conversion), all ranks wait, and the folder is
    returned: the engine is then built with ``checkpoint.load_universal`` and re-partitions the
    optimizer state over the new ranks.
    """
    if not (latest / "mp_rank_00_model_states.pt").is_file():
        raise ValueError(
            f"{latest} was written by the single-process trainer (no DeepSpeed state): resume it "
            "without ZeRO in one process, or start a new run directory"
        )
    saved = _ds_saved_world(latest)
    if saved == ctx.world_size:
        return None
    where = f"{latest} was written by {saved} process(es), now {ctx.world_size}"
    if cfg.parallel.zero_stage not in (1, 2) or not list(latest.glob("*optim_states.pt")):
        raise ValueError(
            f"{where}: resuming at another data-parallel size needs ZeRO-1/2 on both sides "
            "(parallel.zero_stage=1 or 2); resume with the same number of processes"
        )
    if cfg.data.task != "word_problem":
        state = torch.load(latest / "trainer.pt", weights_only=True)
        data.load_state_dict(state["data"])  # the shards loader refuses with its own message
        raise ValueError(
            f"{where}: only data.task=word_problem resumes at another data-parallel size "
            f"(the {cfg.data.task} data position is per rank); resume with {saved} process(es)"
        )
    out = latest / "universal"
    if ctx.is_rank0 and not out.is_dir():
        import argparse
        import contextlib
        import io
        import shutil

        from deepspeed.checkpoint import ds_to_universal

        tmp = latest / ".universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(latest),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # the model declares no universal-checkpoint info
        )
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal.main(args)
        os.replace(tmp, out)
    ctx.barrier()
    return out


def _ds_load(engine: Any, ctx: Any, latest: Path, universal: Path | None) -> dict:
    """Load a checkpoint written by :func:`_ds_save`; returns this rank's trainer state.

    With ``universal`` (another world size, see :func:`_ds_prepare_resume`) the DeepSpeed
    state comes from the converted folder and every rank takes rank 0's trainer state.
    """
    from ilm_megatron.train.checkpoint import load_model

    own = latest / f"trainer-rank{ctx.rank:05d}.pt"
    if universal is not None:
        own = latest / "trainer.pt"
    elif not own.is_file():
        raise ValueError(
            f"{latest} has no trainer state for rank {ctx.rank}: it was written with a different "
            f"number of processes than now ({ctx.world_size})"
        )
    load_model(latest / "model.safetensors", engine.module)  # architecture check
    folder = universal if universal is not None else latest
    path, _ = engine.load_checkpoint(
        str(folder.parent),
        tag=folder.name,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {folder}")
    return torch.load(own, weights_only=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written by an attempt that died before its next save)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _train_deepspeed(cfg: Config, run_dir: Path, quiet: bool) -> TrainResult:
    """The training loop on a DeepSpeed engine: data parallel with ZeRO stage 0/1/2.

    Each data-parallel rank takes its slice of the global batch (split further into
    ``parallel.microbatches`` for gradient accumulation). Losses and accuracies are averaged
    over ranks; the solver statistics are rank 0's. A non-finite loss on any rank poisons the
    gradients on every rank so that the update is skipped everywhere (lock-step); a SIGTERM on
    any rank makes all ranks save and exit.
    """
    import deepspeed

    from ilm_megatron.train import distributed as D

    ctx = D.setup(cfg)
    rank0 = ctx.is_rank0
    config_text = config_to_yaml(cfg)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text)
    ctx.barrier()
    ckpt_root = run_dir / "checkpoints"
    device = ctx.device
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.solver).to(device)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        weight_decay=cfg.train.weight_decay,
    )
    data = build_train_data(cfg, ctx.dp_rank, ctx.dp_size)
    latest = latest_checkpoint(ckpt_root) if cfg.train.resume else None
    universal = _ds_prepare_resume(ctx, cfg, latest, data) if latest is not None else None
    ds_config = D.deepspeed_config(cfg, ctx)
    if universal is not None:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config, mpu=ctx.mpu
    )
    module: ImplicitLM = engine.module
    zero = cfg.parallel.zero_stage
    mb = cfg.parallel.microbatches
    counters = {"step": 0, "tokens": 0, "nan_streak": 0, "nan_skipped": 0, "unconverged": 0}
    log = MetricsLogger(
        run_dir,
        quiet or not rank0,
        cfg.train.tensorboard and rank0,
        config_text,
        cfg.train.max_steps,
    )
    log.set_flops(flops_per_token(module, cfg), peak_tflops(device, cfg.train.peak_tflops))
    metrics_path = run_dir / "metrics.jsonl"
    if latest is not None:
        state = _ds_load(engine, ctx, latest, universal)
        torch.set_rng_state(state["rng_torch"])
        data.load_state_dict(state["data"])
        counters.update(state["counters"])
        if rank0:
            _truncate_metrics(metrics_path, counters["step"])
        how = f" (converted from {_ds_saved_world(latest)} ranks)" if universal else ""
        log.say(f"ilm-train: resumed from {latest}{how} at step {counters['step']}")
    elif rank0 and (cfg.train.resume is False or not metrics_path.exists()):
        metrics_path.write_text("")
    ctx.barrier()

    def save() -> Path:
        state = {
            "rng_torch": torch.get_rng_state(),
            "data": data.state_dict(),
            "counters": dict(counters),
            "world_size": ctx.world_size,
        }
        return _ds_save(engine, ctx, ckpt_root, cfg, state)

    vocab = cfg.model.vocab_size
    result = TrainResult(run_dir)
    n_params = sum(p.numel() for p in module.parameters())
    log.say(
        f"ilm-train: {'implicit' if cfg.model.implicit else 'explicit'} {cfg.model.arch}, "
        f"{n_params / 1e3:.1f}K params, {data.describe}, {cfg.train.max_steps} steps on "
        f"{ctx.world_size} x {device} (DeepSpeed ZeRO-{zero}, {mb} microbatch(es)); "
        f"run dir {run_dir}"
    )
    t0 = time.perf_counter()
    tokens_at_start = counters["tokens"]
    window: list[dict[str, float]] = []
    iters_seen: list[torch.Tensor] = []
    preempted = None
    with _StopFlag() as stop:
        while counters["step"] < cfg.train.max_steps:
            step = counters["step"]
            _test_hooks(step, ctx.rank, ctx.world_size, run_dir, None)
            phase = phase_at(counters["tokens"], cfg)
            apply_phase(phase, module.solver_config)
            lr = lr_at(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            x, y = data.next_batch()
            x, y = x.to(device), y.to(device)
            loss_sum = acc_sum = 0.0
            bad = stop_any = False
            gnorm = float("nan")
            applied = True
            for i, (xc, yc) in enumerate(zip(x.chunk(mb), y.chunk(mb))):
                out = engine(xc)
                loss = _test_hooks(step, ctx.rank, ctx.world_size, run_dir,
                                   token_loss(out.logits, yc, vocab))  # fmt: skip
                acc = token_accuracy(out.logits, yc, vocab)
                ok = bool(torch.isfinite(loss))
                nonfinite, stops, lsum, asum = ctx.all_reduce_sum(
                    [0.0 if ok else 1.0, float(stop.signum is not None),
                     loss.item() if ok else 0.0, acc]
                )  # fmt: skip
                stop_any |= stops > 0
                loss_sum += lsum
                acc_sum += asum
                if nonfinite > 0:  # NaN gradients on every rank: the update is skipped by all
                    bad = True
                    loss = loss * float("nan")
                engine.backward(loss)
                if zero == 0 and i == mb - 1:  # plain DP: gradients are all-reduced now
                    params = [p for p in module.parameters() if p.grad is not None]
                    gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
                    if not math.isfinite(gnorm):
                        applied = False
                        for p in params:
                            p.grad = None
                engine.step()
                iters_seen.append(out.stats.sample_iters.detach().cpu())
            if zero > 0:
                applied = engine.was_step_applied()
                norm = engine.get_global_grad_norm()
                gnorm = float(norm) if norm is not None else float("nan")
            finite = applied and not bad and math.isfinite(gnorm)
            n = mb * ctx.dp_size
            step_loss = loss_sum / n if not bad else float("nan")
            if finite:
                counters["nan_streak"] = 0
            else:
                counters["nan_streak"] += 1
                counters["nan_skipped"] += 1
                log.say(f"step {step + 1}: non-finite loss or gradient, update skipped")
                if counters["nan_streak"] >= cfg.train.max_nan_steps:
                    log.close()
                    raise FloatingPointError(
                        f"{counters['nan_streak']} non-finite steps in a row "
                        f"(train.max_nan_steps={cfg.train.max_nan_steps}); last checkpoint: "
                        f"{latest_checkpoint(ckpt_root)}"
                    )
            counters["step"] += 1
            counters["tokens"] += y.numel() * ctx.dp_size
            log.advance(counters["step"])
            st = out.stats
            if cfg.model.implicit and st.converged_frac < 1.0:
                counters["unconverged"] += 1
            window.append(
                {
                    "loss": step_loss,
                    "acc": acc_sum / n,
                    "grad_norm": gnorm if finite else float("nan"),
                    **st.summary(),
                }
            )
            last = counters["step"] == cfg.train.max_steps
            if counters["step"] % cfg.train.log_interval == 0 or last:
                elapsed = time.perf_counter() - t0
                rec = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                rec["iters_max"] = max(w["iters_max"] for w in window)
                rec["residual_max"] = max(w["residual_max"] for w in window)
                rec.update(
                    step=counters["step"],
                    tokens=counters["tokens"],
                    lr=lr,
                    tokens_per_s=(counters["tokens"] - tokens_at_start) / elapsed,
                    mem_gb=memory_gb(device),
                    phase=phase.index,
                    unconverged_steps=counters["unconverged"],
                    nan_skipped=counters["nan_skipped"],
                    world_size=ctx.world_size,
                )
                window = []
                if rank0:
                    if cfg.train.eval_interval and counters["step"] % cfg.train.eval_interval == 0:
                        ev = validate(module, cfg, data, device)
                        rec.update({f"val_{k}": v for k, v in ev.items() if k != "length"})
                    log.record(rec, torch.cat(iters_seen))
                    log.say(_format_record(rec, phase.name))
                result.history.append(rec)
                iters_seen = []
            if cfg.train.save_interval and counters["step"] % cfg.train.save_interval == 0:
                save()
            if stop_any and not last:
                path = save()
                preempted = signal.Signals(stop.signum).name if stop.signum else "peer signal"
                log.say(f"ilm-train: {preempted} received, saved {path}; exiting")
                break
    log.close()
    if preempted:
        result.final = {"preempted": preempted, "step": counters["step"]}
        return result
    evals: list[dict[str, float]] = []
    if rank0:
        if cfg.data.task == "word_problem":
            lengths = [cfg.data.seq_len] + (
                [cfg.data.eval_seq_len] if cfg.data.eval_seq_len else []
            )
            evals = [
                evaluate(module, cfg, n, cfg.train.eval_batches, cfg.train.seed + 2, device)
                for n in lengths
            ]
        elif cfg.data.val_fraction or cfg.data.task == "catbabi":
            evals = [validate(module, cfg, data, device)]
        for ev in evals:
            log.say(
                f"eval length {ev['length']}: acc {ev['acc_all']:.3f}, loss {ev['loss']:.4f}, "
                f"solver iters {ev['iters_mean']:.1f}/{ev['iters_max']:.0f}"
            )
    save()
    result.final = {"eval": evals, "train": result.history[-1] if result.history else {}}
    if rank0:
        save_model(module, cfg, run_dir / "model.safetensors")
        (run_dir / "final.json").write_text(json.dumps(result.final, indent=2))
        log.say(f"saved {run_dir / 'model.safetensors'} (+ config.yaml, metrics.jsonl, final.json)")
    ctx.barrier()
    return result
