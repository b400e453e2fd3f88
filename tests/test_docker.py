"""What can be checked of docker/Dockerfile without docker: pip requirements quoted and pinned
(an unquoted ``pkg>=1.4`` is a shell redirection), and every path it copies exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def pip_requirements(run: str) -> list[str]:
    """The raw (unparsed, quotes kept) requirement words of every ``pip install`` in a RUN."""
    reqs = []
    for cmd in re.split(r"&&|;|\|", run):
        words = cmd.split()
        if words[:2] != ["pip", "install"]:
            continue
        skip = False
        for w in words[2:]:
            if skip:
                skip = False
            elif w in ("-e", "-r", "-c", "--constraint"):
                skip = w != "-e"
                if w == "-e":
                    continue
            elif not w.startswith("-"):
                reqs.append(w)
    return reqs


def test_pip_requirements_are_quoted_and_pinned() -> None:
    runs = [a for i, a in instructions() if i == "RUN"]
    reqs = [r for run in runs for r in pip_requirements(run)]
    assert reqs, "no pip install found"
    for raw in reqs:
        (word,) = shlex.split(raw)
        if word.startswith(".") or word.startswith("/"):
            assert raw[0] == '"' or not re.search(r"[<>\[\]]", word), raw  # the local package
            continue
        assert raw[0] in "\"'", f"{raw}: quote it (the shell reads > and < as redirections)"
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][A-Za-z0-9.+]*", word), (
            f"{word}: pin an exact version (==)"
        )


def test_copied_paths_exist_and_tests_are_in_the_image() -> None:
    copies = [a.split() for i, a in instructions() if i == "COPY"]
    sources = [s for c in copies for s in c[:-1] if not s.startswith("--")]
    for s in sources:
        assert (ROOT / s).exists(), f"COPY {s}: no such path in the repository"
    assert {"tests", "docs", "tools", "pyproject.toml"} <= set(sources)
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert '-e ".[dev]"' in runs  # pytest is in the dev extra: gpu_check.sh runs tests
