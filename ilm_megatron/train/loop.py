"""Single-process training loop (the core that ``ilm-train`` runs).

One step: draw a batch, no-grad fixed-point solve, ``k`` phantom steps with autograd, loss,
backward, clip, AdamW. Every ``log_interval`` steps it prints loss, accuracy, learning rate, grad
norm, throughput and the solver's iterations and residuals, and appends the same record to
``<run_dir>/metrics.jsonl``. At the end it evaluates, saves the model atomically and returns the
final metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ilm_megatron.config import Config, config_to_yaml
from ilm_megatron.data.word_problem import sample_word_problem
from ilm_megatron.models.lm import ImplicitLM, build_model
from ilm_megatron.train.checkpoint import save_model


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
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
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


def train(cfg: Config, run_dir: Path, quiet: bool = False) -> TrainResult:
    """Train ``cfg`` in this process and write ``run_dir``. Returns history and final metrics."""
    par = cfg.parallel
    if par.tp * par.pp > 1 or par.zero_stage or par.microbatches > 1:
        raise NotImplementedError(
            f"parallel.tp={par.tp}, parallel.pp={par.pp}, parallel.microbatches="
            f"{par.microbatches}, parallel.zero_stage={par.zero_stage}: this trainer runs a single "
            "process; tensor/pipeline parallelism and ZeRO are not available in it yet"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
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
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    vocab = cfg.model.vocab_size
    result = TrainResult(run_dir)
    log_path = run_dir / "metrics.jsonl"
    log_path.write_text("")
    n_params = sum(p.numel() for p in model.parameters())
    bar = None
    if not quiet and sys.stdout.isatty():  # a progress bar for people, plain lines for logs
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, unit="step", dynamic_ncols=True, leave=False)
    say = (lambda *a: None) if quiet else (bar.write if bar is not None else print)
    say(
        f"ilm-train: {'implicit' if cfg.model.implicit else 'explicit'} {cfg.model.arch}, "
        f"{n_params / 1e3:.1f}K params, {cfg.data.group} word problem at length "
        f"{cfg.data.seq_len}, {cfg.train.max_steps} steps on {device}; run dir {run_dir}"
    )
    t0 = time.perf_counter()
    tokens = 0
    window: list[dict[str, float]] = []
    for step in range(cfg.train.max_steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = sample_word_problem(
            cfg.data.group, cfg.train.batch_size, cfg.data.seq_len, gen, cfg.data.easy_frac
        )
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = token_loss(out.logits, y, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad or 1e30)
        opt.step()
        if bar is not None:
            bar.update(1)
        tokens += y.numel()
        acc = (out.logits[..., :vocab].argmax(-1) == y).float().mean().item()
        s = out.stats.summary()
        window.append({"loss": loss.item(), "acc": acc, "grad_norm": gnorm.item(), **s})
        if (step + 1) % cfg.train.log_interval == 0 or step + 1 == cfg.train.max_steps:
            elapsed = time.perf_counter() - t0
            rec = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            rec["iters_max"] = max(w["iters_max"] for w in window)
            rec["residual_max"] = max(w["residual_max"] for w in window)
            rec.update(step=step + 1, tokens=tokens, lr=lr, tokens_per_s=tokens / elapsed)
            window = []
            if cfg.train.eval_interval and (step + 1) % cfg.train.eval_interval == 0:
                ev = evaluate(
                    model, cfg, cfg.data.seq_len, cfg.train.eval_batches, cfg.train.seed + 2, device
                )
                rec.update({f"val_{k}": v for k, v in ev.items() if k != "length"})
            result.history.append(rec)
            with log_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            say(
                f"step {rec['step']:5d} | loss {rec['loss']:.4f} | acc {rec['acc']:.3f} | "
                f"lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | iters {rec['iters_mean']:.1f}"
                f"/{rec['iters_max']:.0f} | res {rec['residual_mean']:.2e}"
                f"/{rec['residual_max']:.2e} | conv {rec['converged_frac']:.2f} | "
                f"{rec['tokens_per_s']:.0f} tok/s"
                + (f" | val acc {rec['val_acc_all']:.3f}" if "val_acc_all" in rec else "")
            )
    if bar is not None:
        bar.close()
    lengths = [cfg.data.seq_len] + ([cfg.data.eval_seq_len] if cfg.data.eval_seq_len else [])
    evals = [
        evaluate(model, cfg, n, cfg.train.eval_batches, cfg.train.seed + 2, device) for n in lengths
    ]
    for ev in evals:
        say(
            f"eval length {ev['length']}: acc {ev['acc_all']:.3f} (last 10: "
            f"{ev['acc_last10']:.3f}), loss {ev['loss']:.4f}, solver iters "
            f"{ev['iters_mean']:.1f}/{ev['iters_max']:.0f}, residual max {ev['residual_max']:.2e}"
        )
    save_model(model, cfg, run_dir / "model.safetensors")
    result.final = {"eval": evals, "train": result.history[-1] if result.history else {}}
    (run_dir / "final.json").write_text(json.dumps(result.final, indent=2))
    say(f"saved {run_dir / 'model.safetensors'} (+ config.yaml, metrics.jsonl, final.json)")
    return result


def default_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("ILM_RUNS", "runs")) / f"{cfg.model.arch}-{stamp}"
