"""Word-problem generators (checked by brute force) and ``ilm-eval state-tracking``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from ilm_megatron.data.word_problem import (
    group_elements,
    group_order,
    is_aperiodic,
    multiplication_table,
    sample_word_problem,
    word_problem_dataset,
)

# ------------------------------------------------------------------ independent brute force


def _compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Apply ``a`` then ``b`` (written out here, independently of the module)."""
    return tuple(b[a[i]] for i in range(len(a)))


def _is_even(p: tuple[int, ...]) -> bool:
    """Parity from the cycle decomposition (the module counts inversions)."""
    seen, transpositions = set(), 0
    for start in range(len(p)):
        n, i = 0, start
        while i not in seen:
            seen.add(i)
            i = p[i]
            n += 1
        transpositions += max(0, n - 1)
    return transpositions % 2 == 0


def _elements(name: str) -> list[tuple]:
    """Symbol list built in the test: S_n/A_n lexicographic, A5xR3 as (perm, reset) pairs."""
    if name == "A5xR3":
        resets = [None, 0, 1, 2]  # None = identity, i = reset to state i
        return [(g, r) for g in _elements("A5") for r in resets]
    n = int(name[1:])
    perms = list(itertools.permutations(range(n)))
    return [p for p in perms if name[0] == "S" or _is_even(p)]


def _product(name: str, a: tuple, b: tuple) -> tuple:
    if name == "A5xR3":
        return (_compose(a[0], b[0]), a[1] if b[1] is None else b[1])
    return _compose(a, b)


def _brute_force_labels(name: str, x: torch.Tensor) -> torch.Tensor:
    els = _elements(name)
    index = {e: i for i, e in enumerate(els)}
    y = torch.empty_like(x)
    for row in range(x.shape[0]):
        state = els[0]
        for t in range(x.shape[1]):
            state = _product(name, state, els[int(x[row, t])])
            y[row, t] = index[state]
    return y


@pytest.mark.parametrize("name", ["S3", "S5", "A4", "A5", "A5xR3"])
def test_generator_matches_brute_force(name: str) -> None:
    x, y = word_problem_dataset(name, 6, 40, seed=3, easy_frac=0.2)
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (6, 40)
    assert int(x.max()) < group_order(name)
    assert torch.equal(y, _brute_force_labels(name, x))


@pytest.mark.parametrize("name,order", [("S3", 6), ("S5", 120), ("A4", 12), ("A5", 60),
                                        ("Z2", 2), ("R3", 4), ("A5xR3", 240)])  # fmt: skip
def test_orders_and_identity(name: str, order: int) -> None:
    assert group_order(name) == order
    table = multiplication_table(name)
    ids = torch.arange(order)
    assert torch.equal(table[0], ids) and torch.equal(table[:, 0], ids)  # index 0 is the identity


def test_a5xr3_structure() -> None:
    assert len(set(group_elements("A5xR3"))) == 240
    table = multiplication_table("A5xR3")
    # associativity over all 240^3 triples
    left = table[table.unsqueeze(-1), torch.arange(240)]  # (a∘b)∘c via table[table[a, b], c]
    right = table[torch.arange(240)[:, None, None], table.unsqueeze(0)]  # a∘(b∘c)
    assert torch.equal(left, right)
    # the R3 factor: aperiodic, every element idempotent, not commutative
    r3 = multiplication_table("R3")
    assert is_aperiodic("R3") and torch.equal(r3.diagonal(), torch.arange(4))
    assert not torch.equal(r3, r3.T)
    assert not is_aperiodic("A5") and not is_aperiodic("A5xR3")
    # symbol 4*g + m is the pair (A5 element g, R3 element m)
    a5 = multiplication_table("A5")
    g, h, m, n = 7, 41, 2, 0
    assert int(table[4 * g + m, 4 * h + n]) == 4 * int(a5[g, h]) + int(r3[m, n])


