"""Tests of the tokenizers and of the corpus -> packed WebDataset shard preprocessing."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ilm_megatron.data.preprocess import ERROR_KINDS, MANIFEST_NAME, main
from ilm_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

DOCS = [f"Document number {i}: " + "the quick brown fox jumps. " * (i % 5 + 1) for i in range(40)]
DOCS[3] = "Ünïcödé text — with non-ASCII ✓ characters"


def write_jsonl(path: Path, docs: list[str], names: list[str] | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            rec: dict = {"text": doc}
            if names is not None:
                rec["meta"] = {"pile_set_name": names[i]}
            fh.write(json.dumps(rec) + "\n")
    return path


def run_pp(inp: list[Path], out: Path, *extra: str, seq_len: int = 32) -> int:
    argv = ["--input", *map(str, inp), "--output", str(out), "--tokenizer", "byte"]
    argv += ["--seq-len", str(seq_len), "--samples-per-shard", "8", *extra]
    if "--tokenizer" in extra:
        i = argv.index("--tokenizer")
        del argv[i : i + 2]
    return main(argv)


def expected_rows(docs: list[str], tok, seq_len: int) -> tuple[np.ndarray, int]:
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d) + [tok.eod_id]
    n = len(stream) // (seq_len + 1)
    rows = np.array(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)
    return rows, len(stream) - n * (seq_len + 1)


def read_rows_tarfile(out: Path) -> tuple[list[str], np.ndarray]:
    keys, rows = [], []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                assert field == "tokens.npy"
                keys.append(key)
                rows.append(np.load(io.BytesIO(tf.extractfile(m).read())))
    return keys, np.stack(rows).astype(np.int64)


def dir_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def no_tmp(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.name) == (257, 256, "byte")
    ids = tok.encode("hé")
    assert ids == [104, 0xC3, 0xA9]
    assert tok.decode(ids + [256]) == "hé"
    assert tok.fingerprint() == ByteTokenizer().fingerprint()
    assert len(tok.fingerprint()) == 64


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS * 3, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_tokenizer_json: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(hf_tokenizer_json))
    assert isinstance(tok, HFTokenizer)
    text = "the quick brown fox, Ünïcödé ✓"
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eod_id]) == text
    assert tok.eod_id == tok._tok.token_to_id("<|endoftext|>")
    assert tok.vocab_size >= 258
    assert tok.fingerprint() == hashlib.sha256(hf_tokenizer_json.read_bytes()).hexdigest()
    assert HFTokenizer(hf_tokenizer_json, eod_token="<pad>").eod_id != tok.eod_id
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        HFTokenizer(hf_tokenizer_json, eod_token="<nope>")
    missing = tmp_path / "missing.json"
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(str(bad))


def test_hf_tokenizer_preprocess(hf_tokenizer_json: Path, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    assert run_pp([inp], out, "--tokenizer", str(hf_tokenizer_json), seq_len=16) == 0
    tok = load_tokenizer(str(hf_tokenizer_json))
    rows, tail = expected_rows(DOCS, tok, 16)
    _, got = read_rows_tarfile(out)
    np.testing.assert_array_equal(got, rows)
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert man["tokenizer"]["eod_id"] == tok.eod_id
    assert man["dropped_tail_tokens"] == tail


# ----------------------------------------------------------------------------------- round trip


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "b.jsonl", DOCS[20:])
    write_jsonl(src / "a.jsonl", DOCS[:20])
    (src / "c.txt").write_text("A whole text file\nis one document.\n", encoding="utf-8")
    (src / "ignored.md").write_text("not an input")
    out = tmp_path / "out"
    assert run_pp([src], out, "--seed", "7") == 0
    tok = ByteTokenizer()
    docs = DOCS + ["A whole text file\nis one document.\n"]  # sorted: a.jsonl, b.jsonl, c.txt
    # Packing is per input file: each file's stream is cut on its own and its tail dropped.
    per_file = [expected_rows(d, tok, 32) for d in (DOCS[:20], DOCS[20:], docs[-1:])]
    rows = np.concatenate([r for r, _ in per_file])
    tail = sum(t for _, t in per_file)
    keys, got = read_rows_tarfile(out)
    np.testing.assert_array_equal(got, rows)
    assert keys == [f"{i:012d}" for i in range(len(rows))]

    import webdataset as wds

    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    wrows = [s["tokens.npy"] for s in ds]
    assert wrows[0].dtype == np.dtype("<u2")
    np.testing.assert_array_equal(np.stack(wrows).astype(np.int64), rows)

    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["format_version"] == 1
    assert man["samples"] == len(rows)
    assert man["tokens"] == rows.size
    assert man["dropped_tail_tokens"] == tail
    assert man["tokens_total"] == rows.size + tail
    assert man["seq_len"] == 32 and man["sample_len"] == 33 and man["seed"] == 7
    assert man["dtype"] == "<u2"
    assert man["tokenizer"] == {
        "name": "byte",
        "fingerprint": tok.fingerprint(),
        "vocab_size": 257,
        "eod_id": 256,
    }
    assert man["documents"] == {"tokenized": len(docs), "filtered": 0, "errors": 0}
    assert man["errors"] == {k: 0 for k in ERROR_KINDS}
    assert [Path(s["path"]).name for s in man["sources"]] == ["a.jsonl", "b.jsonl", "c.txt"]
    for s in man["sources"]:
        data = Path(s["path"]).read_bytes()
        assert s["size"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    shards = sorted(out.glob("shard-*.tar"))
    assert [s["name"] for s in man["shards"]] == [p.name for p in shards]
    assert sum(s["samples"] for s in man["shards"]) == len(rows)
    for s in man["shards"]:
        assert s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest()
    assert no_tmp(out)


def test_workers_byte_identical(tmp_path: Path) -> None:
    docs = DOCS * 10  # several batches
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    assert run_pp([inp], tmp_path / "w1", "--workers", "1") == 0
    assert run_pp([inp], tmp_path / "w2", "--workers", "2") == 0
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2")


def test_zst_equals_jsonl(tmp_path: Path) -> None:
    import zstandard

    inp = write_jsonl(tmp_path / "a.jsonl", DOCS)
    data = inp.read_bytes()
    half = len(data) // 2
    cctx = zstandard.ZstdCompressor()
    zst = tmp_path / "z" / "a.jsonl.zst"
    zst.parent.mkdir()
    zst.write_bytes(cctx.compress(data[:half]) + cctx.compress(data[half:]))  # two frames
    assert run_pp([inp], tmp_path / "o1") == 0
    assert run_pp([zst], tmp_path / "o2") == 0
    shards1 = {k: v for k, v in dir_bytes(tmp_path / "o1").items() if k.endswith(".tar")}
    shards2 = {k: v for k, v in dir_bytes(tmp_path / "o2").items() if k.endswith(".tar")}
    assert shards1 and shards1 == shards2


def test_pile_set_name_filter(tmp_path: Path) -> None:
    names = ["Pile-CC" if i % 3 else "Github" for i in range(len(DOCS))]
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS, names)
    out = tmp_path / "out"
    assert run_pp([inp], out, "--pile-set-name", "Github", seq_len=8) == 0
    kept = [d for d, n in zip(DOCS, names) if n == "Github"]
    rows, _ = expected_rows(kept, ByteTokenizer(), 8)
    np.testing.assert_array_equal(read_rows_tarfile(out)[1], rows)
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["documents"]["tokenized"] == len(kept)
    assert man["documents"]["filtered"] == len(DOCS) - len(kept)
    assert man["pile_set_names"] == ["Github"]


# ------------------------------------------------------------------------------------ bad input

BAD_LINES: dict[str, bytes] = {
    "invalid_json": b'{"text": "unterminated',
    "not_an_object": b"[1, 2, 3]",
    "missing_key": b'{"content": "x"}',
    "non_string_text": b'{"text": 5}',
    "invalid_utf8": b'{"text": "bad \xff byte"}',
    "empty_document": b'{"text": ""}',
}


def make_bad_input(tmp_path: Path, kind: str) -> tuple[Path, int]:
    """A file with good documents and one bad record of ``kind``; returns (path, bad line)."""
    good = [json.dumps({"text": d}).encode() for d in DOCS[:6]]
    if kind == "truncated_zst":
        import zstandard

        path = tmp_path / "bad.jsonl.zst"
        cctx = zstandard.ZstdCompressor()
        first = cctx.compress(b"\n".join(good[:3]) + b"\n")
        second = cctx.compress(b"\n".join(good[3:]) + b"\n")
        path.write_bytes(first + second[: len(second) // 2])
        return path, 4
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(good[:3] + [BAD_LINES[kind]] + good[3:]) + b"\n")
    return path, 4


ALL_KINDS = [*BAD_LINES, "truncated_zst"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_input_fail(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    path, line = make_bad_input(tmp_path, kind)
    out = tmp_path / "out"
    assert run_pp([path], out, seq_len=4) == 2
    err = capsys.readouterr().err
    assert f"{path.resolve()}:{line}: {kind}" in err
    assert not (out / MANIFEST_NAME).exists()
    assert no_tmp(out)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_input_skip(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    path, line = make_bad_input(tmp_path, kind)
    out = tmp_path / "out"
    assert run_pp([path], out, "--on-error", "skip", seq_len=4) == 0
    err = capsys.readouterr().err
    assert f"{path.resolve()}:{line}: {kind}" in err
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["errors"] == {k: int(k == kind) for k in ERROR_KINDS}
    assert man["documents"]["errors"] == 1
    expected_docs = DOCS[:3] if kind == "truncated_zst" else DOCS[:6]
    assert man["documents"]["tokenized"] == len(expected_docs)
    rows, _ = expected_rows(expected_docs, ByteTokenizer(), 4)
    np.testing.assert_array_equal(read_rows_tarfile(out)[1], rows)


def test_bad_txt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xfe\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"  \n")
    assert run_pp([bad], tmp_path / "o1") == 2
    assert f"{bad.resolve()}:2: invalid_utf8" in capsys.readouterr().err
    assert run_pp([empty], tmp_path / "o2") == 2
    assert f"{empty.resolve()}:1: empty_document" in capsys.readouterr().err


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    assert run_pp([tmp_path / "nope.jsonl"], tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert run_pp([inp], tmp_path / "o", "--seq-len", "0") == 2
    assert run_pp([inp], tmp_path / "o", "--tokenizer", str(tmp_path / "tok.json")) == 2
    assert "tok.json" in capsys.readouterr().err
    assert run_pp([inp], tmp_path / "o", "--resume", "--overwrite") == 2
    (tmp_path / "empty").mkdir()
    assert run_pp([tmp_path / "empty"], tmp_path / "o") == 2


def test_cli_script(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    script = str(ROOT / "tools" / "preprocess_data.py")
    base = [sys.executable, script, "--input", str(inp), "--tokenizer", "byte", "--seq-len", "8"]
    ok = subprocess.run([*base, "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / MANIFEST_NAME).exists()
    bad = subprocess.run([*base, "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not empty" in bad.stderr


# --------------------------------------------------------------------------- overwrite / resume


def test_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS)
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert run_pp([inp], fresh) == 0
    assert run_pp([write_jsonl(tmp_path / "b.jsonl", DOCS[:10])], out) == 0
    assert run_pp([inp], out) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_pp([inp], out, "--overwrite") == 0
    assert dir_bytes(out) == dir_bytes(fresh)
    (out / "notes.txt").write_text("user file")
    assert run_pp([inp], out, "--overwrite") == 2
    assert (out / "notes.txt").exists()


def test_resume_equals_fresh(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inp = write_jsonl(tmp_path / "a.jsonl", DOCS)
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert run_pp([inp], fresh) == 0
    assert run_pp([inp], out) == 0
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) >= 4
    # Simulate an interrupted run: no manifest, last shard missing, one corrupted, a temp file.
    (out / MANIFEST_NAME).unlink()
    shards[-1].unlink()
    shards[1].write_bytes(b"garbage")
    (out / ".shard-000009.tar.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert run_pp([inp], out, "--resume") == 0
    assert f"({len(shards) - 2} reused)" in capsys.readouterr().err
    assert dir_bytes(out) == dir_bytes(fresh)
    # Resuming a complete run is a no-op; resuming with other settings is refused.
    assert run_pp([inp], out, "--resume") == 0
    assert dir_bytes(out) == dir_bytes(fresh)
    assert run_pp([inp], out, "--resume", seq_len=16) == 2
    assert "cannot resume" in capsys.readouterr().err
