"""Word problems over finite groups (state tracking).

Input ``x_1..x_L`` are group elements; the target at position ``t`` is the running product
``y_t = y_{t-1} ∘ x_t`` with ``y_0 = e``. Targets are *aligned* with the inputs (no shift): the
model reads ``x_t`` and must output ``y_t`` at the same position. Solving it for long inputs needs
a state that composes non-commuting permutations, which explicit fixed-depth models cannot do.

Elements of S_n / A_n are permutations of ``range(n)`` in lexicographic order; the identity is
always index 0. ``a ∘ b`` means "apply ``a`` then ``b``": ``(a ∘ b)[i] = b[a[i]]``.

Besides groups, ``A5xR3`` is the direct product of A5 with the 4-element aperiodic monoid
``R3 = {id, reset_0, reset_1, reset_2}``: the transformations of a 3-state register that either
keep the state (``id``) or overwrite it with a constant (``reset_i``, the map ``s -> i``). Its
multiplication is ``x ∘ id = x``, ``x ∘ reset_i = reset_i``; every element is idempotent
(``x ∘ x = x``), so R3 is aperiodic (it contains no non-trivial group). It is the flip-flop monoid
on three states. An ``A5xR3`` element is stored as a transformation of ``range(8)``: positions
0..4 carry the A5 permutation and positions 5..7 the R3 transformation of the states 5..7, so the
same composition rule ``(a ∘ b)[i] = b[a[i]]`` applies and the identity is again index 0.
Symbol ``4 * g + m`` is the pair (A5 element ``g``, R3 element ``m``) with R3 ordered
``id, reset_0, reset_1, reset_2``; 60 * 4 = 240 symbols.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch


def _parity(p: tuple[int, ...]) -> int:
    inv = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inv % 2


#: Word problems this module knows besides the ``S<n>`` / ``A<n>`` families.
EXTRA_PROBLEMS = ("Z2", "R3", "A5xR3")

#: The aperiodic monoid R3 as transformations of {0, 1, 2}: identity, then reset to 0, 1, 2.
RESET_MONOID = ((0, 1, 2), (0, 0, 0), (1, 1, 1), (2, 2, 2))


@cache
def group_elements(name: str) -> tuple[tuple[int, ...], ...]:
    """Elements of ``S<n>``, ``A<n>``, ``Z2``, ``R3``, ``A5xR3`` as tuples, identity first.

    Groups give permutations; the monoids ``R3`` and ``A5xR3`` give transformations (of
    ``range(3)`` and ``range(8)``) as described in the module docstring.
    """
    if name == "Z2":
        return ((0, 1), (1, 0))
    if name == "R3":
        return RESET_MONOID
    if name == "A5xR3":
        return tuple(
            g + tuple(5 + s for s in m) for g in group_elements("A5") for m in RESET_MONOID
        )
    if len(name) < 2 or name[0] not in "SA" or not name[1:].isdigit():
        raise ValueError(
            f"unknown word problem {name!r}: expected S<n>, A<n>, Z2, R3 or A5xR3 (e.g. S3, A5)"
        )
    n = int(name[1:])
    perms = list(itertools.permutations(range(n)))
    if name[0] == "A":
        perms = [p for p in perms if _parity(p) == 0]
    return tuple(perms)


def group_order(name: str) -> int:
    """Number of symbols of the word problem ``name`` (the vocabulary it needs)."""
    return len(group_elements(name))


@cache
def multiplication_table(name: str) -> torch.Tensor:
    """``table[a, b]`` = index of ``a ∘ b``; shape (|G|, |G|), int64."""
    # cached: callers must not modify the returned tensor
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


def word_problem_dataset(
    name: str, num: int, length: int, seed: int, easy_frac: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of ``num`` word problems, a pure function of its arguments.

    Needs nothing but torch (no config, model or training code): the same ``seed`` gives the same
    tensors on every machine. Returns ``(x, y)`` (num, length) int64 as :func:`sample_word_problem`.
    """
    gen = torch.Generator().manual_seed(seed)
    return sample_word_problem(name, num, length, gen, easy_frac)


def is_aperiodic(name: str) -> bool:
    """True when every element ``x`` satisfies ``x^(k+1) = x^k`` for some ``k`` (no cyclic group).

    Checked by brute force on the multiplication table (fine for a few hundred symbols).
    """
    table = multiplication_table(name)
    n = table.shape[0]
    for x in range(n):
        powers = [x]
        while True:
            nxt = int(table[powers[-1], x])
            if nxt == powers[-1]:
                break
            if nxt in powers:  # a cycle of length > 1
                return False
            powers.append(nxt)
    return True
