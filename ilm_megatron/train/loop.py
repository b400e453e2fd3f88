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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ilm_megatron.config import Config, config_to_yaml
from ilm_megatron.data.word_problem import sample_word_problem
from ilm_megatron.errors import RunError, UserError
from ilm_megatron.models.lm import ImplicitLM
from ilm_megatron.train.carry import CarriedState, new_carry
from ilm_megatron.train.checkpoint import (
    _step_dir,
    _write_text_atomic,
    choose_resume,
    fault_point,
    latest_checkpoint,
    move_aside,
    remove_unfinished,
    step_folders,
    step_of,
)
from ilm_megatron.train.curriculum import phase_at
from ilm_megatron.train.data import IGNORE, build_train_data
from ilm_megatron.train.engines import EvalShare, token_loss
from ilm_megatron.train.metrics import MetricsLogger, flops_per_token, memory_gb, peak_tflops
from ilm_megatron.train.rundir import RunDirLock, check_writable, move_previous_run


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


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


def _one_process(model: ImplicitLM | None, cfg: Config) -> EvalShare:
    """Evaluation in this process alone, in training-size micro-batches."""
    t = cfg.train
    mb = t.eval_micro_batch or max(1, t.batch_size // cfg.parallel.microbatches)
    return EvalShare(model, 0, 1, True, mb)


def _no_reduce(values: list[float]) -> list[float]:
    return values


def _add_logits(s: list[float], logits: torch.Tensor, y: torch.Tensor, vocab: int, last: int):
    """Accumulate loss sum, targets, hits (and last-position hits) of one micro-batch into s."""
    keep = y != IGNORE
    k = keep.sum().item()
    hits = (logits[..., :vocab].argmax(-1) == y) & keep
    if k:  # a micro-batch of padding only (CatbAbI rows end at different windows): NaN mean
        s[0] += token_loss(logits, y, vocab).item() * k
    s[1] += k
    s[2] += hits.sum().item()
    if last:
        s[3] += hits[:, -last:].sum().item()
        s[4] += keep[:, -last:].sum().item()


def _add_stats(s: list[float], m: list[float], stats: Any) -> None:
    """Accumulate per-sample iterations into s and the maxima into m."""
    it = stats.sample_iters.float().flatten()
    s[5] += it.sum().item()
    s[6] += it.numel()
    m[0] = max(m[0], it.max().item())
    m[1] = max(m[1], stats.residual.float().max().item())


@torch.no_grad()
def evaluate_pass(
    share: EvalShare,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    vocab: int,
    device: torch.device,
    max_iter: int | None = None,
    last: int = 0,
    reduce_sum: Callable[[list[float]], list[float]] = _no_reduce,
    reduce_max: Callable[[list[float]], list[float]] = _no_reduce,
    carry: CarriedState | None = None,
) -> dict[str, float]:
    """Loss, accuracy and solver statistics over ``batches`` of ``(x, y)`` (b, l), each cut into
    this rank's slice and that into micro-batches, run by ``share.model`` (or ``share.forward``,
    the pipeline ring); the sums are reduced over the ranks (``reduce_sum``/``reduce_max``,
    collective when distributed: every rank calls this, with or without a model).

    Returns ``loss`` (mean over the targets that count), ``acc_all``, with ``last > 0`` also
    ``acc_last{last}`` (the last ``last`` positions), ``iters_mean``/``iters_max``/
    ``residual_max`` over the samples, and ``samples``, the sequences evaluated.

    ``carry``: ``batches`` are consecutive windows of continuous rows; each micro-batch starts
    from its rows' state after the previous batch (``data.carry_state``; not on the pipeline).
    """
    model, mb = share.model, share.micro_batch
    s = [0.0] * 7  # loss sum, targets, correct, last correct, last targets, iters sum, samples
    m = [0.0, 0.0]  # iters max, residual max
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    for x, y in batches:
        fault_point("evaluate")
        n = x.shape[0]
        if n % share.parts:
            raise ValueError(
                f"validation batch of {n} sequences does not split over {share.parts} "
                "data-parallel replicas"
            )
        lo = share.part * n // share.parts
        hi = lo + n // share.parts
        xs, ys = list(x[lo:hi].split(mb)), list(y[lo:hi].split(mb))
        if share.forward is not None:
            if carry is not None:
                raise ValueError("data.carry_state is not supported with parallel.pp > 1")
            if (hi - lo) % mb:
                raise ValueError(
                    f"train.eval_micro_batch={mb} does not divide the {hi - lo} validation "
                    "sequences of each data-parallel replica (the pipeline needs equal "
                    "micro-batches)"
                )
            xs, ys = [t.to(device) for t in xs], [t.to(device) for t in ys]
            share.forward(
                xs, ys, max_iter, lambda lg, t: _add_logits(s, lg, t, vocab, last),
                lambda st: _add_stats(s, m, st),
            )  # fmt: skip
            continue
        if model is None:
            continue
        for j, (xc, yc) in enumerate(zip(xs, ys)):
            xc, yc = xc.to(device), yc.to(device)
            if carry is None:
                out = model(xc, max_iter=max_iter)
            else:
                out = model(xc, max_iter=max_iter, caches=carry.get(j), return_caches=True)
                carry.put(j, out.caches)
            _add_logits(s, out.logits, yc, vocab, last)
            _add_stats(s, m, out.stats)
    if model is not None:
        model.train(was_training)
    if not share.reports:
        s, m = [0.0] * 7, [0.0, 0.0]
    s, m = reduce_sum(s), reduce_max(m)
    if s[1] == 0:
        raise ValueError("validation saw no targets (empty or fully ignored batches)")
    res = {
        "loss": s[0] / s[1],
        "acc_all": s[2] / s[1],
        "iters_mean": s[5] / s[6],
        "iters_max": m[0],
        "residual_max": m[1],
        "samples": int(s[6]),  # sequences evaluated over all ranks (each exactly once)
    }
    if last:
        res[f"acc_last{last}"] = s[3] / s[4]
    return res


def evaluate(
    model: ImplicitLM | None,
    cfg: Config,
    length: int,
    batches: int,
    seed: int,
    device: torch.device,
    share: EvalShare | None = None,
    engine: Any = None,
) -> dict[str, float]:
    """Word problem: accuracy (all positions and last 10), loss and solver statistics at
    ``length`` over ``batches`` seeded batches of ``train.batch_size`` sequences.

    The simultaneous solve needs about as many iterations as the sequence is long on state-tracking
    tasks, so the eval cap grows with ``length / data.seq_len`` (never below the configured cap).
    ``share``/``engine``: a distributed pass (:meth:`Engine.eval_share`); default: this process
    alone, in training-size micro-batches.
    """
    share = share or _one_process(model, cfg)
    s = cfg.solver
    eval_cap = math.ceil(s.eval_max_iter_mult * s.f_max_iter)  # ImplicitLM.eval_max_iter
    cap = math.ceil(eval_cap * max(1.0, length / cfg.data.seq_len))
    g = torch.Generator().manual_seed(seed)

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(batches):
            yield sample_word_problem(
                cfg.data.group, cfg.train.batch_size, length, g, cfg.data.easy_frac
            )

    res = evaluate_pass(share, gen(), cfg.model.vocab_size, device, cap, 10, *_reducers(engine))
    return {"length": length, **res}


def evaluate_batches(
    model: ImplicitLM | None,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    vocab: int,
    device: torch.device,
    share: EvalShare | None = None,
    engine: Any = None,
    carry: CarriedState | None = None,
) -> dict[str, float]:
    """Loss, perplexity, token accuracy and solver statistics over fixed ``(x, y)`` batches
    (with ``carry``: consecutive windows, the state carried from each to the next)."""
    if share is None:
        mb = batches[0][0].shape[0] if batches else 1
        share = EvalShare(model, 0, 1, True, mb)
    res = evaluate_pass(share, batches, vocab, device, None, 0, *_reducers(engine), carry=carry)
    return {
        "length": batches[0][0].shape[1],
        **res,
        "ppl": math.exp(min(res["loss"], 50.0)),
    }


def _reducers(engine: Any) -> tuple[Callable, Callable]:
    if engine is None:
        return _no_reduce, _no_reduce
    return engine.all_reduce_sum, engine.all_reduce_max


def validate(
    share: EvalShare, cfg: Config, data: Any, device: torch.device, engine: Any = None
) -> dict[str, float]:
    """Periodic validation: the word problem at its training length, or the shards' val split."""
    if cfg.data.task == "word_problem":
        return evaluate(
            share.model, cfg, cfg.data.seq_len, cfg.train.eval_batches, cfg.train.seed + 2,
            device, share, engine,
        )  # fmt: skip
    batches = data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
    if not batches:
        raise ValueError(
            f"validation on {cfg.data.task} needs a validation split (data.val_fraction)"
        )
    # CatbAbI validation windows are consecutive: with data.carry_state the state is carried
    # across them, from empty at the start of the split
    carry = new_carry(cfg)
    return evaluate_batches(
        share.model, batches, cfg.model.vocab_size, device, share, engine, carry
    )


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
    """Train ``cfg`` and write ``run_dir``. Returns history and final metrics.

    The engine (:func:`~ilm_megatron.train.engines.build_engine`) follows the parallel settings
    and the launcher: one process, DeepSpeed ZeRO data parallel, or TP x PP x DP. Resumes from
    ``run_dir/checkpoints/latest`` when it exists (``train.resume``): model, optimizer, RNG and
    data state, step and token counters, so that on a CPU the loss sequence is bitwise identical
    to an uninterrupted run. SIGTERM/SIGINT (on any rank) finish the current step, save a
    checkpoint and return (``result.final["preempted"]``).
    """
    from ilm_megatron.train.engines import build_engine

    engine = build_engine(cfg)
    lock = RunDirLock(run_dir)
    try:
        return _train(cfg, run_dir, engine, lock, quiet)
    finally:
        lock.release()


def _on_rank0(engine: Any, what: Callable[[], Any]) -> Any:
    """Run ``what`` on rank 0; a :class:`UserError` there is raised on every rank (rank 0 with
    the message; the others say where to look). Collective."""
    err: UserError | None = None
    out = None
    if engine.is_rank0:
        try:
            out = what()
        except UserError as e:
            err = e
    failed = engine.all_reduce_sum([float(err is not None)])[0] if engine.distributed else 0
    if err is not None:
        raise err
    if failed:
        raise RunError("the run cannot start; rank 0 printed why")
    return out


def _prepare_run_dir(cfg: Config, run_dir: Path, lock: RunDirLock) -> tuple[int, list[str]]:
    """Rank 0's start-up checks, before anything is written: the lock, a writable folder, and
    which checkpoint to resume (``-1``: none). Returns the step and the lines to print."""
    lock.acquire()
    ckpt_root = run_dir / "checkpoints"
    check_writable(ckpt_root)
    notes: list[str] = []
    folders = step_folders(ckpt_root)
    if cfg.train.start_over:
        moved = move_previous_run(run_dir)
        if moved is not None:
            notes.append(f"ilm-train: train.start_over: the earlier run moved to {moved}")
        check_writable(ckpt_root)
        return -1, notes
    if not cfg.train.resume:
        if folders or (ckpt_root / "latest").exists():
            newest = folders[-1].name if folders else "latest"
            raise RunError(
                f"{ckpt_root} holds checkpoints of an earlier run (newest {newest}) "
                "and train.resume=false: set train.resume=true to continue it, "
                "train.start_over=true to move it aside and start again, or use another run_dir"
            )
        return -1, notes
    choice = choose_resume(ckpt_root)
    notes += [f"ilm-train: {n}" for n in choice.notes]
    for bad in choice.damaged:
        notes.append(f"ilm-train: moved {bad.name} aside to {move_aside(bad, 'damaged').name}")
    remove_unfinished(ckpt_root)
    return (step_of(choice.path) if choice.path is not None else -1), notes


def _check_resume_matches(cfg: Config, latest: Path) -> None:
    """Refuse a resume whose data task differs from the checkpoint's (its data state would not
    fit the new loader)."""
    saved = latest / "config.yaml"
    if not saved.is_file():
        return
    from omegaconf import OmegaConf

    data = OmegaConf.load(saved).get("data", {})
    task = data.get("task", "word_problem")
    if task != cfg.data.task:
        raise RunError(
            f"{latest} was written with data.task={task}, now data.task={cfg.data.task}: resume "
            "with the same task, or start over (train.start_over=true / another run_dir)"
        )


def _check_validation(cfg: Config, data: Any) -> None:
    """Periodic validation on shards needs a validation split with at least one batch."""
    if not cfg.train.eval_interval or cfg.data.task == "word_problem":
        return
    if cfg.data.task == "shards" and cfg.data.val_fraction <= 0:
        raise RunError(
            f"train.eval_interval={cfg.train.eval_interval} needs a validation split: set "
            "data.val_fraction > 0 (or train.eval_interval=0)"
        )
    if not data.val_batches(cfg.train.batch_size, 1):
        raise RunError(
            f"the validation split of {cfg.data.path or cfg.data.task} holds no batch of "
            f"{cfg.train.batch_size} sequences (data.val_fraction={cfg.data.val_fraction})"
        )


def _train(cfg: Config, run_dir: Path, engine: Any, lock: RunDirLock, quiet: bool) -> TrainResult:
    rank0 = engine.is_rank0
    config_text = config_to_yaml(cfg)
    ckpt_root = run_dir / "checkpoints"
    device = engine.device
    resume_step, notes = _on_rank0(engine, lambda: _prepare_run_dir(cfg, run_dir, lock)) or (-1, [])
    if engine.distributed:
        resume_step = int(engine.all_reduce_sum([float(resume_step + 1)])[0]) - 1
    latest = _step_dir(ckpt_root, resume_step) if resume_step >= 0 else None
    if latest is not None:
        _check_resume_matches(cfg, latest)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = build_train_data(cfg, engine.dp_rank, engine.dp_size)
    _check_validation(cfg, data)
    carry = new_carry(cfg)  # data.carry_state: this rank's rows' state between windows
    state = engine.setup(data, latest)
    counters = {"step": 0, "tokens": 0, "nan_streak": 0, "nan_skipped": 0, "unconverged": 0}
    if state is not None:
        counters.update(state["counters"])
    metrics_path = run_dir / "metrics.jsonl"
    logged_up_to = 0  # the last step metrics.jsonl holds a training record of (rank 0)
    if rank0:  # every check passed: now the run's files
        _write_text_atomic(run_dir / "config.yaml", config_text)
        if state is not None:
            logged_up_to = _truncate_metrics(metrics_path, counters["step"])
        else:
            metrics_path.write_text("")
    # the job died after saving a step and before writing its record: write it first
    rewrite = state is not None and "pending_record" in state and logged_up_to < counters["step"]
    if engine.distributed:
        rewrite = engine.all_reduce_sum([float(rank0 and rewrite)])[0] > 0
    engine.barrier()
    log = MetricsLogger(
        run_dir, quiet or not rank0, cfg.train.tensorboard and rank0, config_text,
        cfg.train.max_steps, purge_step=counters["step"] + (0 if rewrite else 1),
    )  # fmt: skip
    for line in notes:
        log.say(line)
    peak = peak_tflops(device, cfg.train.peak_tflops) * engine.world_size
    log.set_flops(flops_per_token(engine.flops_model(), cfg), peak)
    if state is not None:
        torch.set_rng_state(state["rng_torch"])
        data.load_state_dict(state["data"])
        how = state.get("resumed_from", "")
        log.say(f"ilm-train: resumed from {latest}{how} at step {counters['step']}")
        if carry is not None and "carry" in state:
            carry.load_state_dict(state["carry"], device)
        elif carry is not None:
            log.say("ilm-train: the checkpoint holds no carried state: rows start empty")
    engine.barrier()

    def save(pending: dict | None = None) -> Path:
        trainer_state = {
            "rng_torch": torch.get_rng_state(),
            "data": data.state_dict(),
            "counters": dict(counters),
        }
        if carry is not None and engine.carries_state_in_checkpoint:
            trainer_state["carry"] = carry.state_dict()  # this rank's rows
        if pending is not None:  # this step's record, logged after the save (see ``emit``)
            trainer_state["pending_record"] = pending
        return engine.save(ckpt_root, trainer_state)

    def evaluate_now(lengths: list[int] | None = None) -> list[dict[str, float]]:
        """Validation (collective): every data-parallel replica evaluates its slice of each batch
        in micro-batches on the model it trains, and the sums are all-reduced."""
        share = engine.eval_share()
        red = engine if engine.distributed else None
        if lengths is None:
            return [validate(share, cfg, data, device, red)]
        seed = cfg.train.seed + 2
        return [evaluate(share.model, cfg, n, cfg.train.eval_batches, seed, device, share, red)
                for n in lengths]  # fmt: skip

    result = TrainResult(run_dir)
    log.say(
        f"ilm-train: {'implicit' if cfg.model.implicit else 'explicit'} {cfg.model.arch}, "
        f"{engine.n_params() / 1e3:.1f}K params, {data.describe}, {cfg.train.max_steps} steps on "
        f"{engine.describe()}; run dir {run_dir}"
    )
    t0 = time.perf_counter()
    tokens_at_start = counters["tokens"]
    window: list[dict[str, float]] = []
    iters_seen: list[torch.Tensor] = []
    preempted = None
    pending: dict | None = None

    def emit(pending: dict) -> None:
        """Validate when due, then write a log step's record (metrics.jsonl, TensorBoard)."""
        rec = pending["rec"]
        if cfg.train.eval_interval and rec["step"] % cfg.train.eval_interval == 0:
            for ev in evaluate_now():
                rec.update({f"val_{k}": v for k, v in ev.items() if k != "length"})
        result.history.append(rec)
        if rank0:
            log.record(rec, pending["iters"])
            log.say(_format_record(rec, pending["phase"]))

    if rewrite:
        emit(state["pending_record"])
    with _StopFlag() as stop:
        while counters["step"] < cfg.train.max_steps:
            step = counters["step"]
            fault_point("step")
            if engine.distributed:
                _test_hooks(step, engine.rank, engine.world_size, run_dir, None)
            phase = phase_at(counters["tokens"], cfg)  # the solver settings of this step
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            x, y = data.next_batch()
            x, y = x.to(device), y.to(device)
            if carry is not None and data.starts_stream:
                carry.reset()  # a new epoch's stream: other stories on every row

            def hook(loss: torch.Tensor, step: int = step) -> torch.Tensor:
                if not engine.distributed:
                    return loss
                return _test_hooks(step, engine.rank, engine.world_size, run_dir, loss)

            out = engine.train_step(x, y, phase.solver, stop.signum is not None, hook, carry)
            if out.applied:
                counters["nan_streak"] = 0
            else:  # skipped on every rank; stop after too many in a row
                if carry is not None and carry.reset_if_nonfinite():
                    log.say(f"step {step + 1}: non-finite carried state, rows start empty")
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
            counters["tokens"] += y.numel() * engine.dp_size
            log.advance(counters["step"])
            st = out.stats
            if cfg.model.implicit and st.converged_frac < 1.0:
                counters["unconverged"] += 1  # solver hit its cap before the tolerance
            iters_seen.append(st.sample_iters.detach().cpu())
            window.append(
                {"loss": out.loss, "acc": out.acc, "grad_norm": out.grad_norm, **st.summary()}
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
                    f_max_iter=phase.f_max_iter,
                    phantom_steps=phase.phantom_steps,
                    unconverged_steps=counters["unconverged"],
                    nan_skipped=counters["nan_skipped"],
                )
                if engine.distributed:
                    rec["world_size"] = engine.world_size
                window = []
                pending = {"rec": rec, "iters": torch.cat(iters_seen), "phase": phase.name}
                iters_seen = []
            # save before anything that can fail (validation); the step's record is written
            # after it, and kept in the checkpoint until then
            if cfg.train.save_interval and counters["step"] % cfg.train.save_interval == 0:
                save(pending)
            if pending is not None:
                emit(pending)
                pending = None
            if out.stop and not last:
                path = save()
                preempted = signal.Signals(stop.signum).name if stop.signum else "peer signal"
                log.say(f"ilm-train: {preempted} received, saved {path}; exiting")
                break
        if not preempted:
            # the end of the run: the final checkpoint first, then evaluation and export (a
            # failure or a signal there loses nothing: a rerun of the same command finishes them)
            path = save()
            signalled = stop.signum is not None
            if engine.distributed:
                signalled = engine.all_reduce_sum([float(signalled)])[0] > 0
            if signalled:
                preempted = signal.Signals(stop.signum).name if stop.signum else "peer signal"
                log.say(f"ilm-train: {preempted} received, saved {path}; exiting before the final "
                        "evaluation (run the same command again to finish it)")  # fmt: skip
            else:
                _finish(cfg, run_dir, engine, log, result, evaluate_now)
    log.close()
    if preempted:
        result.final = {"preempted": preempted, "step": counters["step"]}
    engine.barrier()
    return result


def _finish(
    cfg: Config,
    run_dir: Path,
    engine: Any,
    log: MetricsLogger,
    result: TrainResult,
    evaluate_now: Callable[..., list[dict[str, float]]],
) -> None:
    """Final evaluation, export and ``final.json`` (after the final checkpoint is saved)."""
    if cfg.data.task == "word_problem":
        lengths = [cfg.data.seq_len] + ([cfg.data.eval_seq_len] if cfg.data.eval_seq_len else [])
        evals = evaluate_now(lengths)
    else:
        has_val = cfg.data.val_fraction > 0 or cfg.data.task == "catbabi"
        evals = evaluate_now() if has_val else []
    for ev in evals:
        log.say(
            f"eval length {ev['length']}: acc {ev['acc_all']:.3f}"
            + (f" (last 10: {ev['acc_last10']:.3f})" if "acc_last10" in ev else "")
            + f", loss {ev['loss']:.4f}, solver iters {ev['iters_mean']:.1f}/"
            f"{ev['iters_max']:.0f}, residual max {ev['residual_max']:.2e}"
        )
    result.final = {
        "eval": evals,
        "train": result.history[-1] if result.history else {},
        "engine": engine.describe(),  # the layout and engine in force
    }
    engine.export(run_dir / "model.safetensors")
    if engine.is_rank0:
        _write_text_atomic(run_dir / "final.json", json.dumps(result.final, indent=2))
    log.say(f"saved {run_dir / 'model.safetensors'} (+ config.yaml, metrics.jsonl, final.json)")


def _format_record(rec: dict[str, Any], phase: str) -> str:
    return (
        f"step {rec['step']:5d} | loss {rec['loss']:.4f} | acc {rec['acc']:.3f} | "
        f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | iters {rec['iters_mean']:.1f}"
        f"/{rec['iters_max']:.0f} ({phase}) | res {rec['residual_mean']:.2e}"
        f"/{rec['residual_max']:.2e} | conv {rec['converged_frac']:.2f} | "
        f"{rec['tokens_per_s']:.0f} tok/s"
        + (f" | mfu {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
        + (f" | val loss {rec['val_loss']:.4f}" if "val_loss" in rec else "")
        + (f" | val acc {rec['val_acc_all']:.3f}" if "val_acc_all" in rec else "")
    )


def default_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("ILM_RUNS", "runs")) / f"{cfg.model.arch}-{stamp}"


# ---------------------------------------------------------------------------------------------
# Fault injection and metrics bookkeeping for multi-process runs

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


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop records after ``step`` (written by an attempt that died before its next save) and
    lines torn by a crash; return the last step that keeps a training record (0: none)."""
    if not path.is_file():
        return 0
    keep = []
    last = 0
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:  # a line torn by a crash mid-write
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
            last = max(last, int(rec.get("step", 0)))
    _write_text_atomic(path, "".join(ln + "\n" for ln in keep))
    return last