def test_label_alignment() -> None:
    """y_t depends on x_1..x_t only, y_1 = x_1, and changing x_t changes y_t (a group)."""
    g = torch.Generator().manual_seed(0)
    x, y = sample_word_problem("S5", 8, 24, g)
    assert torch.equal(y[:, 0], x[:, 0])
    table = multiplication_table("S5")
    assert torch.equal(y[:, 1:], table[y[:, :-1], x[:, 1:]])
    for t in (0, 5, 23):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % group_order("S5")
        y2 = _brute_force_labels("S5", x2)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert (y2[:, t] != y[:, t]).all()


def test_generators_deterministic_by_seed() -> None:
    a = word_problem_dataset("A5xR3", 4, 16, seed=11)
    b = word_problem_dataset("A5xR3", 4, 16, seed=11)
    c = word_problem_dataset("A5xR3", 4, 16, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_unknown_problem() -> None:
    with pytest.raises(ValueError, match="A5xR3"):
        group_order("Q8")


# ------------------------------------------------------------------ ilm-eval state-tracking


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A run directory from a few training steps of a tiny implicit Mamba2 on S3."""
    from ilm_megatron.config import load_config
    from ilm_megatron.train.loop import train

    run_dir = tmp_path_factory.mktemp("st") / "run"
    cfg = load_config(
        (),
        [
            "model.d_model=16", "model.headdim=8", "model.d_state=8", "model.vocab_size=6",
            "solver.f_max_iter=6", "solver.phantom_steps=1", "train.max_steps=3",
            "train.batch_size=8", "train.warmup_steps=1", "train.eval_batches=1",
            "train.tensorboard=false", "train.device=cpu", "data.seq_len=8",
            "data.eval_seq_len=0",
        ],
    )  # fmt: skip
    train(cfg, run_dir, quiet=True)
    return run_dir


def _run_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ilm_megatron.tasks.eval import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_ilm_eval_json(tiny_run: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    rc, out, err = _run_eval(
        ["state-tracking", "--checkpoint", str(tiny_run), "--lengths", "8,16,40",
         "--batches", "1", "--batch-size", "4", "--mode", mode, "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    assert res["group"] == "S3" and res["train_length"] == 8 and res["mode"] == mode
    assert [r["length"] for r in res["rows"]] == [8, 16, 40]
    for r in res["rows"]:
        assert {"acc_last10", "acc_all", "iters_mean", "iters_max", "cap"} <= set(r)
        assert 0 <= r["acc_last10"] <= 1 and 0 <= r["acc_all"] <= 1
        assert 1 <= r["iters_mean"] <= r["iters_max"] <= r["cap"]
    if mode == "simultaneous":  # the cap grows with length: max(4 * 6, ceil(2.5 * L))
        assert [r["cap"] for r in res["rows"]] == [24, 40, 100]
    else:
        assert all(r["cap"] == 24 for r in res["rows"])


def test_ilm_eval_table_and_file_checkpoint(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run_eval(
        ["state-tracking", "--checkpoint", str(tiny_run / "model.safetensors"),
         "--lengths", "8", "--batches", "1", "--batch-size", "2"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "acc_last10" in out and "S3 word problem" in out


def test_ilm_eval_errors(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run_eval(["state-tracking", "--checkpoint", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "checkpoint not found" in err
    rc, _, err = _run_eval(["state-tracking", "--checkpoint", str(tmp_path)], capsys)
    assert rc == 2 and "without model.safetensors" in err
    rc, _, err = _run_eval(
        ["state-tracking", "--checkpoint", str(tiny_run), "--group", "S5", "--lengths", "8"],
        capsys,
    )
    assert rc == 2 and "vocabulary" in err
    rc, _, err = _run_eval(
        ["state-tracking", "--checkpoint", str(tiny_run), "--lengths", "8,x"], capsys
    )
    assert rc == 2 and "--lengths" in err
    rc, _, _ = _run_eval([], capsys)
    assert rc == 2  # a subcommand is required
