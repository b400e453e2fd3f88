"""``ilm-eval adaptive-compute``: its statistics against naive loops and hand computations, and the
CLI on tiny word-problem and CatbAbI checkpoints (files read back)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, make_catbabi

from ilm_megatron.analysis.adaptive_compute import (
    average_ranks,
    group_means,
    histogram,
    iters_by_loss,
    measure_word_problem,
    spearman,
    summarize_samples,
    summarize_tokens,
    word_problem_batches,
)
from ilm_megatron.config import load_config
from ilm_megatron.models.lm import build_model
from ilm_megatron.tasks.eval import main as ilm_eval
from ilm_megatron.train.checkpoint import load_model, save_model

# a tiny contractive word-problem model: the token solves converge in a few iterations
WP_OVERRIDES = [
    "model.d_model=16", "model.headdim=8", "model.d_state=8", "model.vocab_size=6",
    "model.iterate_init_scale=0.3", "solver.f_max_iter=8", "solver.eval_tol=1e-3",
    "data.group=S3", "data.seq_len=8",
]  # fmt: skip


def _naive_spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho from its definition: rank = #smaller + (#equal + 1) / 2, then Pearson."""

    def ranks(v: list[float]) -> list[float]:
        return [sum(u < a for u in v) + (sum(u == a for u in v) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


# ------------------------------------------------------------------ statistics


def test_spearman_by_hand() -> None:
    # ties share the mean of their ranks: [3, 1, 3, 2] -> [3.5, 1, 3.5, 2]
    assert average_ranks(torch.tensor([3, 1, 3, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: cov 4.5, var 4.5 and 5 -> sqrt(0.9)
    rho = spearman(torch.tensor([1, 2, 2, 3]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert rho == pytest.approx(0.9**0.5, abs=1e-12)
    # monotone but not linear: rank correlation 1 (and -1 reversed)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    # undefined for a constant side (an explicit model's iterations) and for one value
    assert spearman(torch.ones(5, dtype=torch.long), x) is None
    assert spearman(torch.tensor([2]), torch.tensor([0.5])) is None


def test_spearman_against_definition_and_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    iters = torch.randint(1, 6, (60,), generator=gen)  # many ties, like iteration counts
    loss = iters.double() + torch.randn(60, generator=gen, dtype=torch.float64)
    ours = spearman(iters, loss)
    assert ours == pytest.approx(_naive_spearman(iters.tolist(), loss.tolist()), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    assert ours == pytest.approx(float(stats.spearmanr(iters.numpy(), loss.numpy())[0]), abs=1e-12)


def test_group_means_histogram_and_loss_bins_against_loops() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 9, (200,), generator=gen)
    keys = torch.randint(0, 5, (200,), generator=gen)  # key 5 of 6 never occurs
    means, counts = group_means(values, keys, 6)
    for k in range(6):
        members = [int(v) for v, kk in zip(values, keys) if int(kk) == k]
        assert counts[k] == len(members)
        assert means[k] == (None if not members else pytest.approx(sum(members) / len(members)))
    assert means[5] is None and counts[5] == 0

    h = histogram(values, size=12)
    assert len(h) == 12 and sum(h) == 200
    assert h[:9] == torch.bincount(values).tolist() and h[9:] == [0, 0, 0]
    assert h == [sum(int(v) == k for v in values) for k in range(12)]

    loss = torch.rand(23, generator=gen)
    iters = torch.randint(1, 5, (23,), generator=gen)
    rows = iters_by_loss(loss, iters, bins=5)
    assert [r["tokens"] for r in rows] == [5, 5, 5, 4, 4]  # torch.tensor_split's sizes
    pairs = sorted(zip(loss.tolist(), iters.tolist()))
    start = 0
    for r in rows:
        chunk = pairs[start : start + r["tokens"]]
        start += r["tokens"]
        assert r["loss"] == pytest.approx(_mean([p[0] for p in chunk]))
        assert r["iters"] == pytest.approx(_mean([p[1] for p in chunk]))


# ------------------------------------------------------------------ against forward_sequential


@pytest.fixture(scope="module")
def wp_model(one_thread: None):
    cfg = load_config((), WP_OVERRIDES)
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.solver).eval()


def test_word_problem_summary_matches_naive_loop(wp_model) -> None:
    """Per-position, per-bucket, hard/easy means, losses and histograms of the tool equal a naive
    loop over the (b, l) iterations of ``forward_sequential`` run here on the same inputs."""
    model = wp_model
    fracs, length, n, bs, seed = [0.25, 1.0], 6, 6, 4, 3  # 6 samples: batches of 4 and 2
    names = ["0.25", "1"]
    tokens, samples, info = measure_word_problem(model, "S3", fracs, length, n, bs, seed)
    res = summarize_tokens(tokens, names, length)
    sim = summarize_samples(samples, names)

    vocab = model.config.vocab_size
    per_pos: list[list[int]] = [[] for _ in range(length)]
    it_b: list[list[int]] = [[], []]
    loss_b: list[list[float]] = [[], []]
    acc_b: list[list[int]] = [[], []]
    sim_b: list[list[int]] = [[], []]
    hard, easy, all_it, all_loss = [], [], [], []
    with torch.no_grad():
        for bucket, x, y in word_problem_batches("S3", fracs, length, n, bs, seed):
            out = model.forward_sequential(x, max_iter=info["seq_cap"])
            it = out.stats.sample_iters
            assert it.shape == x.shape  # one solve per token
            logp = torch.log_softmax(out.logits[..., :vocab].double(), -1)
            for i in range(x.shape[0]):
                for t in range(length):
                    v, target = int(it[i, t]), int(y[i, t])
                    loss = -float(logp[i, t, target])
                    per_pos[t].append(v)
                    it_b[bucket].append(v)
                    loss_b[bucket].append(loss)
                    acc_b[bucket].append(int(int(logp[i, t].argmax()) == target))
                    (hard if int(x[i, t]) != 0 else easy).append(v)
                    all_it.append(v)
                    all_loss.append(loss)
            sim_b[bucket] += model(x, max_iter=info["sim_cap"]).stats.sample_iters.tolist()

    assert res["tokens"] == len(all_it) == len(fracs) * n * length
    assert res["per_position"]["mean"] == pytest.approx([_mean(v) for v in per_pos])
    assert res["per_position"]["count"] == [len(fracs) * n] * length
    assert res["iters_mean"] == pytest.approx(_mean(all_it))
    assert res["iters_max"] == max(all_it) and 1 <= min(all_it)
    assert res["spearman_iters_loss"] == pytest.approx(_naive_spearman(all_it, all_loss), abs=1e-6)
    assert res["histogram"] == torch.bincount(torch.tensor(all_it)).tolist()
    assert sum(res["histogram"]) == res["tokens"]
    assert res["hard"]["iters_mean"] == pytest.approx(_mean(hard))
    assert res["easy"]["iters_mean"] == pytest.approx(_mean(easy))
    assert res["hard"]["tokens"] + res["easy"]["tokens"] == res["tokens"]
    for k, row in enumerate(res["buckets"]):
        assert row["name"] == names[k] and row["tokens"] == n * length
        assert row["iters_mean"] == pytest.approx(_mean(it_b[k]))
        assert row["loss_mean"] == pytest.approx(_mean(loss_b[k]), rel=1e-5)
        assert row["accuracy"] == pytest.approx(_mean(acc_b[k]))
        assert sum(row["histogram"]) == row["tokens"]
        assert row["histogram"] == [it_b[k].count(v) for v in range(len(res["histogram"]))]
        s = sim["buckets"][k]
        assert s["samples"] == n and s["iters_mean"] == pytest.approx(_mean(sim_b[k]))
        assert sum(s["histogram"]) == n
    assert sim["iters_mean"] == pytest.approx(_mean(sim_b[0] + sim_b[1]))


# ------------------------------------------------------------------ the CLI


def _save(cfg, path: Path) -> Path:
    torch.manual_seed(0)
    save_model(build_model(cfg.model, cfg.solver), cfg, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def wp_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return _save(load_config((), WP_OVERRIDES), tmp_path_factory.mktemp("ac") / "run")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = ilm_eval(["adaptive-compute", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read_outputs(out: Path, printed: str) -> dict:
    """The written JSON (equal to the printed one), after checking the PNG and TensorBoard."""
    res = json.loads((out / "adaptive_compute.json").read_text())
    assert res == json.loads(printed)
    png = out / "adaptive_compute.png"
    assert res["outputs"]["png"] == [str(png)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert h >= 400 and w >= 600  # four panels
    assert any(Path(res["outputs"]["tensorboard"]).glob("events.out.tfevents.*"))
    return res


def test_cli_word_problem(wp_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    rc, printed, err = _cli(
        ["--checkpoint", str(wp_run), "--hard-fracs", "0.5,1", "--samples", "3",
         "--batch-size", "2", "--out", str(out), "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = _read_outputs(out, printed)
    assert res["data"]["group"] == "S3" and res["data"]["length"] == 8  # the run's seq_len
    seq, sim = res["sequential"], res["simultaneous"]
    assert seq["tokens"] == 2 * 3 * 8 and len(seq["per_position"]["mean"]) == 8
    assert [b["name"] for b in seq["buckets"]] == ["0.5", "1"]
    assert sum(seq["histogram"]) == seq["tokens"]
    assert sum(b["tokens"] for b in seq["buckets"]) == seq["tokens"]
    assert 1 <= seq["iters_mean"] <= seq["iters_max"] <= seq["cap"] == 32  # 4 * f_max_iter
    assert sim["samples"] == 6 and sim["cap"] == 32  # max(32, ceil(2.5 * 8))
    assert all(0.0 <= b["accuracy"] <= 1.0 for b in seq["buckets"] + sim["buckets"])
    assert res["note"] is None
    assert res["solver"]["method"] == "picard" and res["solver"]["overrides"] == []

    # --solver: the setting in force is recorded, and the iterations are those it gives
    rc, printed, err = _cli(
        ["--checkpoint", str(wp_run), "--hard-fracs", "1", "--samples", "3", "--batch-size",
         "3", "--no-simultaneous", "--solver", "method=anderson", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    anderson = json.loads(printed)
    assert anderson["solver"]["method"] == "anderson"
    assert anderson["solver"]["overrides"] == ["method=anderson"]
    rc, printed, err = _cli(
        ["--checkpoint", str(wp_run), "--hard-fracs", "1", "--samples", "3", "--batch-size",
         "3", "--no-simultaneous", "--json"],
        capsys,
    )  # fmt: skip
    plain = json.loads(printed)
    assert plain["solver"]["method"] == "picard"
    assert anderson["sequential"]["iters_mean"] != plain["sequential"]["iters_mean"]

    # human output; without --out nothing is written
    monkeypatch.chdir(tmp_path / "out")
    before = sorted(p.name for p in Path.cwd().iterdir())
    rc, printed, err = _cli(
        ["--checkpoint", str(wp_run / "model.safetensors"), "--hard-fracs", "1", "--samples",
         "2", "--length", "5", "--no-simultaneous", "--max-iter", "3"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "hard-token fraction" in printed and "simultaneous" not in printed
    assert "cap 3" in printed
    assert sorted(p.name for p in Path.cwd().iterdir()) == before


def test_cli_explicit_checkpoint(tmp_path: Path, capsys, one_thread: None) -> None:
    """An explicit model runs (one pass per token): every count is 1 and a note says so."""
    run = _save(load_config((), [*WP_OVERRIDES, "model.implicit=false"]), tmp_path / "run")
    rc, printed, err = _cli(
        ["--checkpoint", str(run), "--hard-fracs", "0.5", "--samples", "2", "--json"], capsys
    )
    assert rc == 0, err
    res = json.loads(printed)
    seq, sim = res["sequential"], res["simultaneous"]
    assert "explicit" in res["note"]
    assert seq["histogram"] == [0, 16] and seq["per_position"]["mean"] == [1.0] * 8
    assert seq["spearman_iters_loss"] is None and sim["histogram"] == [0, 2]
    rc, printed, _ = _cli(["--checkpoint", str(run), "--hard-fracs", "1", "--samples", "1"], capsys)
    assert rc == 0 and "note: explicit model" in printed


def test_cli_errors(wp_run: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = _cli(["--checkpoint", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "checkpoint not found" in err
    rc, _, err = _cli(["--checkpoint", str(wp_run), "--hard-fracs", "0.5,1.5"], capsys)
    assert rc == 2 and "--hard-fracs" in err
    rc, _, err = _cli(["--checkpoint", str(wp_run), "--group", "S5"], capsys)
    assert rc == 2 and "--group S5" in err and "vocabulary" in err
    rc, _, err = _cli(["--checkpoint", str(wp_run), "--catbabi", str(tmp_path / "cb")], capsys)
    assert rc == 2 and f"--catbabi {tmp_path / 'cb'}" in err
    rc, _, err = _cli(["--checkpoint", str(wp_run), "--length-bins", "100,50"], capsys)
    assert rc == 2 and "--length-bins" in err


@pytest.fixture(scope="module")
def catbabi_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[Path, Path]:
    """A CatbAbI folder (tasks 1 and 2) and a tiny implicit checkpoint of its vocabulary."""
    root = tmp_path_factory.mktemp("acb")
    data = make_catbabi(root / "catbabi", "--stories", "5", "--tasks", "1,2", "--seed", "0")
    cfg = load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        [f"data.path={data}", "data.seq_len=32", "model.d_model=16", "model.headdim=8",
         "model.d_state=8", "model.n_layers=1", "solver.f_max_iter=8"],
    )  # fmt: skip
    return data, _save(cfg, root / "run")


@pytest.mark.parametrize("carry", [False, True], ids=["empty", "carried"])
def test_cli_catbabi(catbabi_run: tuple[Path, Path], tmp_path: Path, capsys, carry: bool) -> None:
    """Token counts, buckets, tasks and iteration means of the tool against the stream and
    ``forward_sequential`` run here on the same windows (with ``--carry-state`` each window
    continues from the caches the previous one left)."""
    from ilm_megatron.data.catbabi import iter_batches, load_stream

    data, run = catbabi_run
    out = tmp_path / "out"
    rc, printed, err = _cli(
        ["--checkpoint", str(run), "--catbabi", str(data), "--length", "32", "--batch-size", "2",
         "--max-windows", "3", "--length-bins", "110", "--out", str(out), "--json",
         "--carry-state" if carry else "--no-carry-state"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = _read_outputs(out, printed)
    seq, sim = res["sequential"], res["simultaneous"]
    assert res["data"]["source"] == "catbabi" and res["data"]["windows"] == 3
    assert res["data"]["carry_state"] is carry
    assert [b["name"] for b in seq["buckets"]] == ["<=110", ">110"]

    model = load_model(run / "model.safetensors").eval()
    it_b: list[list[int]] = [[], []]
    answers, ans_it, tasks, pos_count = 0, [], set(), [0] * 32
    caches = None
    with torch.no_grad():
        for w, batch in enumerate(iter_batches(load_stream(str(data), "test", 2, 32))):
            if w == 3:
                break
            out = model.forward_sequential(batch.x, caches=caches, max_iter=seq["cap"])
            it = out.stats.sample_iters
            caches = out.caches if carry else None
            for i in range(batch.x.shape[0]):
                for t in range(32):
                    if int(batch.story_pos[i, t]) < 0:  # padding
                        continue
                    v = int(it[i, t])
                    it_b[0 if int(batch.story_len[i, t]) <= 110 else 1].append(v)
                    pos_count[t] += 1
                    tasks.add(str(int(batch.task_id[i, t])))
                    if bool(batch.is_answer[i, t]):
                        answers += 1
                        ans_it.append(v)
    assert seq["tokens"] == len(it_b[0]) + len(it_b[1]) == sum(seq["histogram"])
    assert seq["per_position"]["count"] == pos_count
    for k, row in enumerate(seq["buckets"]):
        assert row["tokens"] == len(it_b[k])
        assert row["iters_mean"] == (None if not it_b[k] else pytest.approx(_mean(it_b[k])))
    assert seq["answers"]["tokens"] == seq["answers"]["scored"] == answers > 0
    assert seq["answers"]["iters_mean"] == pytest.approx(_mean(ans_it))
    assert set(seq["per_task"]) == tasks <= {"1", "2"}
    assert sum(r["scored"] for r in seq["buckets"]) == answers
    assert 0.0 <= seq["answers"]["accuracy"] <= 1.0
    assert sim["samples"] <= 3 * 2 and sum(b["samples"] for b in sim["buckets"]) == sim["samples"]


def test_cli_catbabi_errors(
    catbabi_run: tuple[Path, Path], wp_run: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    data, run = catbabi_run
    rc, _, err = _cli(["--checkpoint", str(wp_run), "--catbabi", str(data)], capsys)
    assert rc == 2 and "do not fit the model's vocabulary (6)" in err
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    (empty / "valid.txt").write_text("")
    rc, _, err = _cli(
        ["--checkpoint", str(run), "--catbabi", str(empty), "--split", "valid"], capsys
    )
    assert rc == 2 and "valid.txt holds no story" in err
    rc, _, err = _cli(["--checkpoint", str(run)], capsys)  # a CatbAbI run has no word problem
    assert rc == 2 and "pass --catbabi DIR or --group" in err
