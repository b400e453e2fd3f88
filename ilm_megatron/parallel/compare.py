"""TP x PP against the single-process model: the worker behind ``tools/check_parallel.py``.

Run :func:`compare_parallel` under :func:`ilm_megatron.core.parallel_state.spawn` with ``tp * pp``
processes (Megatron's layout: TP innermost, so a stage's TP ranks are consecutive global ranks and
each TP rank has its own ring through the stages). Every rank

1. builds the single-process model (``backend=local``) from ``seed``: the reference;
2. builds the parallel model (``backend=tp`` when ``tp > 1``) from another seed and loads the
   reference's full state dict into it (its TP shard), or, with ``init_checkpoint``, both models
   take their weights from that file (a plain single-process state dict saved at any TP/PP size);
3. runs ``N`` micro-batches of training (solve, phantom steps, backward with loss scale ``1/N``):
   the plain parallel model micro-batch by micro-batch when ``pp == 1``, else its pipeline stage
   through :func:`~ilm_megatron.parallel.pipeline.pipeline_forward_backward`; the reference runs
   the same micro-batches one by one;
4. compares training-mode logits (last stage) and losses, every parameter gradient (gathered over
   the stage's TP group; each stage checks its own parameters and the union must cover the model),
   solver iteration counts (every rank, per micro-batch, and per sample on the last stage);
5. takes one SGD step (``p -= STEP_LR * grad``) on both models, so that every stage's weights
   differ from the copies of the other stages' layers a rank also holds; saves a checkpoint from
   the parallel run (TP gathered per stage, stages gathered on one rank, written atomically) and
   loads it into a fresh single-process model, whose training-mode logits must equal those of the
   parallel model (forward ring again) and of the reference after the step;
6. when ``pp == 1``: eval-mode logits and sequential decoding too (the ring has no such mode).

Per-rank maxima are combined with collectives; global rank 0 writes the JSON result.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ilm_megatron.core.parallel_state import (
    pp_global_ranks,
    pp_group,
    pp_rank,
    pp_world_size,
    tp_world_size,
)
from ilm_megatron.core.tensor_parallel import reduce_sequence_parallel_grads

STEP_LR = 0.5  # SGD step before the checkpoint (moves every weight with a gradient visibly)

# float diffs in the result JSON that must stay below the tolerance (None: does not apply)
DIFF_KEYS = (
    "max_abs_logit_diff",
    "max_rel_grad_diff",
    "loss_diff",
    "eval_logit_diff",
    "checkpoint_logit_diff",
    "sequential_logit_diff",
)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between paired tensors (0 for empty lists)."""
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), default=0.0)


def _train_single(
    model: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    scale: float,
    backward: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[torch.Tensor]]:
    """Micro-batch by micro-batch: ``model(x_i)`` in training mode, ``(scale * loss_i).backward()``.

    Returns per micro-batch: detached logits (b, l, V'), losses (), solver iterations, per-sample
    iterations (b,).
    """
    from ilm_megatron.parallel.pipeline import default_loss

    vocab = model.config.vocab_size
    model.train()
    logits, losses, iters, sample_iters = [], [], [], []
    for x, y in zip(xs, ys):
        with torch.enable_grad():
            out = model(x)
            loss = default_loss(out.logits, y, vocab)
        if backward:
            (scale * loss).backward()
        logits.append(out.logits.detach())
        losses.append(loss.detach())
        iters.append(int(out.stats.iters))
        sample_iters.append(out.stats.sample_iters.detach())
    return logits, losses, iters, sample_iters


