"""Independent checker of CatbAbI answers: re-reads the token stream and recomputes each answer.

Imports nothing from :mod:`ilm_megatron.tasks.catbabi`. It reads token strings only, splits them
into sentences at ``.`` and ``?`` (the token after ``?`` is the answer to check), parses every
sentence with its own per-task regular expressions and applies its own rules:

- core tasks (1-3, 5-8, 11-13): people move, pick up, drop and give objects; an object is where
  its holder is, or where it was dropped; pronouns are the previous statement's subject(s);
- 4 and 19: a direction graph (inverse relations added), a lookup / a unique BFS path;
- 9, 10: positive, negative and either-or location facts;
- 14: places ordered by time word; 15, 16: species rules; 17: 2-D coordinates; 18: a size DAG;
- 20: the motive table.

The state is reset at every ``<eos>`` unless ``reset_at_eos=False`` (used to show that earlier
stories are real distractors). A question the checker cannot answer counts as a disagreement.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

_MOVE = r"(?:went back to|went to|moved to|journeyed to|travelled to)"
_GET = r"(?:picked up|got|grabbed|took)"
_DROP = r"(?:dropped|discarded|put down|left)"
_GIVE = r"(?:gave|handed|passed)"
_CONN = r"(?:then|after that|following that|afterwards)"
_TIME = r"(yesterday|this morning|this afternoon|this evening)"
_NUMBER_WORDS = ("none", "one", "two", "three")
_TIME_ORDER = {"yesterday": 0, "this morning": 1, "this afternoon": 2, "this evening": 3}
_SINGULAR = {"mice": "mouse", "sheep": "sheep", "wolves": "wolf", "cats": "cat"}
_STEP = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
_MOTIVE_ROOM = {"hungry": "kitchen", "thirsty": "kitchen", "bored": "garden", "tired": "bedroom"}
_YES_NO = {True: "yes", False: "no"}


class UnanswerableError(Exception):
    """The question is not determined by the story so far (or a sentence did not parse)."""


def _m(pattern: str, text: str) -> re.Match[str] | None:
    return re.fullmatch(pattern, text)


@dataclass
class _State:
    """Everything any task's reader keeps; reset at ``<eos>``."""

    where: dict[str, str] = field(default_factory=dict)  # person -> room
    carrier: dict[str, str] = field(default_factory=dict)  # object -> person
    dropped_at: dict[str, str | None] = field(default_factory=dict)  # object on the floor
    carrying: dict[str, list[str]] = field(default_factory=dict)
    trail: dict[str, list[str]] = field(default_factory=dict)
    transfers: list[tuple[str, str, str]] = field(default_factory=list)
    subject: tuple[str, ...] = ()
    not_in: dict[str, set[str]] = field(default_factory=dict)
    maybe: dict[str, set[str]] = field(default_factory=dict)
    links: dict[str, dict[str, str]] = field(default_factory=dict)  # place -> {dir: neighbour}
    visits: dict[str, dict[int, str]] = field(default_factory=dict)
    fears: dict[str, str] = field(default_factory=dict)
    is_a: dict[str, str] = field(default_factory=dict)
    colour: dict[str, str] = field(default_factory=dict)
    shape_rel: list[tuple[str, str, str]] = field(default_factory=list)
    bigger: dict[str, set[str]] = field(default_factory=dict)  # x -> things that fit in x
    motive: dict[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, task: int) -> None:
        self.task = task
        self.s = _State()

    # --- core ------------------------------------------------------------------------------

    def _object_room(self, o: str) -> str | None:
        if o in self.s.carrier:
            return self.s.where.get(self.s.carrier[o])
        return self.s.dropped_at.get(o)

    def _after_event(self) -> None:
        for o in set(self.s.carrier) | set(self.s.dropped_at):
            room = self._object_room(o)
            t = self.s.trail.setdefault(o, [])
            if room is not None and (not t or t[-1] != room):
                t.append(room)

    def _people(self, subj: str) -> tuple[str, ...]:
        if subj in ("he", "she", "they"):
            if not self.s.subject:
                raise UnanswerableError(f"pronoun {subj!r} without antecedent")
            return self.s.subject
        return (subj,)

    def _core_statement(self, text: str) -> None:
        s = self.s
        if mt := _m(rf"(?:{_CONN} )?(\w+)(?: and (\w+))? {_MOVE} the (\w+)", text):
            who = self._people(mt[1]) + ((mt[2],) if mt[2] else ())
            for p in who:
                s.where[p] = mt[3]
            s.subject = who
        elif mt := _m(rf"(\w+) {_GET} the (\w+)(?: there)?", text):
            p, o = mt[1], mt[2]
            old = s.carrier.get(o)
            if old is not None:
                s.carrying[old].remove(o)
            s.carrier[o] = p
            s.dropped_at.pop(o, None)
            s.carrying.setdefault(p, []).append(o)
            s.subject = (p,)
        elif mt := _m(rf"(\w+) {_DROP} the (\w+)(?: there)?", text):
            p, o = mt[1], mt[2]
            if s.carrier.get(o) == p:
                del s.carrier[o]
                s.carrying[p].remove(o)
            s.dropped_at[o] = s.where.get(p)
            s.subject = (p,)
        elif mt := _m(rf"(\w+) {_GIVE} the (\w+) to (\w+)", text):
            p, o, q = mt[1], mt[2], mt[3]
            if s.carrier.get(o) == p:
                s.carrying[p].remove(o)
            s.carrier[o] = q
            s.carrying.setdefault(q, []).append(o)
            s.transfers.append((p, o, q))
            s.subject = (p,)
        else:
            raise UnanswerableError(f"unparsed statement {text!r}")
        self._after_event()

    def _core_question(self, text: str) -> str:
        s = self.s
        if mt := _m(r"where is the (\w+)", text):
            room = self._object_room(mt[1])
            if room is None:
                raise UnanswerableError(text)
            return room
        if mt := _m(r"where is (\w+)", text):
            if mt[1] not in s.where:
                raise UnanswerableError(text)
            return s.where[mt[1]]
        if mt := _m(r"where was the (\w+) before the (\w+)", text):
            t = s.trail.get(mt[1], [])
            idx = [i for i, r in enumerate(t) if r == mt[2] and i > 0]
            if not idx:
                raise UnanswerableError(text)
            return t[idx[-1] - 1]
        if mt := _m(r"is (\w+) in the (\w+)", text):
            if mt[1] not in s.where:
                raise UnanswerableError(text)
            return _YES_NO[s.where[mt[1]] == mt[2]]
        if mt := _m(r"how many objects is (\w+) carrying", text):
            return _NUMBER_WORDS[len(s.carrying.get(mt[1], []))]
        if mt := _m(r"what is (\w+) carrying", text):
            return ",".join(s.carrying.get(mt[1], [])) or "nothing"
        for pattern, pick in (
            (r"who gave the (\w+) to (\w+)", lambda g, a, b: g[1] == a and g[2] == b and g[0]),
            (r"who received the (\w+)", lambda g, a, b: g[1] == a and g[2]),
            (r"what did (\w+) give to (\w+)", lambda g, a, b: g[0] == a and g[2] == b and g[1]),
            (r"who did (\w+) give the (\w+) to", lambda g, a, b: g[0] == a and g[1] == b and g[2]),
        ):
            if mt := _m(pattern, text):
                a, b = mt[1], mt.groups()[1] if len(mt.groups()) > 1 else None
                for g in reversed(s.transfers):
                    found = pick(g, a, b)
                    if found:
                        return found
                raise UnanswerableError(text)
        raise UnanswerableError(f"unparsed question {text!r}")

    # --- other worlds ----------------------------------------------------------------------

    def _statement(self, text: str) -> None:
        t, s = self.task, self.s
        if t in (4, 19):
            mt = _m(r"the (\w+) is (north|south|east|west) of the (\w+)", text)
            if not mt:
                raise UnanswerableError(text)
            x, d, y = mt[1], mt[2], mt[3]
            back = {"north": "south", "south": "north", "east": "west", "west": "east"}[d]
            s.links.setdefault(y, {})[d] = x
            s.links.setdefault(x, {})[back] = y
        elif t in (9, 10):
            if mt := _m(r"(\w+) is (?:not|no longer) in the (\w+)", text):
                p, r = mt[1], mt[2]
                if s.where.get(p) == r:
                    del s.where[p]
                s.not_in.setdefault(p, set()).add(r)
                s.maybe.pop(p, None)
            elif mt := _m(r"(\w+) is either in the (\w+) or the (\w+)", text):
                s.where.pop(mt[1], None)
                s.not_in.pop(mt[1], None)
                s.maybe[mt[1]] = {mt[2], mt[3]}
            elif mt := _m(rf"(\w+) (?:is in|{_MOVE}) the (\w+)", text):
                s.where[mt[1]] = mt[2]
                s.not_in.pop(mt[1], None)
                s.maybe.pop(mt[1], None)
            else:
                raise UnanswerableError(text)
        elif t == 14:
            mt = _m(rf"(?:{_TIME} )?(\w+) {_MOVE} the (\w+)(?: {_TIME})?", text)
            if not mt or not (mt[1] or mt[4]):
                raise UnanswerableError(text)
            s.visits.setdefault(mt[2], {})[_TIME_ORDER[mt[1] or mt[4]]] = mt[3]
        elif t == 15:
            if mt := _m(r"(\w+) are afraid of (\w+)", text):
                s.fears[_SINGULAR[mt[1]]] = _SINGULAR[mt[2]]
            elif mt := _m(r"(\w+) is a (\w+)", text):
                s.is_a[mt[1]] = mt[2]
            else:
                raise UnanswerableError(text)
        elif t == 16:
            if mt := _m(r"(\w+) is a (\w+)", text):
                s.is_a[mt[1]] = mt[2]
            elif mt := _m(r"(\w+) is (\w+)", text):
                s.colour[mt[1]] = mt[2]
            else:
                raise UnanswerableError(text)
        elif t == 17:
            mt = _m(r"the (.+) is (above|below|to the left of|to the right of) the (.+)", text)
            if not mt:
                raise UnanswerableError(text)
            s.shape_rel.append((mt[1], mt[2], mt[3]))
        elif t == 18:
            if mt := _m(r"the (\w+) fits (?:inside|in) the (\w+)", text):
                small, big = mt[1], mt[2]
            elif mt := _m(r"the (\w+) is bigger than the (\w+)", text):
                big, small = mt[1], mt[2]
            else:
                raise UnanswerableError(text)
            s.bigger.setdefault(big, set()).add(small)
        elif t == 20:
            if mt := _m(r"(\w+) is (hungry|thirsty|bored|tired)", text):
                s.motive[mt[1]] = mt[2]
            elif not (
                _m(rf"(\w+) {_MOVE} the (\w+)", text)
                or _m(rf"(\w+) {_GET} the (\w+)(?: there)?", text)
            ):
                raise UnanswerableError(text)
        else:
            self._core_statement(text)

    def _question(self, text: str) -> str:
        t, s = self.task, self.s
        if t == 4:
            if mt := _m(r"what is (north|south|east|west) of the (\w+)", text):
                # x is d of y  <=>  links[y][d] == x
                x = s.links.get(mt[2], {}).get(mt[1])
            elif mt := _m(r"what is the (\w+) (north|south|east|west) of", text):
                back = {"north": "south", "south": "north", "east": "west", "west": "east"}
                x = s.links.get(mt[1], {}).get(back[mt[2]])
            else:
                x = None
            if x is None:
                raise UnanswerableError(text)
            return x
        if t == 19:
            mt = _m(r"how do you go from the (\w+) to the (\w+)", text)
            if not mt:
                raise UnanswerableError(text)
            return self._path(mt[1], mt[2])
        if t in (9, 10):
            mt = _m(r"is (\w+) in the (\w+)", text)
            if not mt:
                raise UnanswerableError(text)
            p, r = mt[1], mt[2]
            if p in s.where:
                return _YES_NO[s.where[p] == r]
            if p in s.maybe:
                return "maybe" if r in s.maybe[p] else "no"
            if r in s.not_in.get(p, set()):
                return "no"
            raise UnanswerableError(text)
        if t == 14:
            mt = _m(r"where was (\w+) before the (\w+)", text)
            if not mt:
                raise UnanswerableError(text)
            v = s.visits.get(mt[1], {})
            at = [k for k, place in v.items() if place == mt[2]]
            if len(at) != 1 or at[0] - 1 not in v:
                raise UnanswerableError(text)
            return v[at[0] - 1]
        if t == 15:
            mt = _m(r"what is (\w+) afraid of", text)
            if not mt or mt[1] not in s.is_a or s.is_a[mt[1]] not in s.fears:
                raise UnanswerableError(text)
            return s.fears[s.is_a[mt[1]]]
        if t == 16:
            mt = _m(r"what color is (\w+)", text)
            if not mt:
                raise UnanswerableError(text)
            if mt[1] in s.colour:
                return s.colour[mt[1]]
            kind = s.is_a.get(mt[1])
            seen = {s.colour[n] for n, k in s.is_a.items() if k == kind and n in s.colour}
            if len(seen) != 1:
                raise UnanswerableError(text)
            return seen.pop()
        if t == 17:
            mt = _m(r"is the (.+) (above|below|to the left of|to the right of) the (.+)", text)
            if not mt:
                raise UnanswerableError(text)
            return self._shape_answer(mt[1], mt[2], mt[3])
        if t == 18:
            if mt := _m(r"does the (\w+) fit in the (\w+)", text):
                small, big = mt[1], mt[2]
            elif mt := _m(r"is the (\w+) bigger than the (\w+)", text):
                big, small = mt[1], mt[2]
            else:
                raise UnanswerableError(text)
            if small in self._inside(big):
                return "yes"
            if big in self._inside(small):
                return "no"
            raise UnanswerableError(text)
        if t == 20:
            if mt := _m(r"where will (\w+) go", text):
                if mt[1] not in s.motive:
                    raise UnanswerableError(text)
                return _MOTIVE_ROOM[s.motive[mt[1]]]
            if mt := _m(r"why did (\w+) (?:go to|get) the (\w+)", text):
                if mt[1] not in s.motive:
                    raise UnanswerableError(text)
                return s.motive[mt[1]]
            raise UnanswerableError(text)
        return self._core_question(text)

    def _path(self, start: str, goal: str) -> str:
        """The unique shortest path as ``n,e``; unanswerable if none or several."""
        ways: dict[str, int] = {start: 1}
        dist = {start: 0}
        prev: dict[str, tuple[str, str]] = {}
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for d, v in sorted(self.s.links.get(u, {}).items()):
                if v not in dist:
                    dist[v] = dist[u] + 1
                    ways[v] = ways[u]
                    prev[v] = (u, d)
                    queue.append(v)
                elif dist[v] == dist[u] + 1:
                    ways[v] += ways[u]
        if goal not in dist or ways[goal] != 1:
            raise UnanswerableError(f"path {start} -> {goal}")
        steps: list[str] = []
        node = goal
        while node != start:
            node, d = prev[node]
            steps.append(d[0])
        return ",".join(reversed(steps))

    def _shape_answer(self, a: str, rel: str, b: str) -> str:
        coords: dict[str, tuple[int, int]] = {}
        offset = {
            "above": (0, 1),
            "below": (0, -1),
            "to the left of": (-1, 0),
            "to the right of": (1, 0),
        }
        facts = self.s.shape_rel
        if not facts:
            raise UnanswerableError(rel)
        coords[facts[0][2]] = (0, 0)
        for _ in range(len(facts) + 1):
            for x, r, y in facts:
                dx, dy = offset[r]
                if y in coords and x not in coords:
                    coords[x] = (coords[y][0] + dx, coords[y][1] + dy)
                elif x in coords and y not in coords:
                    coords[y] = (coords[x][0] - dx, coords[x][1] - dy)
        if a not in coords or b not in coords:
            raise UnanswerableError(f"{a} {rel} {b}")
        dx, dy = offset[rel]
        axis = 0 if dx else 1
        sign = dx or dy
        diff = coords[a][axis] - coords[b][axis]
        if diff == 0:
            raise UnanswerableError(f"{a} {rel} {b}: same coordinate")
        return _YES_NO[diff * sign > 0]

    def _inside(self, big: str) -> set[str]:
        """Everything that fits in ``big`` by the stated facts (transitive closure)."""
        seen: set[str] = set()
        todo = [big]
        while todo:
            for small in self.s.bigger.get(todo.pop(), set()):
                if small not in seen:
                    seen.add(small)
                    todo.append(small)
        return seen


