"""CatbAbI on disk and as a training stream: the story format, ``vocab.json`` and the
StoryBatcher stream of Schlag et al. 2021 (Fast Weight Memory), cut into ``seq_len`` windows.

This module reads what ``tools/make_catbabi.py`` wrote; it knows nothing of how stories are
generated (:mod:`ilm_megatron.tasks.catbabi`, the 20 task rules). The vocabulary is the folder's
``vocab.json``, so a trainer streams a CatbAbI folder without importing the generator.

- :class:`Story`, :func:`format_story_line` / :func:`parse_story_line` / :func:`read_stories`:
  the FWM text format ``task_id<TAB>story``.
- :func:`read_vocab`: the token list of a folder's ``vocab.json``.
- :func:`build_stream` / :func:`iter_batches` / :func:`load_stream`: stories laid out on ``B``
  rows and walked in consecutive ``(B, seq_len)`` windows.
- :func:`qa_targets`: QA-mode targets (the answer after each ``?`` only).
- :class:`CatbabiData`: the trainer's data source for ``data.task=catbabi``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ilm_megatron.config import Config

PAD = "<pad>"
EOS = "<eos>"
PAD_ID = 0
EOS_ID = 1
VOCAB_FILE = "vocab.json"
IGNORE = -100  # targets the loss skips (F.cross_entropy's default ignore_index)


@dataclass(frozen=True)
class Story:
    """One bAbI story as CatbAbI tokens.

    Attributes:
        task_id: 1..20.
        tokens: the words, ``.``/``?`` and inline answers (no ``<eos>``).
        answer_positions: index in ``tokens`` of every answer (the token after each ``?``).
    """

    task_id: int
    tokens: tuple[str, ...]
    answer_positions: tuple[int, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer tokens in story order."""
        return tuple(self.tokens[i] for i in self.answer_positions)

    def digest(self) -> str:
        """A stable hash of task id and tokens, used to keep splits disjoint."""
        text = f"{self.task_id}\t{' '.join(self.tokens)}"
        return hashlib.sha1(text.encode()).hexdigest()


def format_story_line(story: Story) -> str:
    """The FWM file line of ``story``: ``task_id<TAB>tokens joined by spaces``."""
    return f"{story.task_id}\t{' '.join(story.tokens)}"


def parse_story_line(line: str) -> Story:
    """Inverse of :func:`format_story_line` (answers are the tokens after each ``?``)."""
    task, text = line.rstrip("\n").split("\t", 1)
    tokens = tuple(text.split())
    answers = tuple(i + 1 for i, t in enumerate(tokens) if t == "?")
    return Story(int(task), tokens, answers)


def read_stories(path: str) -> list[Story]:
    """The stories of an FWM-format file written by ``tools/make_catbabi.py``."""
    with open(path, encoding="utf-8") as fh:
        return [parse_story_line(line) for line in fh if line.strip()]


def read_vocab(data_dir: str) -> tuple[str, ...]:
    """The tokens of ``DIR/vocab.json`` in id order; ``<pad>`` must be id 0 and ``<eos>`` id 1."""
    path = os.path.join(data_dir, VOCAB_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            tokens = tuple(json.load(fh)["tokens"])
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: is {data_dir} a make_catbabi.py folder?"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a CatbAbI vocabulary (a 'tokens' list): {err}") from err
    if tokens[:2] != (PAD, EOS) or "?" not in tokens:
        raise ValueError(f"{path}: tokens must start with {PAD!r}, {EOS!r} and contain '?'")
    return tokens


# ---------------------------------------------------------------------------------------------
# Stream (StoryBatcher)
# ---------------------------------------------------------------------------------------------


