"""Solver curriculum by tokens (DESIGN §2).

A *bounded* phase with few solver iterations and one phantom step (cheap, ``(iters + 3k)/3`` ≈ 2.3
explicit steps) for the first ``bounded_fraction`` of the training tokens, then the *free* phase
with the solver settings of the config (``(24, 4)`` for Mamba2, ``(32, 4)`` for Llama).
"""

from __future__ import annotations

from dataclasses import dataclass

from ilm_megatron.config import Config, SolverConfig

BOUNDED, FREE = 0, 1


@dataclass(frozen=True)
class Phase:
    index: int  # 0 bounded, 1 free
    f_max_iter: int
    phantom_steps: int

    @property
    def name(self) -> str:
        return "bounded" if self.index == BOUNDED else "free"


def total_tokens(cfg: Config) -> int:
    return cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len


def phase_at(tokens_seen: int, cfg: Config) -> Phase:
    """The phase in force after ``tokens_seen`` training tokens."""
    free = Phase(FREE, cfg.solver.f_max_iter, cfg.solver.phantom_steps)
    t = cfg.train
    if t.curriculum == "none" or not cfg.model.implicit:
        return free
    if tokens_seen < t.bounded_fraction * total_tokens(cfg):
        return Phase(BOUNDED, t.bounded_max_iter, t.bounded_phantom_steps)
    return free


def apply_phase(phase: Phase, solver: SolverConfig) -> None:
    """Set the model's live solver settings for this phase."""
    solver.f_max_iter = phase.f_max_iter
    solver.phantom_steps = phase.phantom_steps
