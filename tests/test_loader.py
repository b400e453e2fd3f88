"""The shard loader: epoch coverage over ranks and workers, exact resume, blending, splits, errors.

Small datasets are written with ``preprocess.main`` and the byte tokenizer; ranks are simulated
in one process by building one loader per rank.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ilm_megatron.data.loader import (
    DataError,
    ManifestMismatchError,
    ShardDataset,
    StatefulLoader,
    check_manifest,
    load_manifest,
    split_range,
)
from ilm_megatron.data.preprocess import main as preprocess
from ilm_megatron.data.tokenizer import ByteTokenizer

SEQ = 16
BS = 5


def make_dataset(root: Path, name: str, n_chars: int, per_shard: int = 10) -> Path:
    text = "".join(f"{name} line {i}: the quick brown fox. " for i in range(n_chars // 30))
    src = root / f"{name}.txt"
    src.write_text(text[:n_chars], encoding="utf-8")
    out = root / name
    argv = ["--input", str(src), "--output", str(out), "--tokenizer", "byte"]
    assert preprocess([*argv, "--seq-len", str(SEQ), "--samples-per-shard", str(per_shard)]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader")
    # 2329 tokens -> 137 samples of 17 in 14 shards (last one partial): odd, uneven over 2 ranks
    return {"a": make_dataset(root, "a", 2328), "b": make_dataset(root, "b", 1700, per_shard=7)}


def take(loader: StatefulLoader, n_batches: int) -> list[list[int]]:
    """ids of the next ``n_batches`` batches (stops early at the end of a finite stream)."""
    out: list[list[int]] = []
    if n_batches == 0:
        return out
    for batch in loader:
        assert batch["tokens"].dtype == torch.long
        assert batch["tokens"].shape == (len(batch["ids"]), SEQ + 1)
        out.append(list(zip(batch["source"].tolist(), batch["ids"].tolist())))
        if len(out) == n_batches:
            break
    return out


def flat(batches: list[list]) -> list:
    return [x for b in batches for x in b]


def test_manifest_and_tokens(data: dict[str, Path]) -> None:
    m = load_manifest(data["a"])
    assert m.samples == 137 and len(m.shard_names) == 14 and m.shard_counts[-1] == 7
    ds = ShardDataset(data["a"], shuffle=False, num_epochs=1)
    items = list(ds)
    assert [it["id"] for it in items] == list(range(137))
    stream = torch.cat([it["tokens"] for it in items])
    text = ByteTokenizer().decode(stream.tolist())
    assert text.startswith("a line 0: the quick brown fox. a line 1:")
    # compare one sample with the raw tar member
    with tarfile.open(data["a"] / m.shard_names[3]) as tf:
        raw = tf.extractfile(tf.getmember("000000000035.tokens.npy")).read()
    assert np.array_equal(np.load(io.BytesIO(raw)).astype(np.int64), items[35]["tokens"].numpy())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_cover_ranks_exactly_once(data: dict[str, Path], num_workers: int) -> None:
    n = 137
    epochs = 3
    per_rank: list[list[list[int]]] = []
    for rank in (0, 1):
        loader = StatefulLoader(
            data["a"], BS, rank=rank, world_size=2, num_workers=num_workers, seed=7
        )
        rl = loader.samples_per_epoch[0]
        assert rl == (69 if rank == 0 else 68)
        ids = [i for _, i in flat(take(loader, -(-rl * epochs // BS)))]
        per_rank.append([ids[e * rl : (e + 1) * rl] for e in range(epochs)])
        assert loader.epoch == epochs - 1 or loader.epoch == epochs
    for e in range(epochs):
        r0, r1 = per_rank[0][e], per_rank[1][e]
        assert sorted(r0 + r1) == list(range(n)), f"epoch {e}: not every sample exactly once"
        assert not set(r0) & set(r1)
    assert per_rank[0][0] != per_rank[0][1] != per_rank[0][2]
    assert per_rank[0][0] != list(range(69))


def test_order_deterministic_in_seed_and_workers(data: dict[str, Path]) -> None:
    def run(seed: int, nw: int) -> list:
        return flat(take(StatefulLoader(data["a"], BS, num_workers=nw, seed=seed), 40))

    ref = run(3, 0)
    assert run(3, 0) == ref
    assert run(3, 2) == ref  # worker count does not change the order
    assert run(4, 0) != ref
    assert sorted(i for _, i in ref[:137]) == list(range(137))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 13, 14, 31])  # mid-epoch, spanning/after epoch boundaries
def test_resume_exact(data: dict[str, Path], num_workers: int, stop: int) -> None:
    total = 36  # 180 samples per rank: crosses the 69-sample epochs twice
    for rank in (0, 1):
        kw = dict(rank=rank, world_size=2, num_workers=num_workers, seed=11)
        ref = take(StatefulLoader(data["a"], BS, **kw), total)
        first = StatefulLoader(data["a"], BS, **kw)
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["samples_consumed"] == stop * BS  # not what prefetching workers produced
        src = state["sources"][0]
        assert (src["epoch"], src["epoch_offset"]) == divmod(stop * BS, 69 if rank == 0 else 68)
        second = StatefulLoader(data["a"], BS, **kw)
        second.load_state_dict(state)
        tail = take(second, total - stop)
        assert head + tail == ref
        assert len(set(flat(head + tail)[: 137 // 2])) == 137 // 2


def test_resume_twice_in_one_loader_and_other_worker_count(data: dict[str, Path]) -> None:
    ref = flat(take(StatefulLoader(data["a"], BS, seed=1), 30))
    loader = StatefulLoader(data["a"], BS, seed=1, num_workers=2)
    got = flat(take(loader, 10)) + flat(take(loader, 5))  # re-iterating continues
    other = StatefulLoader(data["a"], BS, seed=1, num_workers=0)
    other.load_state_dict(loader.state_dict())
    got += flat(take(other, 15))
    assert got == ref


def test_blend_ratios_and_resume(data: dict[str, Path]) -> None:
    spec = [(data["a"], 3.0), (data["b"], 1.0)]
    loader = StatefulLoader(spec, 8, seed=2)
    ref = take(loader, 60)
    picks = flat(ref)
    src = np.array([s for s, _ in picks])
    dev = np.abs(np.cumsum(src == 0) - 0.75 * np.arange(1, len(src) + 1))
    assert dev.max() <= 1.0
    assert abs((src == 0).mean() - 0.75) < 0.01
    # each source's own stream covers its samples once per epoch
    b_ids = [i for s, i in picks if s == 1]
    nb = load_manifest(data["b"]).samples
    assert sorted(b_ids[:nb]) == list(range(nb))
    assert loader.state_dict()["sources"][1]["consumed"] == len(b_ids)
    for nw, stop in ((0, 17), (2, 33)):
        first = StatefulLoader(spec, 8, seed=2, num_workers=nw)
        head = take(first, stop)
        second = StatefulLoader(spec, 8, seed=2)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + take(second, 60 - stop) == ref
    assert take(StatefulLoader(spec, 8, seed=5), 60) != ref
    with pytest.raises(ValueError, match="weight"):
        StatefulLoader([(data["a"], 0.0)], 8)


def test_val_split_disjoint(data: dict[str, Path]) -> None:
    assert split_range(137, "val", 0.1) == (123, 137)
    assert split_range(137, "train", 0.1) == (0, 123)
    train = {i for _, i in flat(take(StatefulLoader(data["a"], BS, val_fraction=0.1), 60))}
    assert train == set(range(123))
    val: list[int] = []
    for rank in (0, 1):
        loader = StatefulLoader(
            data["a"],
            4,
            rank=rank,
            world_size=2,
            split="val",
            val_fraction=0.1,
            shuffle=False,
            num_epochs=1,
            num_workers=2,
        )
        val += [i for _, i in flat(take(loader, 1000))]  # finite: stops after one epoch
    assert sorted(val) == list(range(123, 137)) and not train & set(val)
    with pytest.raises(ValueError, match="val_fraction"):
        StatefulLoader(data["a"], BS, split="val")


def test_check_manifest(data: dict[str, Path]) -> None:
    tok = ByteTokenizer()
    m = check_manifest(data["a"], 257, tok.fingerprint(), seq_len=SEQ)
    assert m.vocab_size == 257
    with pytest.raises(ManifestMismatchError) as exc:
        check_manifest(data["a"], 50304)
    msg = str(exc.value)
    assert "50304" in msg and "257" in msg and str(data["a"] / "manifest.json") in msg
    with pytest.raises(ManifestMismatchError, match="fingerprint") as exc:
        check_manifest(data["a"], 257, "0" * 64)
    assert "0" * 64 in str(exc.value) and tok.fingerprint() in str(exc.value)
    with pytest.raises(ManifestMismatchError, match="seq_len"):
        check_manifest(data["a"], 257, seq_len=2048)


def test_manifest_errors(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(data["a"], bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest") as exc:
        load_manifest(bad)
    assert str(bad / "manifest.json") in str(exc.value)
    man = json.loads((data["a"] / "manifest.json").read_text())
    man["samples"] += 1
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="sum to"):
        load_manifest(bad)


def test_missing_and_corrupt_shards(data: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "ds"
    shutil.copytree(data["a"], d)
    shard = d / "shard-000002.tar"
    # byte flip: caught by the checksum check
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 mismatch") as exc:
        StatefulLoader(d, BS, verify_checksums=True)
    assert str(shard) in str(exc.value)
    # truncated shard: caught when read, the message names the file
    shard.write_bytes(bytes(raw[:2000]))
    loader = StatefulLoader(d, BS, shuffle=False)
    with pytest.raises(DataError) as exc:
        take(loader, 10)
    assert str(shard) in str(exc.value)
    loader = StatefulLoader(d, BS, shuffle=False, num_workers=2)
    with pytest.raises(DataError) as exc:
        take(loader, 10)
    assert str(shard) in str(exc.value)
    # missing shard: caught at construction
    shard.unlink()
    with pytest.raises(DataError, match="missing") as exc:
        StatefulLoader(d, BS)
    assert str(shard) in str(exc.value)


def test_state_mismatch_and_args(data: dict[str, Path]) -> None:
    state = StatefulLoader(data["a"], BS, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        StatefulLoader(data["a"], BS, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not the dataset"):
        StatefulLoader(data["b"], BS, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        StatefulLoader(data["a"], BS, rank=2, world_size=2)
    with pytest.raises(DataError, match="tokenizer|seq_len"):
        make = data["a"].parent / "other"
        if not make.exists():
            src = data["a"].parent / "other.txt"
            src.write_text("x" * 500)
            argv = ["--input", str(src), "--output", str(make), "--tokenizer", "byte"]
            assert preprocess([*argv, "--seq-len", "8"]) == 0
        StatefulLoader([(data["a"], 1.0), (make, 1.0)], BS)