@dataclass
class CheckReport:
    """Result of :func:`check_tokens`.

    Attributes:
        checked: number of questions.
        agreed: questions whose answer token equals the checker's answer.
        mismatches: ``(stream position of the answer, task, question text, given, expected)``;
            ``expected`` is ``None`` where the checker could not answer.
        bad_answers: questions not followed by exactly one answer token from ``answer_sets``.
        unparsed: statements no rule of the task parsed, ``(position, task, text)``.
    """

    checked: int = 0
    agreed: int = 0
    mismatches: list[tuple[int, int, str, str, str | None]] = field(default_factory=list)
    bad_answers: list[tuple[int, int, str]] = field(default_factory=list)
    unparsed: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """All answers agree and are well formed, and every statement parsed."""
        return self.checked == self.agreed and not self.bad_answers and not self.unparsed


def check_tokens(
    tokens: Sequence[str],
    task_ids: Sequence[int],
    reset_at_eos: bool = True,
    answer_sets: dict[int, Sequence[str]] | None = None,
) -> CheckReport:
    """Recompute every answer of a CatbAbI token stream (strings, ``<eos>`` between stories).

    ``task_ids[i]`` is the task of ``tokens[i]`` (the task of a story is read at its first
    sentence). ``<pad>`` tokens are skipped. With ``answer_sets`` each answer must be one of the
    listed tokens of its task.
    """
    report = CheckReport()
    reader: _Reader | None = None
    words: list[str] = []
    i = 0
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        if tok == "<pad>":
            i += 1
            continue
        if tok == "<eos>":
            if reset_at_eos:
                reader = None
            words = []
            i += 1
            continue
        task = int(task_ids[i])
        if reader is None or reader.task != task:
            old = reader
            reader = _Reader(task)
            if old is not None and not reset_at_eos:
                reader.s = old.s
        if tok == ".":
            try:
                reader._statement(" ".join(words))
            except UnanswerableError:
                report.unparsed.append((i, task, " ".join(words)))
            words = []
        elif tok == "?":
            text = " ".join(words)
            words = []
            report.checked += 1
            answer = tokens[i + 1] if i + 1 < n else ""
            ok_form = answer not in ("", ".", "?", "<eos>", "<pad>")
            if answer_sets is not None and answer not in answer_sets.get(task, ()):
                ok_form = False
            if not ok_form:
                report.bad_answers.append((i + 1, task, text))
            try:
                expected: str | None = reader._question(text)
            except UnanswerableError:
                expected = None
            if expected == answer:
                report.agreed += 1
            else:
                report.mismatches.append((i + 1, task, text, answer, expected))
            i += 2
            continue
        else:
            words.append(tok)
        i += 1
    return report


def check_story_lines(lines: Sequence[str], reset_at_eos: bool = True) -> CheckReport:
    """Check FWM-format lines (``task_id<TAB>story``) as one stream, ``<eos>`` before each."""
    tokens: list[str] = []
    tasks: list[int] = []
    for line in lines:
        if not line.strip():
            continue
        task, text = line.rstrip("\n").split("\t", 1)
        words = ["<eos>"] + text.split()
        tokens += words
        tasks += [int(task)] * len(words)
    return check_tokens(tokens, tasks, reset_at_eos=reset_at_eos)