@dataclass
class CatbabiStream:
    """Stories laid out on ``B`` rows, as in the FWM ``StoryBatcher``.

    Each story contributes ``x = [<eos>] + tokens`` and ``y = tokens + [<eos>]``; the rows are
    padded with ``<pad>`` (id 0) to a multiple of ``seq_len``. All tensors are ``(B, T)``.

    Attributes:
        x: input token ids (int64).
        y: next-token targets (int64, ``<pad>`` on padding).
        is_answer: True where ``x`` is ``?`` (the target there is the answer).
        task_id: task of the story at each position (0 on padding).
        story_len: token count of the story at each position, ``len(tokens) + 1`` (0 on padding).
        story_pos: index of the position inside its story, ``<eos>`` being 0 (-1 on padding).
        seq_len: the window length used by :func:`iter_batches`.
    """

    x: torch.Tensor
    y: torch.Tensor
    is_answer: torch.Tensor
    task_id: torch.Tensor
    story_len: torch.Tensor
    story_pos: torch.Tensor
    seq_len: int

    @property
    def num_windows(self) -> int:
        """Number of ``seq_len`` windows per row."""
        return self.x.shape[1] // self.seq_len


@dataclass
class CatbabiBatch:
    """One ``(B, seq_len)`` window of a :class:`CatbabiStream` (same fields)."""

    x: torch.Tensor
    y: torch.Tensor
    is_answer: torch.Tensor
    task_id: torch.Tensor
    story_len: torch.Tensor
    story_pos: torch.Tensor


