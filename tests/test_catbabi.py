"""CatbAbI generator, independent checker, stream batcher, accuracy and ``tools/make_catbabi.py``.

About 10 s on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from ilm_megatron.tasks.catbabi import (
    ANSWERS,
    EOS_ID,
    LENGTH_TASKS,
    NUM_TASKS,
    PAD_ID,
    ROOMS,
    VOCAB,
    AccuracyMeter,
    Story,
    build_stream,
    encode,
    format_story_line,
    generate_splits,
    generate_stories,
    generate_story,
    iter_batches,
    load_stream,
    parse_story_line,
    qa_targets,
    vocab_index,
)
from ilm_megatron.tasks.catbabi_check import check_story_lines, check_tokens

ROOT = Path(__file__).resolve().parents[1]
TASKS = list(range(1, NUM_TASKS + 1))
N_STORIES = 80


@pytest.fixture(scope="module")
def stories_by_task() -> dict[int, list[Story]]:
    return {t: generate_stories(N_STORIES, 11, tasks=[t], shuffle=False) for t in TASKS}


def test_vocab_fixed_and_sorted() -> None:
    assert VOCAB[PAD_ID] == "<pad>" and VOCAB[EOS_ID] == "<eos>"
    assert list(VOCAB[2:]) == sorted(VOCAB[2:])
    assert len(set(VOCAB)) == len(VOCAB)
    assert vocab_index()["?"] == VOCAB.index("?")
    for answers in ANSWERS.values():
        assert set(answers) <= set(VOCAB)


@pytest.mark.parametrize("task", TASKS)
def test_checker_agrees_with_generator(task: int, stories_by_task: dict[int, list[Story]]) -> None:
    stories = stories_by_task[task]
    report = check_story_lines([format_story_line(s) for s in stories])
    assert report.checked == sum(len(s.answer_positions) for s in stories) > 0
    assert report.ok, (report.mismatches[:3], report.unparsed[:3], report.bad_answers[:3])
    for s in stories:
        assert s.task_id == task
        assert set(s.tokens) <= set(VOCAB)
        # each "?" is followed by exactly one answer token from the task's answer set
        assert s.answer_positions == tuple(i + 1 for i, t in enumerate(s.tokens) if t == "?")
        for i in s.answer_positions:
            assert s.tokens[i] in ANSWERS[task]
            assert i + 1 == len(s.tokens) or s.tokens[i + 1] not in (".", "?")
        assert s.tokens[-1] in (".",) or len(s.tokens) - 1 in s.answer_positions
        assert parse_story_line(format_story_line(s)) == s


def test_checker_answer_sets_and_corruption(stories_by_task: dict[int, list[Story]]) -> None:
    tokens: list[str] = []
    tasks: list[int] = []
    for t in TASKS:
        for s in stories_by_task[t][:5]:
            tokens += ["<eos>", *s.tokens]
            tasks += [t] * (len(s.tokens) + 1)
    assert check_tokens(tokens, tasks, answer_sets=ANSWERS).ok
    # flipping one answer per task is caught
    bad = list(tokens)
    flipped = 0
    for t in TASKS:
        i = next(k + 1 for k, tok in enumerate(bad) if tok == "?" and tasks[k] == t)
        bad[i] = next(a for a in ANSWERS[t] if a != bad[i])
        flipped += 1
    report = check_tokens(bad, tasks, answer_sets=ANSWERS)
    assert len(report.mismatches) == flipped
    # a token outside the answer set is reported as malformed
    bad[i] = "the"
    assert check_tokens(bad, tasks, answer_sets=ANSWERS).bad_answers


def test_no_reset_checker_disagrees(stories_by_task: dict[int, list[Story]]) -> None:
    """Earlier stories are real distractors: ignoring <eos> gives wrong answers."""
    wrong = {}
    for t in TASKS:
        lines = [format_story_line(s) for s in stories_by_task[t]]
        report = check_story_lines(lines, reset_at_eos=False)
        wrong[t] = report.checked - report.agreed
    assert wrong[7] > 0 and wrong[8] > 0
    assert sum(1 for v in wrong.values() if v > 0) >= 5


def test_deterministic_by_seed() -> None:
    a = generate_stories(10, 5, tasks=[1, 7, 19])
    b = generate_stories(10, 5, tasks=[1, 7, 19])
    c = generate_stories(10, 6, tasks=[1, 7, 19])
    assert a == b
    assert a != c
    # a task's stories do not depend on which other tasks are generated
    only = generate_stories(10, 5, tasks=[7], shuffle=False)
    assert sorted(s.tokens for s in a if s.task_id == 7) == sorted(s.tokens for s in only)


def test_default_stories_fixed() -> None:
    # the stories drawn without ``questions`` are the ones every existing dataset was made with
    h = hashlib.sha256()
    for s in generate_stories(20, 3):
        h.update(s.digest().encode())
    assert h.hexdigest() == "2ab684bdc7a58729fed811fd3dd08dc7341989072e3d21ac1ffbe7ea7ee0abc1"


@pytest.mark.parametrize("task", sorted(LENGTH_TASKS))
def test_questions_per_story_range(task: int) -> None:
    stories = generate_stories(40, 7, tasks=[task], shuffle=False, questions=(3, 30))
    counts = [len(s.answer_positions) for s in stories]
    # tasks 5 asks after every give, so a story can end (max_steps) short of its draw
    assert min(counts) >= 1 and max(counts) <= 30
    assert max(counts) >= 20 and min(counts) <= 6  # the range is used, not only its ends
    lines = [format_story_line(s) for s in stories]
    assert check_story_lines(lines).ok  # every answer re-derived independently
    # longer stories: story length grows with the number of questions
    by_q = sorted(zip(counts, (len(s.tokens) for s in stories), strict=True))
    short = [n for q, n in by_q if q <= 10]
    long = [n for q, n in by_q if q >= 20]
    assert short and long and sum(long) / len(long) > 2 * sum(short) / len(short)
    fixed = generate_stories(10, 7, tasks=[task], shuffle=False, questions=(12, 12))
    assert all(len(s.answer_positions) == 12 for s in fixed) or task == 5


def test_questions_refused_for_fixed_form_tasks() -> None:
    with pytest.raises(ValueError, match=r"tasks \[4, 19\] have a fixed form"):
        generate_stories(2, 0, tasks=[1, 4, 19], questions=(5, 10))
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        generate_story(1, random.Random(0), questions=(6, 5))


def test_splits_disjoint() -> None:
    splits = generate_splits(30, 10, seed=2, tasks=[4, 16, 19])
    digests = {k: {s.digest() for s in v} for k, v in splits.items()}
    assert len(splits["train"]) == 90 and len(splits["valid"]) == len(splits["test"]) == 30
    assert not digests["train"] & digests["valid"]
    assert not digests["train"] & digests["test"]
    assert not digests["valid"] & digests["test"]
    first = generate_stories(40, 1, tasks=[4])
    again = generate_stories(40, 1, tasks=[4], exclude={s.digest() for s in first})
    assert not {s.digest() for s in first} & {s.digest() for s in again}


def test_answer_balance(stories_by_task: dict[int, list[Story]]) -> None:
    for t in TASKS:
        counts = Counter(a for s in stories_by_task[t] for a in s.answers)
        n = sum(counts.values())
        majority = max(counts.values()) / n
        assert len(counts) >= 2, t
        assert majority < 0.7, (t, counts.most_common(3))
        if set(ANSWERS[t]) == {"yes", "no"}:
            assert 0.35 < counts["yes"] / n < 0.65, (t, counts)


@pytest.mark.parametrize("task", [2, 3])
def test_last_place_baseline_low(task: int, stories_by_task: dict[int, list[Story]]) -> None:
    hits = total = 0
    for s in stories_by_task[task]:
        for i in s.answer_positions:
            last = [w for w in s.tokens[: i - 1] if w in ROOMS]
            hits += bool(last) and last[-1] == s.tokens[i]
            total += 1
    assert hits / total < 0.8


def _toy_stories() -> list[Story]:
    return generate_stories(6, 3, tasks=[1, 4, 16, 19])


def test_stream_layout() -> None:
    stories = _toy_stories()
    stream = build_stream(stories, batch_size=3, seq_len=16)
    B, T = stream.x.shape
    assert B == 3 and T % 16 == 0 and stream.num_windows == T // 16
    q = VOCAB.index("?")
    assert torch.equal(stream.is_answer, stream.x == q)
    valid = stream.story_pos >= 0
    # y is the next token of x inside a row; padding has pad targets and task 0
    assert torch.equal(stream.y[:, :-1][valid[:, 1:]], stream.x[:, 1:][valid[:, 1:]])
    assert (stream.y[~valid] == PAD_ID).all() and (stream.task_id[~valid] == 0).all()
    # the targets at answer positions are exactly the stories' answers
    got = Counter(VOCAB[i] for i in stream.y[stream.is_answer].tolist())
    assert got == Counter(a for s in stories for a in s.answers)
    # each row is a concatenation of whole stories, each starting with <eos>
    for r in range(B):
        row = stream.x[r][valid[r]].tolist()
        starts = [k for k, p in enumerate(stream.story_pos[r].tolist()) if p == 0]
        assert all(row[k] == EOS_ID for k in starts)
    lens = valid.sum(1)
    assert int(lens.max() - lens.min()) <= max(len(s.tokens) + 1 for s in stories)
    assert int(valid.sum()) == sum(len(s.tokens) + 1 for s in stories)
    # windows tile the stream
    batches = list(iter_batches(stream))
    assert torch.equal(torch.cat([b.x for b in batches], 1), stream.x)
    assert torch.equal(torch.cat([b.is_answer for b in batches], 1), stream.is_answer)
    # story_len is the length of the story each position belongs to
    assert set(stream.story_len[valid].tolist()) <= {len(s.tokens) + 1 for s in stories}
    # QA mode keeps the answers only
    qa = qa_targets(stream.y, stream.is_answer)
    assert torch.equal(qa[stream.is_answer], stream.y[stream.is_answer])
    assert (qa[~stream.is_answer] == PAD_ID).all()
    # training order is a seeded shuffle
    s1 = build_stream(stories, 3, 16, shuffle_seed=1)
    s2 = build_stream(stories, 3, 16, shuffle_seed=1)
    assert torch.equal(s1.x, s2.x)


def test_stream_single_row_matches_file_order() -> None:
    stories = _toy_stories()[:4]
    stream = build_stream(stories, batch_size=1, seq_len=7)
    expected: list[int] = []
    for s in stories:
        expected += [EOS_ID] + encode(s.tokens)
    assert stream.x[0, : len(expected)].tolist() == expected
    assert (stream.x[0, len(expected) :] == PAD_ID).all()


def test_accuracy_meter_synthetic() -> None:
    V = len(VOCAB)
    y = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    is_answer = torch.tensor([[True, False, True, True], [True, True, False, False]])
    task_id = torch.tensor([[1, 1, 2, 2], [2, 2, 3, 3]])
    story_len = torch.tensor([[40, 40, 150, 150], [150, 150, 500, 500]])
    pred = y.clone()
    pred[0, 2] = 3  # task 2, length 150: wrong
    pred[1, 1] = 3  # task 2, length 150: wrong
    pred[1, 2] = 3  # not an answer position: ignored
    logits = torch.nn.functional.one_hot(pred, V).float()
    meter = AccuracyMeter(length_bins=(50, 100, 200))
    meter.update(logits, y, is_answer, task_id, story_len)
    res = meter.result()
    assert res["count"] == 5
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["per_task"] == {1: 1.0, 2: pytest.approx(2 / 4)}
    assert res["per_length"] == {"<=50": 1.0, "<=200": pytest.approx(2 / 4)}
    # second update accumulates
    meter.update(logits, y, is_answer, task_id, story_len)
    assert meter.result()["count"] == 10


def test_accuracy_meter_per_task_length_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    bins = (60, 120, 300)
    meter = AccuracyMeter(bins)
    naive: dict[tuple[int, str], list[tuple[int, int, float]]] = {}
    for _ in range(3):
        b, L, V = 3, 17, len(VOCAB)
        y = torch.randint(0, V, (b, L), generator=g)
        is_answer = torch.rand(b, L, generator=g) < 0.4
        task_id = torch.randint(1, 4, (b, L), generator=g)
        story_len = torch.randint(20, 400, (b, L), generator=g)
        iters = torch.randint(1, 30, (b, L), generator=g).float()
        pred = torch.where(torch.rand(b, L, generator=g) < 0.6, y, (y + 1) % V)
        meter.update(torch.nn.functional.one_hot(pred, V).float(), y, is_answer, task_id,
                     story_len, iters)  # fmt: skip
        for i in range(b):
            for j in range(L):
                if not is_answer[i, j]:
                    continue
                n = int(story_len[i, j])
                name = next((f"<={u}" for u in bins if n <= u), f">{bins[-1]}")
                key = (int(task_id[i, j]), name)
                naive.setdefault(key, []).append(
                    (int(pred[i, j] == y[i, j]), n, float(iters[i, j]))
                )
    res = meter.result()
    got = res["per_task_length"]
    assert {(t, k) for t, v in got.items() for k in v} == set(naive)
    for (t, name), cells in naive.items():
        cell = got[t][name]
        assert cell["answers"] == len(cells)
        assert cell["accuracy"] == pytest.approx(sum(c[0] for c in cells) / len(cells))
        assert cell["story_length_mean"] == pytest.approx(sum(c[1] for c in cells) / len(cells))
        assert cell["iters_mean"] == pytest.approx(sum(c[2] for c in cells) / len(cells))
    # the overall buckets are the per-task ones pooled
    for name, acc in res["per_length"].items():
        cells = [c for (t, k), v in naive.items() if k == name for c in v]
        assert acc == pytest.approx(sum(c[0] for c in cells) / len(cells))
        assert res["iters_per_length"][name] == pytest.approx(sum(c[2] for c in cells) / len(cells))


def test_accuracy_meter_on_stream() -> None:
    stories = _toy_stories()
    stream = build_stream(stories, batch_size=2, seq_len=32)
    meter = AccuracyMeter()
    n_wrong_task4 = 0
    for batch in iter_batches(stream):
        pred = batch.y.clone()
        wrong = batch.is_answer & (batch.task_id == 4)
        pred[wrong] = PAD_ID
        n_wrong_task4 += int(wrong.sum())
        meter.update_batch(torch.nn.functional.one_hot(pred, len(VOCAB)).float(), batch)
    res = meter.result()
    assert n_wrong_task4 > 0
    assert res["per_task"][4] == 0.0
    assert res["per_task"][1] == res["per_task"][16] == res["per_task"][19] == 1.0
    assert res["count"] == sum(len(s.answer_positions) for s in stories)


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_catbabi", ROOT / "tools/make_catbabi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_catbabi_tool(tmp_path: Path) -> None:
    tool = _load_tool()
    out = tmp_path / "cb"
    args = ["--stories", "9", "--seed", "4", "--tasks", "2,7,19"]
    assert tool.main(["--output", str(out), *args]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["meta.json", "test.txt", "train.txt", "valid.txt", "vocab.json"]
    vocab = json.loads((out / "vocab.json").read_text())
    assert tuple(vocab["tokens"]) == VOCAB and vocab["vocab_size"] == len(VOCAB)
    lines = {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "valid", "test")}
    assert len(lines["train"]) == 27 and len(lines["valid"]) == len(lines["test"]) == 3
    assert not set(lines["train"]) & set(lines["test"])
    assert all(line.split("\t")[0] in {"2", "7", "19"} for v in lines.values() for line in v)
    for v in lines.values():
        assert check_story_lines(v).ok
    stream = load_stream(str(out), "train", batch_size=4, seq_len=50, shuffle_seed=0)
    assert stream.x.shape[0] == 4 and int(stream.x.max()) < len(VOCAB)
    # same seed -> identical files
    out2 = tmp_path / "cb2"
    assert tool.main(["--output", str(out2), *args]) == 0
    assert (out / "train.txt").read_bytes() == (out2 / "train.txt").read_bytes()
    with pytest.raises(SystemExit):
        tool.main(["--output", str(out), "--stories", "3", "--tasks", "0,21"])
    # long stories of one task: the question range is used and recorded
    long = tmp_path / "long"
    assert tool.main(["--output", str(long), "--stories", "2", "--eval-stories", "6",
                      "--tasks", "1", "--questions", "20,25", "--seed", "1"]) == 0  # fmt: skip
    meta = json.loads((long / "meta.json").read_text())
    assert meta["questions_per_story"] == [20, 25]
    for line in (long / "test.txt").read_text().splitlines():
        assert 20 <= parse_story_line(line).tokens.count("?") <= 25
    for bad in (["--tasks", "1,4", "--questions", "5,9"], ["--tasks", "1", "--questions", "9,5"]):
        with pytest.raises(SystemExit):
            tool.main(["--output", str(tmp_path / "bad"), "--stories", "2", *bad])
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_random_module_state_untouched() -> None:
    random.seed(123)
    before = random.random()
    random.seed(123)
    generate_stories(2, 0, tasks=[1])
    assert random.random() == before
