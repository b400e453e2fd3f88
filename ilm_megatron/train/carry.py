"""Recurrent state carried across windows (``data.carry_state``).

CatbAbI rows are continuous streams: row ``r`` of window ``w + 1`` continues row ``r`` of window
``w``. With ``data.carry_state`` the model solves each window from the per-layer caches the
previous window returned (:meth:`ImplicitLM.forward` with ``caches=`` and
``return_caches=True``); gradients stop at the window boundary (truncated backprop, as in the
FWM setup). A step is cut into micro-batches by rows, the same rows every step, so the state is
kept per micro-batch index.
"""

from __future__ import annotations

from typing import Any

import torch

from ilm_megatron.models.cache import KVCache, caches_from_state, caches_to_state


class CarriedState:
    """Per-micro-batch caches of the rows this rank processes, between windows.

    Args:
        kv_window: the most previous positions an attention layer keeps (older keys/values are
            dropped, so memory and time per window stay bounded); Mamba2 state is fixed-size.
    """

    def __init__(self, kv_window: int) -> None:
        self.kv_window = kv_window
        self.parts: dict[int, list[Any]] = {}

    def get(self, j: int) -> list[Any] | None:
        """Micro-batch ``j``'s per-layer caches, or None (an empty state)."""
        return self.parts.get(j)

    def put(self, j: int, caches: list[Any] | None) -> None:
        """Keep micro-batch ``j``'s caches after its window (attention bounded to the window)."""
        if caches is None:
            raise ValueError("carrying state needs the caches after the window (return_caches)")
        self.parts[j] = [
            c.keep_last(self.kv_window) if isinstance(c, KVCache) else c for c in caches
        ]

    def reset(self) -> None:
        """Forget every row's state (a new stream starts)."""
        self.parts = {}

    def reset_if_nonfinite(self) -> bool:
        """Forget every row's state when some of it is NaN/inf (after a skipped step: a state
        that is not finite would poison every later window); True when it did. A step skipped
        for another reason (a micro-batch without targets) keeps a valid state."""
        for caches in self.parts.values():
            for c in caches_to_state(caches):
                if any(
                    isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all())
                    for t in c.values()
                ):
                    self.reset()
                    return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors on the CPU, for this rank's trainer state in a checkpoint."""
        return {
            str(j): [{k: _cpu(v) for k, v in c.items()} for c in caches_to_state(p)]
            for j, p in self.parts.items()
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.parts = {
            int(j): caches_from_state([{k: _to(v, device) for k, v in c.items()} for c in p])
            for j, p in state.items()
        }


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v


def new_carry(cfg: Any) -> CarriedState | None:
    """A :class:`CarriedState` when ``cfg.data.carry_state``, else None."""
    d = cfg.data
    if not d.carry_state:
        return None
    return CarriedState(d.carry_kv_window or d.seq_len)
