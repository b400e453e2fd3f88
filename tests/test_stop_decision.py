"""The solver's stop decision under pipeline and data parallelism, against one process.

With a realistic tolerance the samples of a batch meet it after different numbers of iterations,
and the training solve stops when the last of them does (the batch maximum of the per-sample
residual): each micro-batch has its own stop decision. The reference is the single-process
trainer with ``parallel.microbatches=2``, whose per-micro-batch solver statistics are recorded
as they are merged:

* PP=2 with the same two micro-batches: the last stage decides for each micro-batch as one
  process does, so losses, gradient norms, iterations and weights follow the reference.
* DP=2 (plain data parallelism on the native engine, and DeepSpeed ZeRO-1): each replica's share
  of the global batch is one of the reference's micro-batches, so each replica's decision is the
  reference's for that micro-batch. The logged solver statistics are the first replica's, those
  of the reference's first micro-batch.

The reference checks first that the decisions differ between samples and between micro-batches
(one decision for the whole batch would change the losses beyond the tolerance of these tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _dist import records, torchrun_train

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.engines import local as engines  # LocalEngine's merge_stats
from ilm_megatron.train.loop import train

pytestmark = pytest.mark.slow

CAP = 20  # solver.f_max_iter: never reached, every solve stops on the tolerance
STEPS = 4
BASE = [
    "train.batch_size=8",
    "data.seq_len=8",
    "data.eval_seq_len=0",
    f"solver.f_max_iter={CAP}",
    "solver.f_tol=1e-2",
    "solver.phantom_steps=2",
    "model.iterate_init_scale=0.5",
    "train.seed=1",
    "train.log_interval=1",
    "train.eval_batches=1",
    "train.tensorboard=true",
    "train.device=cpu",
    f"train.max_steps={STEPS}",
    "model.n_layers=2",
    "model.ngroups=2",
]
REL = 1e-5


@dataclass
class Reference:
    """The single-process run and, per step, each micro-batch's ``(iters, sample_iters)``."""

    run: Path
    microbatches: list[list[tuple[int, list[int]]]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> Reference:
    """One process, two micro-batches of 4 sequences (each its own solve and stop decision)."""
    run = tmp_path_factory.mktemp("single")
    seen: list[list[tuple[int, list[int]]]] = []
    merge = engines.merge_stats

    def spy(stats):
        seen.append([(s.iters, s.sample_iters.tolist()) for s in stats])
        return merge(stats)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engines, "merge_stats", spy)
        cfg = load_config([], [*BASE, f"run_dir={run}", "parallel.microbatches=2"])
        train(cfg, run, quiet=True)
    assert len(seen) == STEPS and all(len(s) == 2 for s in seen)
    return Reference(run, seen)


def _histograms(run: Path) -> dict[int, tuple[float, ...]]:
    """``{step: (num, min, max, sum, sum of squares)}`` of TensorBoard's iters_per_sample."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    out = {}
    for e in acc.Histograms("solver/iters_per_sample"):
        h = e.histogram_value
        out[e.step] = (h.num, h.min, h.max, h.sum, h.sum_squares)
    return out


def _moments(iters: list[int]) -> tuple[float, ...]:
    return (len(iters), min(iters), max(iters), sum(iters), sum(i * i for i in iters))


def _solver_logged(run: Path, per_step: list[list[int]], decided: list[int]) -> None:
    """The run's logged solver statistics of each step: the solve stopped after ``decided[s]``
    iterations, the samples logged met the tolerance after ``per_step[s]``."""
    recs, hists = records(run), _histograms(run)
    assert sorted(hists) == [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r, iters, stop in zip(recs, per_step, decided):
        s = r["step"]
        assert r["iters"] == stop, (s, r, stop)
        assert r["iters_max"] == max(iters), (s, r, iters)
        assert r["iters_mean"] == pytest.approx(sum(iters) / len(iters), rel=1e-9), (s, r, iters)
        assert hists[s] == pytest.approx(_moments(iters), rel=1e-9), (s, hists[s], iters)
        assert r["unconverged_steps"] == 0 and r["converged_frac"] == 1.0, r


def _follows(run: Path, ref: Path) -> None:
    """Losses and gradient norms of every step, and the final weights, against the reference."""
    a, b = records(ref), records(run)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=REL), (rb["step"], rb, ra)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=REL), (rb["step"], rb, ra)
    wa = ckpt.load_state(ref / "model.safetensors")
    wb = ckpt.load_state(run / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_samples_and_microbatches_stop_at_different_iterations(reference: Reference) -> None:
    """The reference is not vacuous: per-sample iteration counts differ within every batch, each
    micro-batch stops after its slowest sample (below the cap), and the two micro-batches'
    decisions differ in both directions on some steps."""
    firsts, seconds = [], []
    for step, mbs in enumerate(reference.microbatches, 1):
        samples = [i for _, si in mbs for i in si]
        assert min(samples) < max(samples), (step, mbs)
        for iters, si in mbs:
            assert iters == max(si) < CAP, (step, mbs)
        firsts.append(mbs[0][0])
        seconds.append(mbs[1][0])
    assert any(a < b for a, b in zip(firsts, seconds)), (firsts, seconds)
    assert any(a > b for a, b in zip(firsts, seconds)), (firsts, seconds)
    # the log: the step's iterations are the slowest micro-batch's, the histogram has every sample
    _solver_logged(
        reference.run,
        [[i for _, si in mbs for i in si] for mbs in reference.microbatches],
        [max(a, b) for a, b in zip(firsts, seconds)],
    )


def test_pp2_stops_each_microbatch_as_one_process(tmp_path: Path, reference: Reference) -> None:
    """PP=2, two micro-batches around the ring: the last stage's decisions are the reference's."""
    run = tmp_path / "pp2"
    torchrun_train(run, *BASE, "parallel.pp=2", "parallel.microbatches=2")
    assert all(r["world_size"] == 2 for r in records(run))
    _follows(run, reference.run)
    _solver_logged(
        run,
        [[i for _, si in mbs for i in si] for mbs in reference.microbatches],
        [max(it for it, _ in mbs) for mbs in reference.microbatches],
    )


@pytest.mark.parametrize("zero", [0, 1], ids=["plain", "zero1"])
def test_dp2_replicas_stop_on_their_own_share(
    zero: int, tmp_path: Path, reference: Reference
) -> None:
    """DP=2, one micro-batch per replica: replica ``r`` solves the reference's micro-batch ``r``
    and stops when its own samples have converged. ``parallel.zero_stage=0`` runs the native
    engine (TP = PP = 1), ``1`` DeepSpeed ZeRO-1; both log the first replica's statistics."""
    run = tmp_path / "dp2"
    torchrun_train(run, *BASE, f"parallel.zero_stage={zero}")
    assert all(r["world_size"] == 2 for r in records(run))
    _follows(run, reference.run)
    first = [mbs[0] for mbs in reference.microbatches]
    _solver_logged(run, [si for _, si in first], [iters for iters, _ in first])
