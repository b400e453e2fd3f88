"""Word problems over finite groups (state tracking).

Input ``x_1..x_L`` are group elements; the target at position ``t`` is the running product
``y_t = y_{t-1} ∘ x_t`` with ``y_0 = e``. Targets are *aligned* with the inputs (no shift): the
model reads ``x_t`` and must output ``y_t`` at the same position. Solving it for long inputs needs
a state that composes non-commuting permutations, which explicit fixed-depth models cannot do.

Elements of S_n / A_n are permutations of ``range(n)`` in lexicographic order; the identity is
always index 0. ``a ∘ b`` means "apply ``a`` then ``b``": ``(a ∘ b)[i] = b[a[i]]``.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch


def _parity(p: tuple[int, ...]) -> int:
    inv = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inv % 2


@cache
def group_elements(name: str) -> tuple[tuple[int, ...], ...]:
    """Elements of ``S<n>``, ``A<n>`` or ``Z2`` as permutation tuples, identity first."""
    if name == "Z2":
        return ((0, 1), (1, 0))
    if len(name) < 2 or name[0] not in "SA" or not name[1:].isdigit():
        raise ValueError(f"unknown group {name!r}: expected S<n>, A<n> or Z2 (e.g. S3, A5)")
    n = int(name[1:])
    perms = list(itertools.permutations(range(n)))
    if name[0] == "A":
        perms = [p for p in perms if _parity(p) == 0]
    return tuple(perms)


def group_order(name: str) -> int:
    return len(group_elements(name))


@cache
def multiplication_table(name: str) -> torch.Tensor:
    """``table[a, b]`` = index of ``a ∘ b``; shape (|G|, |G|), int64."""
    els = group_elements(name)
    index = {p: i for i, p in enumerate(els)}
    n = len(els)
    table = torch.empty(n, n, dtype=torch.long)
    for i, a in enumerate(els):
        for j, b in enumerate(els):
            table[i, j] = index[tuple(b[a[k]] for k in range(len(a)))]
    return table


def sample_word_problem(
    name: str,
    batch: int,
    length: int,
    generator: torch.Generator,
    easy_frac: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of word problems.

    Args:
        name: group name (``S3``, ``A5``, ...).
        batch, length: output shape.
        generator: seeded torch generator (the sample is a pure function of its state).
        easy_frac: probability that a token is the identity (an "easy" step).

    Returns:
        ``(x, y)`` both (batch, length) int64: inputs and aligned running products.
    """
    table = multiplication_table(name)
    n = table.shape[0]
    x = torch.randint(0, n, (batch, length), generator=generator)
    if easy_frac > 0:
        easy = torch.rand(batch, length, generator=generator) < easy_frac
        x = torch.where(easy, torch.zeros_like(x), x)
    y = torch.empty_like(x)
    state = torch.zeros(batch, dtype=torch.long)
    for t in range(length):
        state = table[state, x[:, t]]
        y[:, t] = state
    return x, y
