"""Activation memory held for backward does not depend on the number of solver iterations.

Every tensor autograd saves for backward goes through ``torch.autograd.graph.saved_tensors_hooks``;
the pack hook records the storage it lives in, and the bytes of the distinct storages are summed
(parameters, which autograd saves by reference, are reported apart). A training-mode forward must
save the same bytes whatever ``f_max_iter`` (the no-grad solve keeps nothing), and bytes that grow
linearly with ``phantom_steps`` (each phantom step keeps one evaluation of ``F``). Controls show the
measurement is not vacuous: more phantom steps are seen, and so is a solve run with autograd.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ilm_megatron.config import load_config
from ilm_megatron.implicit.solver import solve
from ilm_megatron.models.lm import ImplicitLM

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("mamba2", "llama")
ITERS = (2, 8, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Saved:
    """What autograd saved inside a ``Record`` block."""

    count: int = 0
    storages: dict[int, int] = field(default_factory=dict)  # storage data_ptr -> nbytes
    keep: list[torch.Tensor] = field(default_factory=list)  # keeps storages alive (no reuse)

    def total(self) -> int:
        return sum(self.storages.values())

    def activations(self, model: torch.nn.Module) -> int:
        """Bytes of saved storages that are not parameters."""
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in self.storages.items() if ptr not in params)


class Record:
    """Context manager: records what autograd saves for backward inside the block."""

    def __init__(self) -> None:
        self.saved = Saved()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self.saved.count += 1
        self.saved.storages[s.data_ptr()] = s.nbytes()
        self.saved.keep.append(t)
        return t

    def __enter__(self) -> Saved:
        self._hooks.__enter__()
        return self.saved

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def build(arch: str) -> ImplicitLM:
    cfg = load_config(
        [ROOT / "configs" / "models" / f"implicit_{arch}_tiny.yaml"],
        ["solver.f_tol=1e-12", "solver.phantom_steps=2"],  # tol never met: every iteration runs
    )
    torch.manual_seed(0)
    return ImplicitLM(cfg.model, cfg.solver).train()


def ids_for(model: ImplicitLM) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 8), generator=g)


def train_forward(model: ImplicitLM, ids: torch.Tensor, f_max_iter: int, k: int):
    solver = dataclasses.replace(model.solver_config, f_max_iter=f_max_iter, phantom_steps=k)
    with Record() as saved:
        out = model(ids, solver=solver)
    assert out.logits.requires_grad
    return saved, out


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_bytes_do_not_depend_on_f_max_iter(arch):
    model = build(arch)
    ids = ids_for(model)
    rows = []
    for n in ITERS:
        saved, out = train_forward(model, ids, n, 2)
        assert out.stats.iters == n, f"solve stopped after {out.stats.iters} < {n} iterations"
        rows.append((n, saved.count, saved.total(), saved.activations(model)))
    msg = f"{arch} (f_max_iter, saved tensors, bytes, activation bytes): {rows}"
    print(msg)
    assert rows[0][2] > 0 and rows[0][3] > 0, msg
    for _, count, total, act in rows[1:]:
        assert count == rows[0][1], msg
        assert total == rows[0][2], msg
        assert act == rows[0][3], msg


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_bytes_grow_with_phantom_steps(arch):
    """Positive control: the measurement sees each phantom step (linear in k)."""
    model = build(arch)
    ids = ids_for(model)
    act = {k: train_forward(model, ids, 8, k)[0].activations(model) for k in (1, 2, 4)}
    msg = f"{arch}: activation bytes by phantom_steps {act}"
    print(msg)
    step = act[2] - act[1]
    assert step > 0, msg
    assert act[4] > act[2], msg
    assert act[4] - act[2] == 2 * step, msg  # each step keeps exactly one evaluation of F


@pytest.mark.parametrize("arch", ARCHS)
def test_no_grad_solve_saves_nothing(arch):
    model = build(arch)
    ids = ids_for(model)
    e, u = model.embed(ids)  # u carries autograd history, the parameters require grad
    assert u.requires_grad

    def f(z):
        return model.stack(z, u)[0]

    z0 = torch.zeros_like(e)
    with torch.enable_grad(), Record() as saved:
        z_star, stats = solve(f, z0, 16, 1e-12)
    assert stats.iters == 16
    assert saved.count == 0 and saved.total() == 0, (saved.count, saved.total())
    assert not z_star.requires_grad and z_star.grad_fn is None

    # Control: the same loop with autograd is seen, and grows with the number of iterations.
    def unrolled(n: int) -> int:
        with Record() as s:
            z = z0
            for _ in range(n):
                z = f(z)
        return s.activations(model)

    one, four = unrolled(1), unrolled(4)
    assert 0 < one < four, (one, four)
