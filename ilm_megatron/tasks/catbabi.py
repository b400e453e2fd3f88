"""CatbAbI: generated bAbI-style stories for all 20 tasks, concatenated into one token stream.

Follows Schlag et al. 2021 (Fast Weight Memory, ``catbAbI/``): every bAbI story is a sequence of
lowercase words; a statement is its words plus ``.``; a question is its words plus ``?`` plus the
answer as ONE token, and the story goes on after it. Stories are concatenated with ``<eos>``
between them into one long stream, so earlier stories act as distractors. See ``docs/catbabi.md``.

No data is downloaded: :func:`generate_story` samples events for one task with a world-state
simulator and asks only questions that the story's earlier sentences determine. The answers are
recomputed by the independent checker :mod:`ilm_megatron.tasks.catbabi_check`.

Main API:

- :data:`VOCAB` / :func:`vocab_index`: fixed sorted vocabulary (``<pad>`` = 0, ``<eos>`` = 1).
- :func:`generate_story`, :func:`generate_stories`, :func:`generate_splits`: seeded stories.
- :func:`format_story_line` / :func:`parse_story_line`: the FWM text format ``task_id<TAB>story``.
- :func:`build_stream` / :func:`iter_batches`: the StoryBatcher stream in windows of ``seq_len``.
- :func:`qa_targets`, :class:`AccuracyMeter`: QA-mode targets and answer accuracy by task and
  story length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import permutations

import torch

from ilm_megatron.data import catbabi as _data

# the format and stream live in ilm_megatron.data.catbabi; re-exported here
from ilm_megatron.data.catbabi import (  # noqa: F401
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    VOCAB_FILE,
    CatbabiBatch,
    CatbabiStream,
    Story,
    format_story_line,
    iter_batches,
    parse_story_line,
    qa_targets,
    read_stories,
)

NUM_TASKS = 20
TASK_NAMES: dict[int, str] = {
    1: "single supporting fact",
    2: "two supporting facts",
    3: "three supporting facts",
    4: "two argument relations",
    5: "three argument relations",
    6: "yes/no questions",
    7: "counting",
    8: "lists/sets",
    9: "simple negation",
    10: "indefinite knowledge",
    11: "basic coreference",
    12: "conjunction",
    13: "compound coreference",
    14: "time reasoning",
    15: "basic deduction",
    16: "basic induction",
    17: "positional reasoning",
    18: "size reasoning",
    19: "path finding",
    20: "agents' motivations",
}

# ---------------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------------

PEOPLE = ("mary", "john", "sandra", "daniel")
GENDER = {"mary": "she", "sandra": "she", "john": "he", "daniel": "he"}
ROOMS = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom")
OBJECTS = ("apple", "milk", "football")
MOVE_VERBS = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
GET_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")
CONNECTIVES = ("then", "after that", "following that", "afterwards")
NUMBERS = ("none", "one", "two", "three")
YES_NO = ("yes", "no")

TIME_PEOPLE = ("bill", "fred", "julie", "mary")
TIME_PLACES = ("school", "park", "cinema", "kitchen", "bedroom", "office")
TIMES = ("yesterday", "this morning", "this afternoon", "this evening")

DEDUCTION_NAMES = ("gertrude", "winona", "emily", "jessica")
SPECIES_PLURAL = {"mouse": "mice", "sheep": "sheep", "wolf": "wolves", "cat": "cats"}

INDUCTION_NAMES = ("lily", "bernhard", "greg", "julius", "brian")
INDUCTION_SPECIES = ("frog", "swan", "lion", "rhino")
COLORS = ("green", "white", "yellow", "gray")

SHAPES = (
    "red square",
    "blue square",
    "red sphere",
    "blue sphere",
    "pink rectangle",
    "yellow square",
    "triangle",
)
# relation word -> (axis, sign): "A above B" means A.y > B.y.
POSITIONS = {
    "above": (1, 1),
    "below": (1, -1),
    "to the left of": (0, -1),
    "to the right of": (0, 1),
}

SIZE_OBJECTS = ("chocolate", "box", "suitcase", "chest", "container")

DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
DIR_ABBREV = {"north": "n", "south": "s", "east": "e", "west": "w"}

MOTIVE_PEOPLE = ("yann", "jason", "antoine", "sumit")
MOTIVES = {
    "hungry": ("kitchen", "apple"),
    "thirsty": ("kitchen", "milk"),
    "bored": ("garden", "football"),
    "tired": ("bedroom", "pajamas"),
}

FUNCTION_WORDS = (
    "the there to and he she they is in a not no longer either or where was before how many",
    "objects carrying what who did give received of fit does bigger than fits inside you go from",
    "color afraid are why will get do",
)


def _answer_sets() -> dict[int, tuple[str, ...]]:
    """The answers each task can produce (one token each)."""
    lists = ["nothing"] + [",".join(p) for k in (1, 2, 3) for p in permutations(OBJECTS, k)]
    paths = [
        f"{DIR_ABBREV[a]},{DIR_ABBREV[b]}"
        for a in DIRECTIONS
        for b in DIRECTIONS
        if b != OPPOSITE[a]
    ]
    core = tuple(sorted(ROOMS))
    return {
        1: core,
        2: core,
        3: core,
        4: core,
        5: tuple(sorted(PEOPLE + OBJECTS)),
        6: YES_NO,
        7: NUMBERS,
        8: tuple(lists),
        9: YES_NO,
        10: ("yes", "no", "maybe"),
        11: core,
        12: core,
        13: core,
        14: tuple(sorted(TIME_PLACES)),
        15: tuple(sorted(SPECIES_PLURAL)),
        16: COLORS,
        17: YES_NO,
        18: YES_NO,
        19: tuple(sorted(paths)),
        20: tuple(sorted(set(MOTIVES) | {r for r, _ in MOTIVES.values()})),
    }


ANSWERS: dict[int, tuple[str, ...]] = _answer_sets()


def _build_vocab() -> tuple[str, ...]:
    words: set[str] = {".", "?"}
    groups: Iterable[Iterable[str]] = (
        PEOPLE, ROOMS, OBJECTS, MOVE_VERBS, GET_VERBS, DROP_VERBS, GIVE_VERBS, CONNECTIVES,
        NUMBERS, YES_NO, TIME_PEOPLE, TIME_PLACES, TIMES, DEDUCTION_NAMES, SPECIES_PLURAL,
        SPECIES_PLURAL.values(), INDUCTION_NAMES, INDUCTION_SPECIES, COLORS, SHAPES, POSITIONS,
        SIZE_OBJECTS, DIRECTIONS, MOTIVE_PEOPLE, MOTIVES, [v for m in MOTIVES.values() for v in m],
        FUNCTION_WORDS,
    )  # fmt: skip
    for group in groups:
        for phrase in group:
            words.update(phrase.split())
    for answers in ANSWERS.values():
        words.update(answers)
    return (PAD, EOS) + tuple(sorted(words))


VOCAB: tuple[str, ...] = _build_vocab()
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def vocab_index() -> dict[str, int]:
    """A copy of the word -> id map of :data:`VOCAB` (``<pad>`` = 0, ``<eos>`` = 1)."""
    return dict(_INDEX)


def encode(tokens: Sequence[str]) -> list[int]:
    """Token ids of ``tokens``; raises ``KeyError`` on a word outside :data:`VOCAB`."""
    return [_INDEX[t] for t in tokens]


# ---------------------------------------------------------------------------------------------
# Stories
# ---------------------------------------------------------------------------------------------


class _RetryError(Exception):
    """The sampled story asked no question; sample again."""


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _story_from_lines(task_id: int, lines: list[tuple[tuple[str, ...], str | None]]) -> Story:
    tokens: list[str] = []
    answers: list[int] = []
    for words, answer in lines:
        tokens.extend(words)
        if answer is None:
            tokens.append(".")
        else:
            tokens.append("?")
            answers.append(len(tokens))
            tokens.append(answer)
    return Story(task_id, tuple(tokens), tuple(answers))


class _Lines:
    """Collects the statements and questions of one story."""

    def __init__(self) -> None:
        self.lines: list[tuple[tuple[str, ...], str | None]] = []
        self.questions = 0

    def say(self, text: str) -> None:
        self.lines.append((_w(text), None))

    def ask(self, text: str, answer: str) -> None:
        self.lines.append((_w(text), answer))
        self.questions += 1


# --- core simulator (tasks 1-3, 5-8, 11-13) ---------------------------------------------------


@dataclass
class _Core:
    """People in rooms holding objects. ``None`` locations are unknown to the reader."""

    rng: random.Random
    loc: dict[str, str | None] = field(default_factory=dict)
    holder: dict[str, str | None] = field(default_factory=dict)
    floor: dict[str, str | None] = field(default_factory=dict)
    held: dict[str, list[str]] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)
    gives: list[tuple[str, str, str]] = field(default_factory=list)
    mentioned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loc = {p: None for p in PEOPLE}
        self.holder = {o: None for o in OBJECTS}
        self.floor = {o: None for o in OBJECTS}
        self.held = {p: [] for p in PEOPLE}
        self.history = {o: [] for o in OBJECTS}

    def obj_loc(self, o: str) -> str | None:
        h = self.holder[o]
        return self.loc[h] if h is not None else self.floor[o]

    def _update_history(self) -> None:
        for o in OBJECTS:
            where = self.obj_loc(o)
            if where is not None and (not self.history[o] or self.history[o][-1] != where):
                self.history[o].append(where)

    def _mention(self, *people: str) -> None:
        for p in people:
            if p not in self.mentioned:
                self.mentioned.append(p)

    def move(self, p: str, r: str) -> None:
        self.loc[p] = r
        self._mention(p)
        self._update_history()

    def get(self, p: str, o: str) -> None:
        self.holder[o] = p
        self.floor[o] = None
        self.held[p].append(o)
        self._mention(p)
        self._update_history()

    def drop(self, p: str, o: str) -> None:
        self.holder[o] = None
        self.floor[o] = self.loc[p]
        self.held[p].remove(o)
        self._mention(p)
        self._update_history()

    def give(self, p: str, o: str, q: str) -> None:
        self.holder[o] = q
        self.held[p].remove(o)
        self.held[q].append(o)
        self.gives.append((p, o, q))
        self._mention(p, q)
        self._update_history()

    # sampling -----------------------------------------------------------------------------

    def random_move(self, social: float = 0.0) -> tuple[str, str]:
        p = self.rng.choice(PEOPLE)
        others = [self.loc[q] for q in PEOPLE if q != p and self.loc[q] not in (None, self.loc[p])]
        if others and self.rng.random() < social:
            r = self.rng.choice(others)
        else:
            r = self.rng.choice([x for x in ROOMS if x != self.loc[p]])
        return p, r

    def can_get(self, p: str, o: str) -> bool:
        if self.holder[o] is not None:
            return False
        return self.floor[o] is None or self.floor[o] == self.loc[p]

    def options(self, gets: bool, drops: bool, gives: bool) -> list[tuple[str, ...]]:
        opts: list[tuple[str, ...]] = []
        for p in PEOPLE:
            for o in OBJECTS:
                if gets and self.can_get(p, o):
                    opts.append(("get", p, o))
                if self.holder[o] == p:
                    if drops:
                        opts.append(("drop", p, o))
                    if gives and self.loc[p] is not None:
                        for q in PEOPLE:
                            if q != p and self.loc[q] == self.loc[p]:
                                opts.append(("give", p, o, q))
        return opts

    def step(
        self,
        out: _Lines,
        p_move: float,
        gets: bool = True,
        drops: bool = True,
        gives: bool = False,
        social: float = 0.0,
    ) -> None:
        """Sample one valid event, apply it and render it."""
        rng = self.rng
        opts = self.options(gets, drops, gives)
        give_opts = [x for x in opts if x[0] == "give"]
        if give_opts and rng.random() < 0.6:
            event = rng.choice(give_opts)
        elif opts and rng.random() >= p_move:
            event = rng.choice(opts)
        else:
            p, r = self.random_move(social)
            self.move(p, r)
            out.say(f"{p} {rng.choice(MOVE_VERBS)} the {r}")
            return
        kind, p, o = event[0], event[1], event[2]
        there = " there" if rng.random() < 0.3 else ""
        if kind == "get":
            self.get(p, o)
            out.say(f"{p} {rng.choice(GET_VERBS)} the {o}{there}")
        elif kind == "drop":
            self.drop(p, o)
            out.say(f"{p} {rng.choice(DROP_VERBS)} the {o}{there}")
        else:
            q = event[3]
            self.give(p, o, q)
            out.say(f"{p} {rng.choice(GIVE_VERBS)} the {o} to {q}")


def _run_core(
    rng: random.Random,
    ask: Callable[[_Core, _Lines], bool],
    n_questions: int = 5,
    gap: tuple[int, int] = (1, 3),
    max_steps: int = 40,
    **step_kw: object,
) -> _Lines:
    """Alternate core-sim events with questions (``ask`` returns whether it asked one).

    The story ends after ``n_questions`` questions or ``max_steps`` events; ``max_steps`` is given
    for the default 5 questions and grows in proportion for more.
    """
    if n_questions > 5:
        max_steps = -(-max_steps * n_questions // 5)
    world = _Core(rng)
    out = _Lines()
    wait = rng.randint(*gap)
    for _ in range(max_steps):
        world.step(out, **step_kw)  # type: ignore[arg-type]
        wait -= 1
        if wait <= 0 and ask(world, out):
            wait = rng.randint(*gap)
            if out.questions >= n_questions:
                break
    if out.questions == 0:
        raise _RetryError
    return out


def _task1(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        known = [p for p in PEOPLE if w.loc[p] is not None]
        if not known:
            return False
        p = rng.choice(known)
        out.ask(f"where is {p}", w.loc[p])  # type: ignore[arg-type]
        return True

    return _run_core(rng, ask, n_questions, gap=(2, 2), p_move=1.0, gets=False, drops=False)


def _task2(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        known = [o for o in OBJECTS if w.obj_loc(o) is not None]
        if not known:
            return False
        o = rng.choice(known)
        out.ask(f"where is the {o}", w.obj_loc(o))  # type: ignore[arg-type]
        return True

    return _run_core(rng, ask, n_questions, gap=(2, 4), p_move=0.55, max_steps=60)


def _task3(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        ok = [o for o in OBJECTS if len(w.history[o]) >= 2]
        if not ok:
            return False
        o = rng.choice(ok)
        h = w.history[o]
        out.ask(f"where was the {o} before the {h[-1]}", h[-2])
        return True

    return _run_core(rng, ask, n_questions, gap=(2, 5), p_move=0.55, max_steps=80)


def _task5(rng: random.Random, n_questions: int = 5) -> _Lines:
    seen = [0]

    def ask(w: _Core, out: _Lines) -> bool:
        if len(w.gives) == seen[0]:
            return False
        seen[0] = len(w.gives)
        p, o, q = w.gives[-1]
        kind = rng.randrange(4)
        if kind == 0:
            out.ask(f"who gave the {o} to {q}", p)
        elif kind == 1:
            out.ask(f"who received the {o}", q)
        elif kind == 2:
            out.ask(f"what did {p} give to {q}", o)
        else:
            out.ask(f"who did {p} give the {o} to", q)
        return True

    return _run_core(
        rng, ask, n_questions, gap=(1, 2), p_move=0.5, gives=True, social=0.8, max_steps=80
    )


def _task6(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        known = [p for p in PEOPLE if w.loc[p] is not None]
        if not known:
            return False
        p = rng.choice(known)
        here = w.loc[p]
        if rng.random() < 0.5:
            out.ask(f"is {p} in the {here}", "yes")
        else:
            out.ask(f"is {p} in the {rng.choice([r for r in ROOMS if r != here])}", "no")
        return True

    return _run_core(rng, ask, n_questions, gap=(1, 3), p_move=0.7)


def _task7(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        if not w.mentioned:
            return False
        p = rng.choice(w.mentioned)
        out.ask(f"how many objects is {p} carrying", NUMBERS[len(w.held[p])])
        return True

    return _run_core(rng, ask, n_questions, gap=(1, 3), p_move=0.4, gives=True, social=0.5)


def _task8(rng: random.Random, n_questions: int = 5) -> _Lines:
    def ask(w: _Core, out: _Lines) -> bool:
        if not w.mentioned:
            return False
        p = rng.choice(w.mentioned)
        out.ask(f"what is {p} carrying", ",".join(w.held[p]) or "nothing")
        return True

    return _run_core(rng, ask, n_questions, gap=(1, 3), p_move=0.4, gives=True, social=0.5)


def _ask_where_person(rng: random.Random, loc: dict[str, str | None], out: _Lines) -> bool:
    known = [p for p in loc if loc[p] is not None]
    if not known:
        return False
    p = rng.choice(known)
    out.ask(f"where is {p}", loc[p])  # type: ignore[arg-type]
    return True


def _task11(rng: random.Random) -> _Lines:
    out = _Lines()
    loc: dict[str, str | None] = {p: None for p in PEOPLE}
    last: str | None = None
    wait = 2
    while out.questions < 5:
        if last is not None and rng.random() < 0.5:
            p = last
            subject = f"{rng.choice(CONNECTIVES)} {GENDER[p]}"
        else:
            p = rng.choice(PEOPLE)
            subject = p
        r = rng.choice([x for x in ROOMS if x != loc[p]])
        loc[p] = r
        last = p
        out.say(f"{subject} {rng.choice(MOVE_VERBS)} the {r}")
        wait -= 1
        if wait <= 0 and _ask_where_person(rng, loc, out):
            wait = 2
    return out


def _task12(rng: random.Random) -> _Lines:
    out = _Lines()
    loc: dict[str, str | None] = {p: None for p in PEOPLE}
    wait = 2
    while out.questions < 5:
        r = rng.choice(ROOMS)
        if rng.random() < 0.75:
            a, b = rng.sample(PEOPLE, 2)
            loc[a] = loc[b] = r
            out.say(f"{a} and {b} {rng.choice(MOVE_VERBS)} the {r}")
        else:
            a = rng.choice(PEOPLE)
            loc[a] = r
            out.say(f"{a} {rng.choice(MOVE_VERBS)} the {r}")
        wait -= 1
        if wait <= 0 and _ask_where_person(rng, loc, out):
            wait = 2
    return out


def _task13(rng: random.Random) -> _Lines:
    out = _Lines()
    loc: dict[str, str | None] = {p: None for p in PEOPLE}
    pair: tuple[str, str] | None = None
    wait = 2
    while out.questions < 5:
        r = rng.choice(ROOMS)
        if pair is not None and rng.random() < 0.5:
            a, b = pair
            out.say(f"{rng.choice(CONNECTIVES)} they {rng.choice(MOVE_VERBS)} the {r}")
        else:
            a, b = rng.sample(PEOPLE, 2)
            out.say(f"{a} and {b} {rng.choice(MOVE_VERBS)} the {r}")
        loc[a] = loc[b] = r
        pair = (a, b)
        wait -= 1
        if wait <= 0 and _ask_where_person(rng, loc, out):
            wait = 2
    return out


# --- small worlds ------------------------------------------------------------------------------


def _task4(rng: random.Random) -> _Lines:
    a, b, c = rng.sample(ROOMS, 3)
    d1 = rng.choice(list(DIRECTIONS))
    # "a is d1 of b"; "c is d2 of b" with d2 != d1 so every (place, direction) query is unique.
    d2 = rng.choice([d for d in DIRECTIONS if d != d1])
    facts = [(a, d1, b), (c, d2, b)]
    rels: set[tuple[str, str, str]] = set()
    out = _Lines()
    for x, d, y in facts:
        if rng.random() < 0.5:
            out.say(f"the {x} is {d} of the {y}")
        else:
            out.say(f"the {y} is {OPPOSITE[d]} of the {x}")
        rels.add((x, d, y))
        rels.add((y, OPPOSITE[d], x))
    rng.shuffle(out.lines)
    x, d, y = rng.choice(sorted(rels))
    if rng.random() < 0.5 and sum(1 for r in rels if r[1:] == (d, y)) == 1:
        out.ask(f"what is {d} of the {y}", x)
    else:
        assert sum(1 for r in rels if r[:2] == (x, d)) == 1
        out.ask(f"what is the {x} {d} of", y)
    return out


def _task9(rng: random.Random) -> _Lines:
    out = _Lines()
    loc: dict[str, str | None] = {p: None for p in PEOPLE}
    neg: dict[str, set[str]] = {p: set() for p in PEOPLE}
    wait = 2
    while out.questions < 5:
        p = rng.choice(PEOPLE)
        u = rng.random()
        if u < 0.5 or (loc[p] is None and u < 0.7):
            r = rng.choice([x for x in ROOMS if x != loc[p]])
            verb = rng.choice(("is in",) + MOVE_VERBS)
            out.say(f"{p} {verb} the {r}")
            loc[p] = r
            neg[p] = set()
        else:
            r = loc[p] if loc[p] is not None and rng.random() < 0.7 else rng.choice(ROOMS)
            out.say(f"{p} is {rng.choice(('not', 'no longer'))} in the {r}")
            if loc[p] == r:
                loc[p] = None
            neg[p].add(r)
        wait -= 1
        if wait > 0:
            continue
        yes = [(q, loc[q]) for q in PEOPLE if loc[q] is not None]
        no = [(q, r) for q in PEOPLE for r in ROOMS if r in neg[q] or loc[q] not in (None, r)]
        choice = yes if yes and (rng.random() < 0.5 or not no) else no
        if choice:
            q, r = rng.choice(choice)
            out.ask(f"is {q} in the {r}", "yes" if choice is yes else "no")
            wait = rng.randint(1, 2)
    return out


def _task10(rng: random.Random) -> _Lines:
    out = _Lines()
    known: dict[str, tuple[str, ...] | None] = {p: None for p in PEOPLE}
    wait = 2
    while out.questions < 5:
        p = rng.choice(PEOPLE)
        if rng.random() < 0.45:
            r1, r2 = rng.sample(ROOMS, 2)
            out.say(f"{p} is either in the {r1} or the {r2}")
            known[p] = (r1, r2)
        else:
            r = rng.choice(ROOMS)
            out.say(f"{p} {rng.choice(('is in',) + MOVE_VERBS)} the {r}")
            known[p] = (r,)
        wait -= 1
        if wait > 0:
            continue
        by_answer: dict[str, list[tuple[str, str]]] = {"yes": [], "no": [], "maybe": []}
        for q, s in known.items():
            if s is None:
                continue
            for r in ROOMS:
                ans = ("yes" if len(s) == 1 else "maybe") if r in s else "no"
                by_answer[ans].append((q, r))
        kinds = [k for k, v in by_answer.items() if v]
        if kinds:
            k = rng.choice(kinds)
            q, r = rng.choice(by_answer[k])
            out.ask(f"is {q} in the {r}", k)
            wait = rng.randint(1, 2)
    return out


def _task14(rng: random.Random) -> _Lines:
    out = _Lines()
    people = rng.sample(TIME_PEOPLE, 2)
    plan = {p: rng.sample(TIME_PLACES, len(TIMES)) for p in people}
    events = [(p, s) for p in people for s in range(len(TIMES))]
    rng.shuffle(events)
    stated: dict[str, set[int]] = {p: set() for p in people}
    for i, (p, s) in enumerate(events):
        verb = rng.choice(MOVE_VERBS)
        if rng.random() < 0.7:
            out.say(f"{TIMES[s]} {p} {verb} the {plan[p][s]}")
        else:
            out.say(f"{p} {verb} the {plan[p][s]} {TIMES[s]}")
        stated[p].add(s)
        if i < 2 or rng.random() < 0.4:
            continue
        cands = [(q, t) for q in people for t in stated[q] if t - 1 in stated[q]]
        if cands:
            q, t = rng.choice(cands)
            out.ask(f"where was {q} before the {plan[q][t]}", plan[q][t - 1])
    cands = [(q, t) for q in people for t in range(1, len(TIMES))]
    for q, t in rng.sample(cands, 2):
        out.ask(f"where was {q} before the {plan[q][t]}", plan[q][t - 1])
    return out


def _task15(rng: random.Random) -> _Lines:
    out = _Lines()
    species = list(SPECIES_PLURAL)
    fear = {s: rng.choice([t for t in species if t != s]) for s in species}
    kind = {n: rng.choice(species) for n in DEDUCTION_NAMES}
    facts = [f"{SPECIES_PLURAL[s]} are afraid of {SPECIES_PLURAL[fear[s]]}" for s in species]
    facts += [f"{n} is a {kind[n]}" for n in DEDUCTION_NAMES]
    rng.shuffle(facts)
    for f in facts:
        out.say(f)
    for n in rng.sample(DEDUCTION_NAMES, 3):
        out.ask(f"what is {n} afraid of", fear[kind[n]])
    return out


def _task16(rng: random.Random) -> _Lines:
    out = _Lines()
    color = {s: rng.choice(COLORS) for s in INDUCTION_SPECIES}
    names = list(INDUCTION_NAMES)
    rng.shuffle(names)
    query, helper, others = names[0], names[1], names[2:]
    kind = {n: rng.choice(INDUCTION_SPECIES) for n in names}
    kind[helper] = kind[query]
    lines = [[f"{n} is a {kind[n]}", f"{n} is {color[kind[n]]}"] for n in [helper] + others]
    rng.shuffle(lines)
    lines.insert(rng.randrange(len(lines) + 1), [f"{query} is a {kind[query]}"])
    for pair in lines:
        for text in pair:
            out.say(text)
    out.ask(f"what color is {query}", color[kind[query]])
    return out


def _task17(rng: random.Random) -> _Lines:
    out = _Lines()
    shapes = rng.sample(SHAPES, 3)
    unit = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    d1 = rng.choice(unit)
    d2 = rng.choice([d for d in unit if d != (-d1[0], -d1[1])])
    pos = {shapes[0]: (0, 0), shapes[1]: d1, shapes[2]: (d1[0] + d2[0], d1[1] + d2[1])}

    def rel_word(a: str, b: str) -> str:
        dx, dy = pos[a][0] - pos[b][0], pos[a][1] - pos[b][1]
        return {(1, 0): "to the right of", (-1, 0): "to the left of", (0, 1): "above"}.get(
            (dx, dy), "below"
        )

    for a, b in ((shapes[1], shapes[0]), (shapes[2], shapes[1])):
        if rng.random() < 0.5:
            a, b = b, a
        out.say(f"the {a} is {rel_word(a, b)} the {b}")
    for _ in range(4):
        a, b = rng.choice([(0, 2), (2, 0), (0, 1), (1, 2)])
        sa, sb = shapes[a], shapes[b]
        axes = [k for k in (0, 1) if pos[sa][k] != pos[sb][k]]
        axis = rng.choice(axes)
        yes = rng.random() < 0.5
        sign = 1 if pos[sa][axis] > pos[sb][axis] else -1
        if not yes:
            sign = -sign
        word = next(w for w, (ax, sg) in POSITIONS.items() if ax == axis and sg == sign)
        out.ask(f"is the {sa} {word} the {sb}", "yes" if yes else "no")
    return out


def _task18(rng: random.Random) -> _Lines:
    out = _Lines()
    order = rng.sample(SIZE_OBJECTS, len(SIZE_OBJECTS))  # smallest first
    n = len(order)
    edges = [(i, i + 1) for i in range(n - 1)]
    edges = rng.sample(edges, rng.randint(3, n - 1))
    if rng.random() < 0.5:
        i = rng.randrange(n - 2)
        edges.append((i, rng.randrange(i + 2, n)))
    rng.shuffle(edges)
    smaller: dict[int, set[int]] = {i: set() for i in range(n)}  # j in smaller[i]: j fits in i
    for i, j in edges:
        a, b = order[i], order[j]
        if rng.random() < 0.6:
            out.say(f"the {a} {rng.choice(('fits inside', 'fits in'))} the {b}")
        else:
            out.say(f"the {b} is bigger than the {a}")
        smaller[j].add(i)
    changed = True
    while changed:
        changed = False
        for j in range(n):
            new = set().union(*(smaller[i] for i in smaller[j])) - smaller[j]
            if new:
                smaller[j] |= new
                changed = True
    pairs = [(i, j) for j in range(n) for i in smaller[j]]
    far = [(i, j) for i, j in pairs if (i, j) not in edges]
    for _ in range(4):
        i, j = rng.choice(far if far and rng.random() < 0.8 else pairs)
        a, b = order[i], order[j]  # a < b
        yes = rng.random() < 0.5
        if rng.random() < 0.5:
            x, y = (a, b) if yes else (b, a)
            out.ask(f"does the {x} fit in the {y}", "yes" if yes else "no")
        else:
            x, y = (b, a) if yes else (a, b)
            out.ask(f"is the {x} bigger than the {y}", "yes" if yes else "no")
    return out


def _task19(rng: random.Random) -> _Lines:
    out = _Lines()
    places = rng.sample(ROOMS, 5)
    names = list(DIRECTIONS)
    d1 = rng.choice(names)
    d2 = rng.choice([d for d in names if d != OPPOSITE[d1]])
    pos = {places[0]: (0, 0)}
    pos[places[1]] = DIRECTIONS[d1]
    pos[places[2]] = (pos[places[1]][0] + DIRECTIONS[d2][0], pos[places[1]][1] + DIRECTIONS[d2][1])
    facts = [(places[1], d1, places[0]), (places[2], d2, places[1])]  # (x, d, y): x is d of y
    for decoy in places[3:]:
        while True:
            anchor = rng.choice(sorted(pos))
            d = rng.choice(names)
            cell = (pos[anchor][0] + DIRECTIONS[d][0], pos[anchor][1] + DIRECTIONS[d][1])
            if cell not in pos.values():
                pos[decoy] = cell
                facts.append((decoy, d, anchor))
                break
    rng.shuffle(facts)
    for x, d, y in facts:
        if rng.random() < 0.5:
            out.say(f"the {x} is {d} of the {y}")
        else:
            out.say(f"the {y} is {OPPOSITE[d]} of the {x}")
    if rng.random() < 0.5:
        out.ask(
            f"how do you go from the {places[0]} to the {places[2]}",
            f"{DIR_ABBREV[d1]},{DIR_ABBREV[d2]}",
        )
    else:
        out.ask(
            f"how do you go from the {places[2]} to the {places[0]}",
            f"{DIR_ABBREV[OPPOSITE[d2]]},{DIR_ABBREV[OPPOSITE[d1]]}",
        )
    return out


def _task20(rng: random.Random) -> _Lines:
    out = _Lines()
    people = rng.sample(MOTIVE_PEOPLE, rng.randint(2, 3))
    motive = {p: rng.choice(sorted(MOTIVES)) for p in people}
    seqs: dict[str, list[tuple[str, str | None]]] = {}
    for p in people:
        room, obj = MOTIVES[motive[p]]
        seq: list[tuple[str, str | None]] = [(f"{p} is {motive[p]}", None)]
        if rng.random() < 0.6:
            seq.append((f"where will {p} go", room))
        seq.append((f"{p} {rng.choice(MOVE_VERBS)} the {room}", None))
        if rng.random() < 0.7:
            seq.append((f"why did {p} go to the {room}", motive[p]))
        there = " there" if rng.random() < 0.5 else ""
        seq.append((f"{p} {rng.choice(GET_VERBS)} the {obj}{there}", None))
        if rng.random() < 0.7:
            seq.append((f"why did {p} get the {obj}", motive[p]))
        seqs[p] = seq
    while any(seqs.values()):
        p = rng.choice([q for q in people if seqs[q]])
        text, answer = seqs[p].pop(0)
        if answer is None:
            out.say(text)
        else:
            out.ask(text, answer)
    if out.questions == 0:
        raise _RetryError
    return out


_GENERATORS: dict[int, Callable[..., _Lines]] = {
    1: _task1,
    2: _task2,
    3: _task3,
    4: _task4,
    5: _task5,
    6: _task6,
    7: _task7,
    8: _task8,
    9: _task9,
    10: _task10,
    11: _task11,
    12: _task12,
    13: _task13,
    14: _task14,
    15: _task15,
    16: _task16,
    17: _task17,
    18: _task18,
    19: _task19,
    20: _task20,
}


# tasks whose stories are a run of the core simulator, so their length can be chosen
LENGTH_TASKS = frozenset({1, 2, 3, 5, 6, 7, 8})


def check_questions(questions: tuple[int, int] | None, tasks: Iterable[int]) -> None:
    """Raise ``ValueError`` unless ``questions`` is ``None`` or a range ``lo <= hi`` of positive
    counts and every task in ``tasks`` is one of :data:`LENGTH_TASKS`."""
    if questions is None:
        return
    lo, hi = questions
    if not 1 <= lo <= hi:
        raise ValueError(f"questions per story must be a range 1 <= lo <= hi, got {lo},{hi}")
    other = sorted(set(tasks) - LENGTH_TASKS)
    if other:
        raise ValueError(
            f"a chosen number of questions per story needs tasks in {sorted(LENGTH_TASKS)} "
            f"(stories of the core simulator); tasks {other} have a fixed form"
        )


def generate_story(
    task_id: int, rng: random.Random, questions: tuple[int, int] | None = None
) -> Story:
    """One story of task ``task_id`` (1..20) drawn with ``rng``.

    ``questions=(lo, hi)`` draws the number of questions uniformly in ``[lo, hi]`` (tasks in
    :data:`LENGTH_TASKS` only; the default is the task's own 5), and the story runs as long as it
    takes to ask them: long stories of one task, for accuracy against story length without the
    task changing with it. ``None`` draws exactly the stories it always has.
    """
    if task_id not in _GENERATORS:
        raise ValueError(f"task_id must be in 1..20, got {task_id}")
    check_questions(questions, [task_id])
    kwargs = {} if questions is None else {"n_questions": rng.randint(*questions)}
    for _ in range(100):
        try:
            out = _GENERATORS[task_id](rng, **kwargs)
        except _RetryError:
            continue
        return _story_from_lines(task_id, out.lines)
    raise RuntimeError(f"task {task_id}: no story with a question after 100 tries")


def generate_stories(
    n_per_task: int,
    seed: int,
    tasks: Sequence[int] = tuple(range(1, NUM_TASKS + 1)),
    exclude: set[str] | frozenset[str] = frozenset(),
    shuffle: bool = True,
    questions: tuple[int, int] | None = None,
) -> list[Story]:
    """``n_per_task`` stories of each task, none whose :meth:`Story.digest` is in ``exclude``.

    Deterministic for a given ``seed``; each task has its own random stream (seeded with
    ``(seed, task_id)``), so adding a task does not change the stories of the others. With
    ``shuffle`` the stories are shuffled with ``seed``, else grouped by task. ``questions``: see
    :func:`generate_story`.
    """
    check_questions(questions, tasks)
    stories: list[Story] = []
    for task in tasks:
        rng = random.Random(f"catbabi:{seed}:{task}")
        count, tries = 0, 0
        while count < n_per_task:
            tries += 1
            if tries > 50 * n_per_task + 1000:
                raise RuntimeError(f"task {task}: too many stories excluded (seed {seed})")
            story = generate_story(task, rng, questions)
            if story.digest() in exclude:
                continue
            stories.append(story)
            count += 1
    if shuffle:
        random.Random(f"catbabi-shuffle:{seed}").shuffle(stories)
    return stories


SPLITS = ("train", "valid", "test")


def split_seed(seed: int, split: str) -> int:
    """The seed of ``split`` derived from the run seed (each split has its own)."""
    return seed * 1000 + SPLITS.index(split) + 1


def generate_splits(
    n_train: int,
    n_eval: int,
    seed: int,
    tasks: Sequence[int] = tuple(range(1, NUM_TASKS + 1)),
    questions: tuple[int, int] | None = None,
) -> dict[str, list[Story]]:
    """Train/valid/test stories (per task: ``n_train``, ``n_eval``, ``n_eval``), disjoint.

    Each split has its own seed (:func:`split_seed`); a valid story equal to a train story, or a
    test story equal to a train or valid one, is rejected and drawn again. ``questions``: see
    :func:`generate_story`.
    """
    check_questions(questions, tasks)
    out: dict[str, list[Story]] = {}
    seen: set[str] = set()
    for split in SPLITS:
        n = n_train if split == "train" else n_eval
        stories = generate_stories(
            n, split_seed(seed, split), tasks, exclude=seen, questions=questions
        )
        out[split] = stories
        seen |= {s.digest() for s in stories}
    return out


# ---------------------------------------------------------------------------------------------
# Stream (StoryBatcher) and accuracy
# ---------------------------------------------------------------------------------------------


def build_stream(
    stories: Sequence[Story],
    batch_size: int,
    seq_len: int = 200,
    shuffle_seed: int | None = None,
) -> CatbabiStream:
    """:func:`ilm_megatron.data.catbabi.build_stream` with this generator's :data:`VOCAB`."""
    return _data.build_stream(stories, _INDEX, batch_size, seq_len, shuffle_seed)


DEFAULT_LENGTH_BINS = (50, 100, 200, 400)


class AccuracyMeter:
    """Answer accuracy (argmax at ``x == "?"`` vs the answer), micro, per task, per story length,
    and per task and story length together.

    Story lengths are bucketed by ``length_bins`` (upper bounds, inclusive; a last open bucket
    collects longer stories). Bucket names are ``"<=50"``, ..., ``">400"``. With several tasks,
    story length and task are confounded (each task has its own length range); the per-task
    buckets separate the two.
    """

    def __init__(self, length_bins: Sequence[int] = DEFAULT_LENGTH_BINS) -> None:
        self.bins = tuple(sorted(length_bins))
        shape = (NUM_TASKS + 1, len(self.bins) + 1)  # (task, bucket)
        self.hits = torch.zeros(shape, dtype=torch.long)
        self.answers = torch.zeros(shape, dtype=torch.long)
        self.iter_sum = torch.zeros(shape, dtype=torch.float64)  # iterations at the answers
        self.story_sum = torch.zeros(shape, dtype=torch.float64)  # story lengths at the answers
        self.has_iters = False

    def bin_names(self) -> list[str]:
        """Names of the story-length buckets."""
        return [f"<={b}" for b in self.bins] + [f">{self.bins[-1]}" if self.bins else "all"]

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        is_answer: torch.Tensor,
        task_id: torch.Tensor,
        story_len: torch.Tensor,
        iters: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``logits`` (b, l, V); the other tensors (b, l). ``iters`` (b, l): the
        solver iterations behind each position's prediction (per token in sequential mode, the
        row's in simultaneous mode), averaged per story-length bucket over the answers."""
        mask = is_answer.bool()
        hit = (logits.argmax(-1) == y)[mask].double()
        lens = story_len[mask].contiguous()
        bucket = torch.bucketize(lens, torch.tensor(self.bins, dtype=lens.dtype))
        nb = len(self.bins) + 1
        cell = task_id[mask].long().cpu() * nb + bucket.cpu()  # flat (task, bucket) index

        def count(weights: torch.Tensor | None) -> torch.Tensor:
            w = None if weights is None else weights.double().cpu()
            return torch.bincount(cell, weights=w, minlength=self.hits.numel()).view_as(self.hits)

        self.hits += count(hit).round().long()
        self.answers += count(None)
        self.story_sum += count(lens)
        if iters is not None:
            self.iter_sum += count(iters.to(mask.device)[mask])
            self.has_iters = True

    def update_batch(
        self, logits: torch.Tensor, batch: CatbabiBatch, iters: torch.Tensor | None = None
    ) -> None:
        """:meth:`update` with the fields of ``batch``."""
        self.update(logits, batch.y, batch.is_answer, batch.task_id, batch.story_len, iters)

    def _buckets(
        self, hits: torch.Tensor, answers: torch.Tensor, iters: torch.Tensor, story: torch.Tensor
    ) -> dict[str, dict[str, float]]:
        """``{bucket: {"accuracy", "iters_mean", "story_length_mean", "answers"}}`` over the
        buckets with answers (``iters_mean`` only when iterations were given)."""
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.bin_names()):
            n = float(answers[i])
            if n == 0:
                continue
            row = {"accuracy": float(hits[i]) / n, "story_length_mean": float(story[i]) / n}
            if self.has_iters:
                row["iters_mean"] = float(iters[i]) / n
            out[name] = {**row, "answers": int(n)}
        return out

    def result(self) -> dict[str, object]:
        """``{"accuracy": micro, "per_task": {task: acc}, "per_length": {bucket: acc},
        "iters_per_length": {bucket: mean iterations at its answers}, "story_length_mean":
        {bucket: mean story length of its answers}, "per_task_length": {task: {bucket:
        {"accuracy", "iters_mean", "story_length_mean", "answers"}}}, "count": n}``; tasks and
        buckets without answers are left out (``iters_per_length`` is empty and ``iters_mean``
        absent unless iterations were given)."""
        n = int(self.answers.sum())
        per_task = {
            t: float(self.hits[t].sum()) / float(self.answers[t].sum())
            for t in range(1, NUM_TASKS + 1)
            if self.answers[t].sum() > 0
        }
        sums = (self.hits, self.answers, self.iter_sum, self.story_sum)
        overall = self._buckets(*(x.sum(0) for x in sums))
        per_task_length = {
            t: self._buckets(*(x[t] for x in sums))
            for t in range(1, NUM_TASKS + 1)
            if self.answers[t].sum() > 0
        }
        return {
            "accuracy": float(self.hits.sum()) / n if n else float("nan"),
            "per_task": per_task,
            "per_length": {k: v["accuracy"] for k, v in overall.items()},
            "iters_per_length": {
                k: v["iters_mean"] for k, v in overall.items() if "iters_mean" in v
            },
            "story_length_mean": {k: v["story_length_mean"] for k, v in overall.items()},
            "per_task_length": per_task_length,
            "count": n,
        }


def vocab_json() -> dict[str, object]:
    """The content of ``vocab.json``: tokens in id order and the special ids."""
    return {"tokens": list(VOCAB), "vocab_size": len(VOCAB), "pad_id": PAD_ID, "eos_id": EOS_ID}


def load_stream(
    data_dir: str,
    split: str,
    batch_size: int,
    seq_len: int = 200,
    shuffle_seed: int | None = None,
) -> CatbabiStream:
    """:func:`ilm_megatron.data.catbabi.load_stream`, refusing a folder whose ``vocab.json`` is
    not this generator's :data:`VOCAB` (build the model with ``vocab_size=len(VOCAB)``)."""
    return _data.load_stream(data_dir, split, batch_size, seq_len, shuffle_seed, vocab=VOCAB)