def compare_parallel(
    rank: int,
    config: Any,
    seed: int,
    result_path: str,
    ckpt_path: str,
    batch: int = 2,
    seq_len: int = 12,
    microbatches: int = 1,
    init_checkpoint: str | None = None,
    in_flight: int = 2,
    seq_decode_len: int = 6,
) -> None:
    """One worker of the TP x PP vs single-process check (see the module docstring).

    Args:
        rank: global rank (given by the spawner).
        config: a :class:`ilm_megatron.config.Config`; its TP/PP sizes are those of the initialised
            Megatron parallel state (``spawn(..., tp=, pp=)``).
        seed: weights (unless ``init_checkpoint``) and data (``seed + 1``).
        result_path: where global rank 0 writes the JSON dict.
        ckpt_path: where the checkpoint of the parallel run is written.
        batch, seq_len: micro-batch shape (b, l) of token ids.
        microbatches: N micro-batches (through the ring when pp > 1).
        init_checkpoint: optional checkpoint both models load their weights from.
        in_flight: M micro-batches in the ring at once.
        seq_decode_len: tokens decoded sequentially in the pp == 1 check.
    """
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import (
        full_grads,
        load_checkpoint,
        load_full_state_dict,
        save_checkpoint,
        stage_state_names,
    )
    from ilm_megatron.parallel.pipeline import pipeline_forward_backward, split_model_into_stages

    cfg = config
    tp, pp, s_idx = tp_world_size(), pp_world_size(), pp_rank()
    world = dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    local_cfg = dataclasses.replace(cfg.model, backend="local")
    par_cfg = dataclasses.replace(cfg.model, backend="tp" if tp > 1 else "local")

    torch.manual_seed(seed)
    ref = build_model(local_cfg, cfg.solver).to(device)
    torch.manual_seed(seed + 7)  # the parallel model's weights must come from ref or the file
    par = build_model(par_cfg, cfg.solver).to(device)
    if init_checkpoint:
        load_checkpoint(ref, init_checkpoint)
        load_checkpoint(par, init_checkpoint)
    else:
        load_full_state_dict(par, ref.state_dict())

    n_mb = microbatches
    scale = 1.0 / n_mb
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = cfg.model.vocab_size
    ids = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(n_mb)]
    xs = [i[:, :-1].contiguous().to(device) for i in ids]
    ys = [i[:, 1:].contiguous().to(device) for i in ids]

    # reference: the single process, one micro-batch at a time
    lg_ref, loss_ref, it_ref, sit_ref = _train_single(ref, xs, ys, scale)
    g_ref = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}

    # the parallel run
    stage = None
    positions = 0  # of the iterate on this rank
    comm_ratio = 0.0  # pipeline: iterate bytes sent per message over b * l * d / tp

    def ring(backward: bool) -> tuple[list[torch.Tensor], Any]:
        """The micro-batches round the ring (with their backward), logits kept."""
        return pipeline_forward_backward(
            stage,
            xs if stage.is_first else None,
            ys if stage.is_last else None,
            cfg.solver,
            n_microbatches=n_mb,
            in_flight=in_flight,
            pp_ranks=pp_global_ranks(),
            group=pp_group(),
            loss_scale=scale,
            backward=backward,
            keep_logits=True,
        )

    if pp == 1:
        lg_par, loss_par, it_par, sit_par = _train_single(par, xs, ys, scale)
        if par.sequence_parallel:  # the norms' gradients cover this rank's positions only
            reduce_sequence_parallel_grads(par.parameters())
    else:
        stage = split_model_into_stages(par, s_idx, pp)
        losses, stats = ring(backward=True)
        if par.sequence_parallel:
            reduce_sequence_parallel_grads(stage.parameters())
        positions = stats.iterate_shape[1]
        it_par = list(stats.iters)
        msgs = stats.messages.get("iterate", 0)
        if msgs:  # iterate bytes per forward message over the ideal b * l * d / tp fp32 values
            ideal = batch * seq_len * cfg.model.d_model * 4 / tp
            comm_ratio = stats.sent_bytes["iterate"] / msgs / ideal
        lg_par, loss_par, sit_par = [], [], []
        if stage.is_last:
            lg_par, loss_par = stats.logits, losses
            sit_par = [s.sample_iters for s in stats.solver]
    has_logits = bool(lg_par)
    logit_diff = _max_diff(lg_par, lg_ref) if has_logits else 0.0
    loss_diff = _max_diff(loss_par, loss_ref) if has_logits else 0.0

    # gradients: gathered over TP inside the stage, compared per stage
    g_par = full_grads(par)
    owned = set(g_ref) if stage is None else set(stage_state_names(par, stage)) & set(g_ref)
    stray = sorted(set(g_par) - owned)  # a gradient on a parameter another stage owns
    rel = 0.0
    for k in sorted(owned & set(g_par)):
        g = g_ref[k]
        rel = max(rel, ((g_par[k] - g).abs().max() / (g.abs().max() + 1e-12)).item())
    checked = sorted(owned & set(g_par))

    # iterations: every rank knows the per micro-batch counts; the last stage the per-sample ones
    iters_ok = it_par == it_ref and all(torch.equal(a, b) for a, b in zip(sit_par, sit_ref))
    if has_logits and len(sit_par) != n_mb:
        iters_ok = False

    # one SGD step on both (a rank only updates the parameters of its stage), then the checkpoint
    # of the parallel run -> a fresh single-process model
    with torch.no_grad():
        for m in (ref, par):
            for p in m.parameters():
                if p.grad is not None:
                    p.sub_(STEP_LR * p.grad)
    if pp == 1:
        lg_step = _train_single(par, xs, ys, scale, backward=False)[0]
    else:
        lg_step = ring(backward=False)[1].logits
    save_checkpoint(par, ckpt_path, stage=stage)
    ckpt_diff = 0.0
    if has_logits:
        lg_ref_step = _train_single(ref, xs, ys, scale, backward=False)[0]
        torch.manual_seed(seed + 13)
        single = build_model(local_cfg, cfg.solver).to(device)
        load_checkpoint(single, ckpt_path)
        lg_single = _train_single(single, xs, ys, scale, backward=False)[0]
        ckpt_diff = max(_max_diff(lg_single, lg_step), _max_diff(lg_single, lg_ref_step))

    eval_diff = seq_diff = 0.0
    if pp == 1:
        with torch.no_grad():
            ref.eval()
            par.eval()
            x = xs[0]
            ev_ref, ev_par = ref(x), par(x)
            positions = ev_par.hidden.shape[1]  # of the iterate on this rank
            iters_ok &= torch.equal(ev_ref.stats.sample_iters, ev_par.stats.sample_iters)
            eval_diff = (ev_ref.logits - ev_par.logits).abs().max().item()
            xq = x[:, :seq_decode_len]
            sq_ref, sq_par = ref.forward_sequential(xq), par.forward_sequential(xq)
            seq_diff = (sq_ref.logits - sq_par.logits).abs().max().item()
            iters_ok &= torch.equal(sq_ref.stats.sample_iters, sq_par.stats.sample_iters)

    # combine over all ranks: max of the diffs, all of the iteration checks, union of the names
    vals = torch.tensor(
        [logit_diff, rel, loss_diff, eval_diff, ckpt_diff, seq_diff, comm_ratio],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    ok = torch.tensor([int(iters_ok)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, {"checked": checked, "stray": stray, "iters": it_par})
    union = {n for r in per_rank for n in r["checked"]}
    mismatch = sorted((set(g_ref) ^ union) | {n for r in per_rank for n in r["stray"]})
    logit_d, rel_d, loss_d, eval_d, ckpt_d, seq_d, comm_d = vals.tolist()
    result = {
        "tp": tp,
        "pp": pp,
        "sequence_parallel": par.sequence_parallel,
        "iterate_positions_per_rank": positions,  # seq_len / tp under sequence parallelism
        # rows of the embedding table on this rank (padded vocabulary / tp under TP)
        "embedding_rows_per_rank": int(par.embedding.weight.shape[0]),
        "microbatches": n_mb,
        "in_flight": in_flight if pp > 1 else None,
        # largest over ranks of the ring's iterate bytes per message / (b * l * d / tp * 4)
        "ring_comm_bytes_over_ideal": comm_d if pp > 1 else None,
        "max_abs_logit_diff": logit_d,
        "max_rel_grad_diff": rel_d,
        "loss_diff": loss_d,
        "iters_equal": bool(ok.item()),
        "solver_iters": it_ref,
        "solver_iters_per_rank": [r["iters"] for r in per_rank],
        "eval_logit_diff": eval_d if pp == 1 else None,
        "checkpoint_logit_diff": ckpt_d,
        "sequential_logit_diff": seq_d if pp == 1 else None,
        "init_checkpoint": init_checkpoint,
        "grad_params": len(g_ref),
        "grad_name_mismatch": mismatch,
    }
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(result, f)


def result_ok(result: dict[str, Any], tol: float) -> bool:
    """True when iterations agree, no gradient is missing or stray, and every diff is < ``tol``."""
    diffs = [result.get(k) for k in DIFF_KEYS]
    return (
        bool(result["iters_equal"])
        and not result.get("grad_name_mismatch")
        and all(d < tol for d in diffs if d is not None)
    )


__all__ = ["DIFF_KEYS", "compare_parallel", "result_ok"]


def compare_with_single_process(
    rank: int,
    config: object,
    seed: int,
    result_path: str,
    ckpt_path: str,
    batch: int = 2,
    seq_len: int = 12,
    seq_decode_len: int = 6,
) -> None:
    """One TP worker of the TP-vs-single-process check (PP=1), run under
    :func:`~ilm_megatron.core.parallel_state.spawn`.

    Kept for callers of the TP-only check: it is :func:`compare_parallel` with one micro-batch
    (training-mode logits, loss, every gathered gradient, iteration counts on every rank, eval
    logits, a checkpoint saved at this TP size and loaded into a single-process model,
    sequential decoding). Global rank 0 writes the JSON dict.

    Args:
        config: a :class:`ilm_megatron.config.Config` with ``parallel.tp`` equal to the world size.
    """
    compare_parallel(
        rank,
        config,
        seed,
        result_path,
        ckpt_path,
        batch=batch,
        seq_len=seq_len,
        microbatches=1,
        seq_decode_len=seq_decode_len,
    )