def build_stream(
    stories: Sequence[Story],
    index: Mapping[str, int],
    batch_size: int,
    seq_len: int = 200,
    shuffle_seed: int | None = None,
) -> CatbabiStream:
    """Concatenate ``stories`` onto ``batch_size`` rows (each next story onto the shortest row).

    ``index`` maps tokens to ids (``<pad>`` 0, ``<eos>`` 1). With ``shuffle_seed`` the stories
    are taken in a seeded random order (training), else in the given order (valid/test; use
    ``batch_size=1`` for the FWM test stream).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be positive")
    order = list(range(len(stories)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    rows: list[dict[str, list[int]]] = [
        {"x": [], "y": [], "t": [], "n": [], "p": []} for _ in range(batch_size)
    ]
    for k in order:
        story = stories[k]
        ids = [index[t] for t in story.tokens]
        row = min(rows, key=lambda r: len(r["x"]))
        n = len(ids) + 1
        row["x"] += [EOS_ID] + ids
        row["y"] += ids + [EOS_ID]
        row["t"] += [story.task_id] * n
        row["n"] += [n] * n
        row["p"] += list(range(n))
    longest = max(len(r["x"]) for r in rows)
    total = max(1, -(-longest // seq_len)) * seq_len
    fill = {"x": PAD_ID, "y": PAD_ID, "t": 0, "n": 0, "p": -1}
    for r in rows:
        pad = total - len(r["x"])
        for key, val in fill.items():
            r[key] += [val] * pad

    def stack(key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.long)

    x = stack("x")
    return CatbabiStream(
        x=x,
        y=stack("y"),
        is_answer=x == index["?"],
        task_id=stack("t"),
        story_len=stack("n"),
        story_pos=stack("p"),
        seq_len=seq_len,
    )


def iter_batches(stream: CatbabiStream) -> Iterator[CatbabiBatch]:
    """The consecutive ``(B, seq_len)`` windows of ``stream`` (carry the model state across)."""
    L = stream.seq_len
    for w in range(stream.num_windows):
        s = slice(w * L, (w + 1) * L)
        yield CatbabiBatch(
            x=stream.x[:, s],
            y=stream.y[:, s],
            is_answer=stream.is_answer[:, s],
            task_id=stream.task_id[:, s],
            story_len=stream.story_len[:, s],
            story_pos=stream.story_pos[:, s],
        )


def qa_targets(y: torch.Tensor, is_answer: torch.Tensor) -> torch.Tensor:
    """QA-mode targets: ``y`` where ``is_answer`` else ``<pad>`` (ignore_index=0 in the loss)."""
    return torch.where(is_answer, y, torch.full_like(y, PAD_ID))


def load_stream(
    data_dir: str,
    split: str,
    batch_size: int,
    seq_len: int = 200,
    shuffle_seed: int | None = None,
    vocab: Sequence[str] | None = None,
) -> CatbabiStream:
    """The :class:`CatbabiStream` of ``DIR/{split}.txt`` written by ``tools/make_catbabi.py``.

    Tokens are encoded with the folder's ``vocab.json``; with ``vocab`` given, the file must list
    exactly those tokens. FWM settings: train ``batch_size=32`` with a ``shuffle_seed``, valid
    128, test 1 (file order). A word outside the vocabulary is refused with the file named.
    """
    tokens = read_vocab(data_dir)
    if vocab is not None and tuple(vocab) != tokens:
        raise ValueError(f"{data_dir}/{VOCAB_FILE} does not match this generator's vocabulary")
    path = os.path.join(data_dir, f"{split}.txt")
    stories = read_stories(path)
    try:
        index = {w: i for i, w in enumerate(tokens)}
        return build_stream(stories, index, batch_size, seq_len, shuffle_seed)
    except KeyError as err:
        raise ValueError(f"{path}: token {err.args[0]!r} is not in {VOCAB_FILE}") from None


# ---------------------------------------------------------------------------------------------
# The trainer's data source
# ---------------------------------------------------------------------------------------------


class CatbabiData:
    """CatbAbI windows (``tools/make_catbabi.py`` output in ``data.path``) as next-token pairs.

    ``(x, y)`` each (b / world, seq_len); in QA mode (``data.catbabi_mode=qa``) only the answer
    after each ``?`` is a target, in LM mode every non-pad token; other targets are ``-100``.
    Epoch ``e`` is the train split streamed with shuffle seed ``seed + e``; the state is
    ``(epoch, windows consumed)`` and resume re-builds the epoch's stream and skips to it.
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1) -> None:
        d = cfg.data
        if not d.path:
            raise ValueError("data.task=catbabi needs data.path (a folder from make_catbabi.py)")
        n_vocab = len(read_vocab(d.path))
        if cfg.model.vocab_size < n_vocab:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the CatbAbI vocabulary "
                f"({n_vocab} tokens in {os.path.join(d.path, VOCAB_FILE)})"
            )
        if cfg.train.batch_size % world_size:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"data-parallel size {world_size}"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.epoch, self.window = 0, 0
        self._it: Iterator[CatbabiBatch] | None = None
        self.describe = f"CatbAbI {d.path} ({d.catbabi_mode} mode, windows of {d.seq_len})"

    def _windows(self) -> Iterator[CatbabiBatch]:
        d = self.cfg.data
        stream = load_stream(
            d.path, "train", self.cfg.train.batch_size, d.seq_len, self.cfg.train.seed + self.epoch
        )
        return iter_batches(stream)

    def _targets(
        self, batch: CatbabiBatch, this_rank: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = batch.y if self.cfg.data.catbabi_mode == "lm" else qa_targets(batch.y, batch.is_answer)
        y = torch.where(y == PAD_ID, torch.full_like(y, IGNORE), y)
        if not this_rank:
            return batch.x, y
        per = batch.x.shape[0] // self.world_size
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return batch.x[sl], y[sl]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)``, each (b / world, seq_len) int64."""
        if self._it is None:
            self._it = self._windows()
            for _ in range(self.window):
                next(self._it)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.window = self.epoch + 1, 0
            self._it = self._windows()
            batch = next(self._it)
        self.window += 1
        return self._targets(batch)

    @property
    def starts_stream(self) -> bool:
        """Whether the window :meth:`next_batch` returned last is the first of its epoch's
        stream: every row then holds other stories, so state carried across windows
        (``data.carry_state``) starts empty."""
        return self.window == 1

    def val_batches(self, batch_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` windows of the valid split (file order), with this mode's targets;
        consecutive windows of the same rows (state can be carried across them)."""
        stream = load_stream(self.cfg.data.path, "valid", batch_size, self.cfg.data.seq_len)
        out = []
        for i, batch in enumerate(iter_batches(stream)):
            if i >= n:
                break
            out.append(self._targets(batch, this_rank=False))  # every rank validates it all
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.window = int(state["epoch"]), int(state["window"])
        self._it = None
