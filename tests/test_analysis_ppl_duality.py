"""``ilm-eval ppl-by-position`` and ``ilm-eval duality`` against independent computations.

The shards are the byte tokenizer's (UTF-8 bytes, EOD = 256) of one text file, so the token
stream they hold is the text's bytes themselves: the sequence assembly is checked against them.
Per-position NLLs are checked against a loop of ``F.cross_entropy`` over the model's own logits,
the KL and agreement against hand-computed distributions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from ilm_megatron.analysis import duality, ppl_by_position
from ilm_megatron.errors import UserError
from ilm_megatron.models.lm import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16  # shard sample length (+1)
TRAIN_LEN = 8  # data.seq_len stored in the checkpoints
EOD = 256
TEXT = "".join(f"{i}: the quick brown fox jumps over the lazy dog. " for i in range(40))


def _stream() -> torch.Tensor:
    """The token stream the shards hold: the text's bytes, EOD, cut to whole samples."""
    ids = list(TEXT.encode()) + [EOD]
    n = len(ids) // (SEQ + 1) * (SEQ + 1)
    return torch.tensor(ids[:n])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ilm_megatron.data.preprocess import main as preprocess

    root = tmp_path_factory.mktemp("ppl")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    out = root / "shards"
    argv = ["--input", str(root / "text.txt"), "--output", str(out), "--tokenizer", "byte"]
    assert preprocess([*argv, "--seq-len", str(SEQ), "--samples-per-shard", "7"]) == 0
    return out


