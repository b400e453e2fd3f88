"""Benchmark the data pipeline on the CPU: preprocessing tokens/s and loader samples/s.

Generates a synthetic corpus (``--corpus-mb`` MB of jsonl, deterministic), preprocesses it with the
byte tokenizer and with a tiny byte-level BPE tokenizer trained on it with the ``tokenizers``
library (no download), then reads the byte shards with
:class:`ilm_megatron.data.loader.StatefulLoader` for ``--loader-seconds`` per worker setting.
Throughputs are compared with what training consumes (``--consume-tokens-per-s``, e.g. batch 64 x
seq 256 tokens per measured step time); the target is a ratio >= 10.

Usage::

    python tools/bench_data.py --json

Exit codes: 0 on success, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import dump_json, machine_info, now_iso, positive_float, positive_int

PROG = "bench_data.py"
TARGET_RATIO = 10.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog=PROG, description="Benchmark preprocessing and the loader.")
    p.add_argument("--corpus-mb", type=positive_float, default=3.0, help="synthetic corpus size")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--samples-per-shard", type=positive_int, default=256)
    p.add_argument("--bpe-vocab", type=positive_int, default=2000, help="tiny BPE vocabulary")
    p.add_argument(
        "--consume-tokens-per-s",
        type=positive_float,
        default=20000.0,
        help="tokens/s the training loop consumes (batch x seq_len / step time)",
    )
    p.add_argument("--loader-seconds", type=positive_float, default=3.0)
    p.add_argument(
        "--loader-workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="DataLoader worker counts to measure",
    )
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p.parse_args(argv)


def make_corpus(path: Path, mb: float) -> int:
    """Write a deterministic jsonl corpus of about ``mb`` MB of pseudo-English; return its bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    freq = np.linspace(2.0, 0.1, len(letters))
    words = [
        "".join(rng.choice(letters, size=rng.integers(1, 9), p=freq / freq.sum()))
        for _ in range(3000)
    ]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    target = int(mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            idx = rng.choice(len(words), size=int(rng.integers(100, 600)), p=zipf)
            text = " ".join(words[i] for i in idx) + "."
            line = json.dumps({"text": text}) + "\n"
            fh.write(line)
            written += len(line)
    return written


def train_bpe(corpus: Path, vocab: int, out: Path) -> Path:
    """Train a byte-level BPE with ``<|endoftext|>`` on ``corpus``; save it to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Any:
        with open(corpus, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(out))
    return out


def bench_preprocess(corpus: Path, out: Path, tokenizer: str, args: argparse.Namespace) -> dict:
    """Time one single-worker preprocessing run; tokens/s per worker."""
    from ilm_megatron.data.preprocess import main

    argv = ["--input", str(corpus), "--output", str(out), "--tokenizer", tokenizer]
    argv += ["--seq-len", str(args.seq_len), "--samples-per-shard", str(args.samples_per_shard)]
    t0 = time.perf_counter()
    rc = main([*argv, "--workers", "1"])
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"preprocess failed with exit code {rc}")
    man = json.loads((out / "manifest.json").read_text())
    tps = man["tokens_total"] / dt
    return {
        "tokens": man["tokens_total"],
        "samples": man["samples"],
        "vocab_size": man["tokenizer"]["vocab_size"],
        "seconds": round(dt, 3),
        "tokens_per_s_per_worker": round(tps),
        "ratio_to_consumption": round(tps / args.consume_tokens_per_s, 2),
    }


def bench_loader(data: Path, workers: int, args: argparse.Namespace) -> dict:
    """Samples/s and tokens/s of :class:`StatefulLoader` over ``--loader-seconds``."""
    from ilm_megatron.data.loader import StatefulLoader

    loader = StatefulLoader(data, args.batch_size, num_workers=workers, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker fork, first shard index) is not counted
    n = 0
    t0 = time.perf_counter()
    while (dt := time.perf_counter() - t0) < args.loader_seconds:
        n += len(next(it)["ids"])
    del it
    sps = n / dt
    tps = sps * args.seq_len
    return {
        "num_workers": workers,
        "samples": n,
        "seconds": round(dt, 3),
        "samples_per_s": round(sps, 1),
        "tokens_per_s": round(tps),
        "ratio_to_consumption": round(tps / args.consume_tokens_per_s, 2),
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements as one JSON-serializable dict."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: a per-worker number
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        nbytes = make_corpus(corpus, args.corpus_mb)
        byte = bench_preprocess(corpus, root / "byte", "byte", args)
        t0 = time.perf_counter()
        tok = train_bpe(corpus, args.bpe_vocab, root / "tokenizer.json")
        train_s = time.perf_counter() - t0
        bpe = bench_preprocess(corpus, root / "bpe", str(tok), args)
        bpe["train_seconds"] = round(train_s, 3)
        loader = [bench_loader(root / "byte", w, args) for w in args.loader_workers]
    consume = args.consume_tokens_per_s
    best = max(x["ratio_to_consumption"] for x in loader)
    return {
        "corpus_bytes": nbytes,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "consume_tokens_per_s": consume,
        "consume_step_time_s": round(args.batch_size * args.seq_len / consume, 4),
        "preprocess_byte": byte,
        "preprocess_bpe": bpe,
        "loader": loader,
        "target_ratio": TARGET_RATIO,
        "meets_target": best >= TARGET_RATIO
        and min(byte["ratio_to_consumption"], bpe["ratio_to_consumption"]) >= TARGET_RATIO,
        "machine": machine_info(),
        "date": now_iso(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    if any(w < 0 for w in args.loader_workers):
        print(f"{PROG}: error: --loader-workers must be >= 0", file=sys.stderr)
        return 2
    res = run_bench(args)
    if args.json:
        print(dump_json(res))
        return 0
    c = res["consume_tokens_per_s"]
    print(f"consumption: {c:.0f} tokens/s (batch {args.batch_size} x seq {args.seq_len})")
    for name in ("preprocess_byte", "preprocess_bpe"):
        r = res[name]
        print(
            f"{name}: {r['tokens_per_s_per_worker']} tokens/s per worker"
            f" ({r['ratio_to_consumption']}x consumption)"
        )
    for r in res["loader"]:
        print(
            f"loader, {r['num_workers']} workers: {r['samples_per_s']} samples/s,"
            f" {r['tokens_per_s']} tokens/s ({r['ratio_to_consumption']}x consumption)"
        )
    print(f"meets {TARGET_RATIO:g}x target: {res['meets_target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
