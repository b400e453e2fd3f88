"""Training data sources behind one small interface (batches plus resumable state).

* ``word_problem`` — synthetic state-tracking batches, targets aligned with inputs (no shift);
  the state is the generator's RNG state.
* ``shards`` — pretraining text from WebDataset shards (``tools/preprocess_data.py``) through the
  :class:`~ilm_megatron.data.loader.StatefulLoader`: inputs ``tokens[:, :-1]``, next-token
  targets ``tokens[:, 1:]``; the state is the loader's exact position on every rank.
* ``catbabi`` — CatbAbI windows (:class:`~ilm_megatron.data.catbabi.CatbabiData`); the state is
  ``(epoch, windows consumed)``.

Targets the loss skips are :data:`IGNORE` (-100).
"""

from __future__ import annotations

from typing import Any

import torch

from ilm_megatron.config import Config
from ilm_megatron.data.catbabi import IGNORE, CatbabiData
from ilm_megatron.data.word_problem import sample_word_problem


class WordProblemData:
    """Word-problem batches (b, seq_len) drawn from a seeded generator."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        d = cfg.data
        if cfg.train.batch_size % world_size:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"data-parallel size {world_size}"
            )
        self.describe = f"{d.group} word problem at length {d.seq_len}"

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch: ``(x, y)`` each (b / world, seq_len)."""
        d = self.cfg.data
        x, y = sample_word_problem(
            d.group, self.cfg.train.batch_size, d.seq_len, self.gen, d.easy_frac
        )
        per = x.shape[0] // self.world_size
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return x[sl], y[sl]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["rng"])


class ShardData:
    """Packed token shards: ``(x, y) = (tokens[:, :-1], tokens[:, 1:])``, each (b / world, l)."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1) -> None:
        from ilm_megatron.data.loader import DataError, StatefulLoader, check_manifest

        d = cfg.data
        if not d.path:
            raise ValueError("data.task=shards needs data.path (a folder from preprocess_data)")
        if cfg.train.batch_size % world_size:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"data-parallel size {world_size}"
            )
        m = check_manifest(
            d.path,
            cfg.model.vocab_size,
            tokenizer_fingerprint=d.tokenizer_fingerprint or None,
            seq_len=d.seq_len,
        )
        if m.samples == 0:
            raise DataError(
                f"data.path={d.path}: the dataset holds no samples ({m.path} lists none):"
                " preprocess non-empty inputs into it"
            )
        self.vocab_size = cfg.model.vocab_size
        self.loader = StatefulLoader(
            d.path,
            batch_size=cfg.train.batch_size // world_size,
            rank=rank,
            world_size=world_size,
            num_workers=d.num_workers,
            seed=cfg.train.seed,
            split="train",
            val_fraction=d.val_fraction,
        )
        self._it = None
        self.describe = f"shards {d.path} (seq_len {d.seq_len})"

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self._check_token_ids(batch)
        tokens = batch["tokens"]
        return tokens[:, :-1], tokens[:, 1:]

    def _check_token_ids(self, batch: dict[str, torch.Tensor]) -> None:
        """Every token id must be below ``model.vocab_size`` (the embedding would fail on it):
        one max over the batch; on a bad id, :class:`DataError` naming the shard, sample and id."""
        from ilm_megatron.data.loader import DataError

        tokens, vocab = batch["tokens"], self.vocab_size
        if tokens.numel() == 0 or int(tokens.max()) < vocab:
            return
        row = int((tokens >= vocab).any(dim=1).nonzero()[0, 0])
        sample, source = int(batch["ids"][row]), int(batch["source"][row])
        shard = self.loader.manifests[source].shard_path(sample)
        raise DataError(
            f"{shard}: sample {sample} holds token id {int(tokens[row].max())} >= "
            f"model.vocab_size={vocab} (a corrupt shard, or one written with another tokenizer)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._it = None

    def val_batches(self, batch_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` validation batches (a fixed set), or [] without a validation split."""
        from ilm_megatron.data.loader import StatefulLoader

        d = self.loader._kw  # same data spec and seed
        if not self.loader._kw.get("val_fraction"):
            return []
        val = StatefulLoader(
            d["data"], batch_size=batch_size, seed=d["seed"], split="val",
            val_fraction=d["val_fraction"], shuffle=False,
        )  # fmt: skip
        out = []
        for i, b in enumerate(val):
            if i >= n:
                break
            self._check_token_ids(b)
            out.append((b["tokens"][:, :-1], b["tokens"][:, 1:]))
        return out


GLOBAL_STREAM_TASKS = ("word_problem", "catbabi")


def global_stream(task: str) -> bool:
    """True when every data-parallel rank slices the same global batch stream (word problem,
    CatbAbI): the saved position is valid at any data-parallel size. The shard loader gives each
    rank its own block of every epoch instead (``docs/training.md`` says why that cannot be
    re-split)."""
    return task in GLOBAL_STREAM_TASKS


def build_train_data(cfg: Config, rank: int = 0, world_size: int = 1):
    """The data source named by ``data.task``."""
    if cfg.data.task == "word_problem":
        return WordProblemData(cfg, rank, world_size)
    if cfg.data.task == "catbabi":
        return CatbabiData(cfg, rank, world_size)
    return ShardData(cfg, rank, world_size)


__all__ = [
    "IGNORE",
    "CatbabiData",
    "ShardData",
    "WordProblemData",
    "build_train_data",
    "global_stream",
]
