"""Reads kopa's Dockerfile and .dockerignore, for the tests that check the image without a container engine.

A small parser of the Dockerfile syntax the project uses: comments, `\\` line continuations, ARG before the
first FROM, `FROM image AS name`, flags such as `--from=`, and exec-form (JSON) or shell-form arguments.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Copy", "DockerIgnore", "Dockerfile", "Instruction", "Stage", "apply_copy", "copy_of"]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: dict[str, str]  # --from=x -> {"from": "x"}; a bare --link -> {"link": ""}
    value: str  # the rest, continuations joined with spaces
    line: int  # where it starts, 1-based

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT ["kopa"]), or None for shell form."""
        if not self.value.startswith("["):
            return None
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), self.value
        return [str(x) for x in parsed]


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None


@dataclass
class Stage:
    base: str  # as written, ${ARG} substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def copies(self) -> list[Copy]:
        return [copy_of(item) for item in self.instructions if item.keyword in ("COPY", "ADD")]


def copy_of(item: Instruction) -> Copy:
    """A COPY (or ADD) instruction's sources, destination and --from stage."""
    parts = item.exec_form() or item.value.split()
    return Copy(parts[:-1], parts[-1], item.flags.get("from"))


class Dockerfile:
    """The stages of a Dockerfile, in order, and the ARGs declared before the first FROM."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for item in _instructions(text):
            if item.keyword == "FROM":
                words = item.value.split()
                base = self._substitute(words[0])
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                self.stages.append(Stage(base, name))
            elif not self.stages:
                assert item.keyword == "ARG", f"line {item.line}: only ARG may come before FROM"
                key, _, default = item.value.partition("=")
                self.global_args[key.strip()] = default.strip()
            else:
                self.stages[-1].instructions.append(item)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        return cls(path.read_text(encoding="utf-8"))

    def _substitute(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)), text)

    def workdir(self, stage: Stage) -> str:
        """The working directory a stage's instructions run in (inherited from the stage it builds on)."""
        dirs = stage.of("WORKDIR")
        if dirs:
            return dirs[-1].value
        if stage.base in self.names():
            return self.workdir(self.stage(stage.base))
        return "/"

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage named {name!r}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def names(self) -> list[str | None]:
        return [stage.name for stage in self.stages]


def _instructions(text: str) -> list[Instruction]:
    items: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, rest = joined.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        items.append(Instruction(keyword.upper(), flags, rest, start))
    assert not pending, "the Dockerfile ends inside a continued line"
    return items


class DockerIgnore:
    """.dockerignore patterns with Docker's meaning: paths relative to the context, `*` within one path
    segment, `**` across any number, `!` re-includes; a directory that is excluded excludes its contents."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            self.rules.append((include, re.compile(_glob_regex(pattern))))

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        return cls(path.read_text(encoding="utf-8") if path.exists() else "")

    def excluded(self, relative: str) -> bool:
        """Whether a path (relative to the context, `/`-separated) is left out of the build context."""
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for include, regex in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not include
        return result


def _glob_regex(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
        i += 1
    return "".join(out)


def apply_copy(repo: Path, copy: Copy, destination: Path, ignore: DockerIgnore) -> None:
    """Does what a COPY from the build context does, into `destination` (the local directory, or file,
    that stands for the COPY's destination): a directory source copies its contents, a file source goes
    into the destination directory (or becomes the destination file); what .dockerignore leaves out of the
    context is not there to copy."""
    into_directory = copy.dest.endswith(("/", ".")) or len(copy.sources) > 1
    for source in copy.sources:
        origin = (repo / source).resolve()
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(repo.resolve()).as_posix()
                if path.is_file() and not ignore.excluded(relative):
                    target = destination / path.relative_to(origin)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        else:
            assert not ignore.excluded(source), f"{source} is excluded by .dockerignore"
            target = destination / origin.name if into_directory else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
