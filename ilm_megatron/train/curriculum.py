"""Solver curriculum by tokens (DESIGN §2).

A *bounded* phase with few solver iterations and one phantom step (cheap, ``(iters + 3k)/3`` ≈ 2.3
explicit steps) for the first ``bounded_fraction`` of the training tokens, then the *free* phase
with the solver settings of the config (``(24, 4)`` for Mamba2, ``(32, 4)`` for Llama).

The phase is a pure function of the tokens seen and the (immutable) config: the loop computes it
before every step and hands its :class:`~ilm_megatron.config.SolverConfig` to the engine, so a run
resumed at any step continues with the same settings, and evaluation always uses the config's own
(free-phase) solver settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ilm_megatron.config import Config, SolverConfig

BOUNDED, FREE = 0, 1


@dataclass(frozen=True)
class Phase:
    """A curriculum phase: its index (0 bounded, 1 free) and the solver settings in force."""

    index: int
    solver: SolverConfig

    @property
    def name(self) -> str:
        return "bounded" if self.index == BOUNDED else "free"

    @property
    def f_max_iter(self) -> int:
        return self.solver.f_max_iter

    @property
    def phantom_steps(self) -> int:
        return self.solver.phantom_steps


def total_tokens(cfg: Config) -> int:
    return cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len


def phase_at(tokens_seen: int, cfg: Config) -> Phase:
    """The phase in force after ``tokens_seen`` training tokens (``cfg`` is not changed)."""
    free = Phase(FREE, cfg.solver)
    t = cfg.train
    if t.curriculum == "none" or not cfg.model.implicit:
        return free
    if tokens_seen < t.bounded_fraction * total_tokens(cfg):
        bounded = dataclasses.replace(
            cfg.solver, f_max_iter=t.bounded_max_iter, phantom_steps=t.bounded_phantom_steps
        )
        return Phase(BOUNDED, bounded)
    return free