def _save(path: Path, implicit: bool, *overrides: str) -> Path:
    """A tiny Mamba2 checkpoint (random weights) whose stored config says ``overrides``."""
    from ilm_megatron.train.checkpoint import save_model

    cfg = tiny_config("mamba2", implicit, ("model.d_model=16", *overrides))
    torch.manual_seed(0)
    save_model(build_model(cfg.model, cfg.solver), cfg, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> dict[str, Path]:
    """An implicit and an explicit checkpoint over the byte vocabulary, trained length 8."""
    root = tmp_path_factory.mktemp("runs")
    text = ("model.vocab_size=257", "data.task=shards", f"data.path={shards}",
            f"data.seq_len={TRAIN_LEN}")  # fmt: skip
    return {
        "implicit": _save(root / "implicit", True, *text),
        "explicit": _save(root / "explicit", False, *text),
        "small_vocab": _save(root / "small_vocab", True, "data.task=shards"),
    }


def _ilm_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ilm_megatron.tasks.eval import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _png_shape(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape


# --------------------------------------------------------------------------- ppl-by-position


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_sequences_are_the_held_out_token_stream(shards: Path, val_fraction: float) -> None:
    stream = _stream()
    n_samples = len(stream) // (SEQ + 1)
    n_val = max(1, round(val_fraction * n_samples)) if val_fraction else n_samples
    held_out = stream[(n_samples - n_val) * (SEQ + 1) :]
    length, count = 20, 3  # sequences cross sample (and shard) boundaries
    got, manifest = ppl_by_position.assemble_sequences(shards, length, count, val_fraction)
    assert got.shape == (count, length + 1) and manifest.vocab_size == 257
    assert torch.equal(got, held_out[: count * (length + 1)].view(count, length + 1))
    # one token too many for the held-out part: the error says what there is
    too_many = len(held_out) // (length + 1) + 1
    with pytest.raises(UserError, match=r"--data .*shards.*lower --samples"):
        ppl_by_position.assemble_sequences(shards, length, too_many, val_fraction)


def test_buckets_cover_every_position_once() -> None:
    mb = ppl_by_position.make_buckets
    assert mb(32) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32)]
    assert mb(12) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 12)]
    assert mb(10, width=4) == [(1, 4), (5, 8), (9, 10)]
    assert mb(10, ends=[3, 10]) == [(1, 3), (4, 10)]
    assert mb(1) == [(1, 1)]
    for length in range(1, 40):
        for b in (mb(length), mb(length, width=3), mb(length, ends=[2, 5][: length // 3])):
            covered = [p for first, last in b for p in range(first, last + 1)]
            assert covered == list(range(1, length + 1)), (length, b)
    with pytest.raises(UserError, match="--buckets"):
        mb(10, ends=[5, 3])
    with pytest.raises(UserError, match="--buckets"):
        mb(10, ends=[4, 11])


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_bucket_nll_equals_a_loop_over_positions(mode: str) -> None:
    cfg = tiny_config("mamba2", overrides=("model.d_model=16", "solver.eval_tol=1e-4"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).eval()
    vocab = cfg.model.vocab_size
    # simultaneous: 2.5 * 48 = 120 > the configured eval cap 4 * 24, the cap grows with length
    length = 48 if mode == "simultaneous" else 20
    tokens = torch.randint(0, vocab, (3, length + 1), generator=torch.Generator().manual_seed(1))
    buckets = [(1, 5), (6, 17), (18, length)]
    res = ppl_by_position.evaluate_model(model, tokens, buckets, mode, batch_size=2)
    cap = 120 if mode == "simultaneous" else 96
    assert res["cap"] == cap

    # the model's logits on the same batches (the solver's stop test is batch-wide), then one
    # cross-entropy per position
    nll = torch.zeros(3, length, dtype=torch.float64)
    iters, converged = [], []
    for first in (0, 2):
        rows = tokens[first : first + 2]
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.no_grad():
            out = model(x, max_iter=cap) if mode == "simultaneous" else model.forward_sequential(x)
        for b in range(len(rows)):
            for t in range(length):
                ce = F.cross_entropy(out.logits[b, t, :vocab][None], y[b, t][None])
                nll[first + b, t] = ce.item()
        iters.append(out.stats.sample_iters.double())
        converged.append(out.stats.converged.double().flatten())
    iters = torch.cat(iters)  # (3,) per sample or (3, length) per token
    for row, (first, last) in zip(res["buckets"], buckets):
        want = nll[:, first - 1 : last].mean().item()
        assert (row["start"], row["end"], row["tokens"]) == (first, last, 3 * (last - first + 1))
        assert row["nll"] == pytest.approx(want, abs=1e-6)
        assert row["ppl"] == pytest.approx(math.exp(want), rel=1e-6)
        if mode == "sequential":  # per token: the mean over the bucket's tokens
            assert row["iters_mean"] == pytest.approx(iters[:, first - 1 : last].mean().item())
        else:  # one solve per sample covers all its positions
            assert row["iters_mean"] == pytest.approx(iters.mean().item())
    assert res["nll"] == pytest.approx(nll.mean().item(), abs=1e-6)
    assert res["iters_mean"] == pytest.approx(iters.mean().item())
    assert res["iters_max"] == iters.max().item() > 1
    assert res["converged_frac"] == pytest.approx(torch.cat(converged).mean().item())


def test_cli_two_models_side_by_side(
    text_runs: dict[str, Path], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    rc, stdout, err = _ilm_eval(
        ["ppl-by-position", "--checkpoint", str(text_runs["implicit"]),
         "--checkpoint", str(text_runs["explicit"] / "model.safetensors"),
         "--data", str(shards), "--samples", "2", "--out", str(out), "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    printed = json.loads(stdout)
    written = json.loads((out / "ppl_by_position.json").read_text())
    assert printed == written
    assert written["outputs"]["png"] == [str(out / "ppl_by_position.png")]
    assert _png_shape(out / "ppl_by_position.png")[:2] == (450, 700)
    assert any((out / "tensorboard").iterdir())

    length = 4 * TRAIN_LEN  # the default: four times the training length
    assert written["length"] == length and written["split"] == "all"
    assert [m["label"] for m in written["models"]] == ["implicit", "explicit"]
    stream = _stream()[: 2 * (length + 1)].view(2, length + 1)
    for m in written["models"]:
        assert m["train_length"] == TRAIN_LEN
        assert [(b["start"], b["end"]) for b in m["buckets"]] == [
            (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32)
        ]  # fmt: skip
        assert sum(b["tokens"] for b in m["buckets"]) == 2 * length
        # the whole-sequence NLL, recomputed from the checkpoint and the text's own bytes
        from ilm_megatron.train.checkpoint import load_model

        model = load_model(Path(m["checkpoint"])).eval()
        with torch.no_grad():
            logits = model(stream[:, :-1], max_iter=m["cap"]).logits[..., :257]
        want = F.cross_entropy(logits.flatten(0, 1), stream[:, 1:].flatten()).item()
        assert m["nll"] == pytest.approx(want, abs=1e-5)
        assert m["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    imp, exp = written["models"]
    assert imp["implicit"] and imp["cap"] == 96 and imp["iters_mean"] > 1
    assert imp["solver"]["method"] == "picard" and imp["solver"]["overrides"] == []
    assert not exp["implicit"] and exp["cap"] is None and exp["iters_mean"] == 1.0

    # human-readable output, custom labels and buckets, held-out split, sequential mode
    rc, stdout, err = _ilm_eval(
        ["ppl-by-position", "--checkpoint", str(text_runs["implicit"]), "--label", "ilm",
         "--data", str(shards), "--val-fraction", "0.5", "--length", "12", "--samples", "1",
         "--bucket-width", "6", "--mode", "sequential"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "sequential mode" in stdout and "ilm" in stdout and "7-12" in stdout


def test_cli_ppl_solver_settings(
    text_runs: dict[str, Path], shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ppl-by-position --solver``: the settings in force are in the result, and its NLL and
    iterations are those of the model run here with the same settings."""
    import dataclasses

    from ilm_megatron.train.checkpoint import load_model

    settings = ["method=anderson", "anderson_m=3", "early_exit=true"]
    rc, stdout, err = _ilm_eval(
        ["ppl-by-position", "--checkpoint", str(text_runs["implicit"]), "--data", str(shards),
         "--samples", "2", "--json", *(a for kv in settings for a in ("--solver", kv))],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    (m,) = json.loads(stdout)["models"]
    solver = m["solver"]
    assert solver["method"] == "anderson" and solver["anderson_m"] == 3 and solver["early_exit"]
    assert solver["overrides"] == settings
    model = load_model(Path(m["checkpoint"])).eval()
    model.solver_config = dataclasses.replace(
        model.solver_config, method="anderson", anderson_m=3, early_exit=True
    )
    length = 4 * TRAIN_LEN
    stream = _stream()[: 2 * (length + 1)].view(2, length + 1)
    with torch.no_grad():
        out = model(stream[:, :-1], max_iter=m["cap"])
    want = F.cross_entropy(out.logits[..., :257].flatten(0, 1), stream[:, 1:].flatten()).item()
    assert m["nll"] == pytest.approx(want, abs=1e-5)
    assert m["iters_mean"] == pytest.approx(out.stats.sample_iters.float().mean().item())


def test_cli_ppl_errors(
    text_runs: dict[str, Path], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["ppl-by-position", "--data", str(shards), "--samples", "1", "--length", "8"]
    rc, _, err = _ilm_eval([*base, "--checkpoint", str(text_runs["small_vocab"])], capsys)
    assert rc == 2 and "vocabulary (64 tokens)" in err
    assert str(text_runs["small_vocab"]) in err and str(shards / "manifest.json") in err
    rc, _, err = _ilm_eval(
        [*base, "--checkpoint", str(text_runs["implicit"]), "--label", "a", "--label", "b"], capsys
    )
    assert rc == 2 and "--label" in err
    rc, _, err = _ilm_eval([*base, "--checkpoint", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "checkpoint not found" in err
    missing = tmp_path / "no_data"
    rc, _, err = _ilm_eval(
        ["ppl-by-position", "--checkpoint", str(text_runs["implicit"]), "--data", str(missing)],
        capsys,
    )
    assert rc == 2 and str(missing) in err
    assert not any(tmp_path.iterdir())  # nothing written without --out


# --------------------------------------------------------------------------- duality


def test_kl_and_agreement_on_known_distributions() -> None:
    vocab = 3
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]).log()
    q = torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
    q = q + 7.0  # a shift of the logits changes no distribution
    pad = torch.tensor([[100.0], [-100.0], [100.0]])  # a padded vocabulary entry: never counted
    p, q = torch.cat([p, pad], -1), torch.cat([q, -pad], -1)
    kl = duality.kl_per_position(p, q, vocab)
    assert kl.dtype == torch.float64
    # KL(p || q) by hand: 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = ln 1.25 (KL(q || p) = 0.193);
    # 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.2) = 0.3 ln 2.5; identical distributions: 0
    want = [math.log(1.25), 0.3 * math.log(2.5), 0.0]
    assert kl.tolist() == pytest.approx(want, abs=1e-7)
    assert duality.greedy_agreement(p, q, vocab).tolist() == [True, False, True]
    assert duality.max_abs_diff(p, q, vocab) == pytest.approx(7.0 + math.log(2.5), abs=1e-5)
    assert duality.max_abs_diff(p, q) == pytest.approx(200.0)


def test_agreement_and_iterations_against_the_tolerance() -> None:
    cfg = tiny_config("mamba2")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).eval()
    base = model.solver_config
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    tols = [1e-1, 3e-2, 1e-3, 1e-6]
    rows = duality.measure(model, [ids[:1], ids[1:]], tols, sim_cap=200, seq_cap=200)
    assert model.solver_config is base  # restored
    assert [r["tol"] for r in rows] == tols
    tight = rows[-1]
    assert tight["converged_frac_simultaneous"] == tight["converged_frac_sequential"] == 1.0
    assert tight["agreement"] == 1.0
    assert tight["kl_mean"] < 1e-9 and tight["max_abs_logit_diff"] < 1e-4
    # a looser tolerance never takes more iterations, and the loosest takes fewer
    for mode in ("simultaneous", "sequential"):
        its = [r[f"iters_{mode}"] for r in rows]
        assert all(a <= b for a, b in zip(its, its[1:])), (mode, its)
        assert its[0] < its[-1], (mode, its)
    assert rows[0]["kl_mean"] > tight["kl_mean"]
    # the per-tolerance numbers are those of the two modes run at that eval_tol
    # (on the same batches: the solver's stop test is batch-wide)
    model.solver_config = dataclasses.replace(base, eval_tol=1e-1)
    kl, seq_iters = [], []
    for batch in (ids[:1], ids[1:]):
        with torch.no_grad():
            sim, seq = model(batch, max_iter=200), model.forward_sequential(batch, max_iter=200)
        lp = torch.log_softmax(sim.logits[..., :64].double(), -1)
        lq = torch.log_softmax(seq.logits[..., :64].double(), -1)
        kl.append((lp.exp() * (lp - lq)).sum(-1).flatten())
        seq_iters.append(seq.stats.sample_iters.double().flatten())
    assert rows[0]["kl_mean"] == pytest.approx(torch.cat(kl).mean().item(), rel=1e-9)
    assert rows[0]["iters_sequential"] == pytest.approx(torch.cat(seq_iters).mean().item())


@pytest.fixture(scope="module")
def word_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny implicit Mamba2 checkpoint of an S3 word-problem run at length 8."""
    root = tmp_path_factory.mktemp("word")
    return _save(root / "s3", True, "model.vocab_size=6", "data.group=S3", "data.seq_len=8")


def test_cli_duality_word_problem(
    word_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    rc, stdout, err = _ilm_eval(
        ["duality", "--checkpoint", str(word_run), "--samples", "3", "--batch-size", "2",
         "--tols", "1e-1,1e-6", "--out", str(out), "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    printed = json.loads(stdout)
    written = json.loads((out / "duality.json").read_text())
    assert printed == written
    assert _png_shape(out / "duality.png")[:2] == (400, 1300)
    assert written["data"] == "S3 word problem" and written["length"] == 8
    assert written["samples"] == 3 and written["cap_simultaneous"] == 96
    loose, tight = written["rows"]
    assert (loose["tol"], tight["tol"]) == (1e-1, 1e-6)
    assert tight["agreement"] == 1.0 and tight["kl_mean"] < 1e-9
    assert loose["iters_simultaneous"] < tight["iters_simultaneous"]
    assert loose["iters_sequential"] < tight["iters_sequential"]
    assert 0.0 <= loose["agreement"] <= 1.0

    rc, stdout, err = _ilm_eval(
        ["duality", "--checkpoint", str(word_run), "--tols", "1e-2"], capsys
    )
    assert rc == 0, err
    assert "S3 word problem" in stdout and "agreement" in stdout


def test_cli_duality_errors(
    text_runs: dict[str, Path], shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _ilm_eval(["duality", "--checkpoint", str(text_runs["explicit"])], capsys)
    assert rc == 2 and "explicit" in err
    rc, _, err = _ilm_eval(["duality", "--checkpoint", str(text_runs["implicit"])], capsys)
    assert rc == 2 and "--data" in err  # a text run has no word problem
    rc, _, err = _ilm_eval(["duality", "--checkpoint", "x", "--tols", "1e-2,0"], capsys)
    assert rc == 2 and "--tols" in err
    # text shards instead: the model's own training length, every position compared
    rc, stdout, err = _ilm_eval(
        ["duality", "--checkpoint", str(text_runs["implicit"]), "--data", str(shards),
         "--samples", "2", "--tols", "1e-6", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["length"] == TRAIN_LEN and res["rows"][0]["agreement"] == 1.0


def test_cli_duality_solver_settings(word_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--solver KEY=VALUE`` is the setting in force (read back from the result), and the
    iterations are those of the model run here with the same setting; bad settings are named."""
    import dataclasses

    from ilm_megatron.data.word_problem import sample_word_problem
    from ilm_megatron.train.checkpoint import load_model

    rc, stdout, err = _ilm_eval(
        ["duality", "--checkpoint", str(word_run), "--samples", "4", "--batch-size", "4",
         "--tols", "1e-6", "--solver", "method=anderson", "--solver", "anderson_m=3",
         "--seed", "5", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["method"] == "anderson" and res["solver_overrides"] == [
        "method=anderson",
        "anderson_m=3",
    ]
    assert res["solver"]["method"] == "anderson" and res["solver"]["anderson_m"] == 3
    model = load_model(word_run / "model.safetensors").eval()
    model.solver_config = dataclasses.replace(
        model.solver_config, method="anderson", anderson_m=3, eval_tol=1e-6
    )
    ids, _ = sample_word_problem("S3", 4, 8, torch.Generator().manual_seed(5))
    with torch.no_grad():
        it = model(ids, max_iter=res["cap_simultaneous"]).stats.sample_iters.float().mean()
    assert res["rows"][0]["iters_simultaneous"] == pytest.approx(it.item())
    for bad, named in (("metod=anderson", "metod=anderson"), ("anderson_m=0", "anderson_m"),
                       ("early_exit=maybe", "early_exit=maybe")):  # fmt: skip
        rc, _, err = _ilm_eval(["duality", "--checkpoint", str(word_run), "--solver", bad], capsys)
        assert rc == 2 and named in err and "--solver" in err
