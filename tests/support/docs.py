"""The repository's documentation as the docs tests read it: fenced blocks, the commands in them, inline code.

The conventions the docs follow (and these readers rely on):

- a fenced ```sh block holds commands, one per line (a trailing backslash continues a line, `#` starts
  a comment); a block whose first line is a comment `# needs: ...` runs only where that is at hand
  (root on a board, systemd, another host, the network);
- in a ```text block, a line starting with `$ ` is a command typed at a prompt, the lines after it
  its output;
- inline code that starts with a command name (`edgectl push --wait`) is a command as well.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL = ("sh", "bash", "shell", "console")
NEEDS = "# needs:"
OPERATORS = {";", "&&", "||", "|", "&"}

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
_INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # a span may wrap, never across a blank line


@dataclass(frozen=True)
class Block:
    """One fenced block: its document, first line number, language and text (indentation removed)."""

    doc: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> str | None:
        """What the block needs to run (its `# needs:` line), or None."""
        first = self.text.lstrip("\n").split("\n", 1)[0].strip()
        return first[len(NEEDS):].strip() if first.startswith(NEEDS) else None

    def commands(self) -> list[Command]:
        """The commands of a shell block, or the `$ ` lines of a text block."""
        if self.lang in SHELL:
            logical = re.sub(r"\\\n\s*", " ", self.text)
            return [cmd for line in logical.splitlines() for cmd in split_line(line, self.where)]
        if self.lang == "text":
            return [cmd for line in self.text.splitlines() if line.lstrip().startswith("$ ")
                    for cmd in split_line(line.lstrip()[2:], self.where)]
        return []


@dataclass(frozen=True)
class Command:
    """One simple command: where the docs show it, its words (quotes removed) and its text."""

    where: str
    argv: tuple[str, ...]
    text: str

    @property
    def program(self) -> str:
        """The command's program by name (`/opt/edge-agent/venv/bin/edge-agent` is `edge-agent`)."""
        return Path(self.argv[0]).name if self.argv else ""

    def runs(self, name: str) -> bool:
        """Whether this command runs the program `name`."""
        return bool(self.argv) and is_program(self.argv[0], name)

    @property
    def args(self) -> tuple[str, ...]:
        return self.argv[1:]


def _unquote(word: str) -> str:
    return word[1:-1] if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"" else word


def split_line(line: str, where: str) -> list[Command]:
    """The simple commands of one shell line: comments dropped, split at `|`, `&&`, `;`; `sudo` and
    variable assignments in front of a program skipped."""
    lexer = shlex.shlex(line, posix=False, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    try:
        for word in lexer:
            if word.startswith("#"):
                break
            words.append(word)
    except ValueError:  # an unbalanced quote: prose, not a command line
        return []
    commands, current = [], []
    for word in [*words, ";"]:
        if word in OPERATORS:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(_unquote(word))
    found = []
    for argv in commands:
        while argv and (re.match(r"^[A-Za-z_]\w*=", argv[0]) or argv[0] == "sudo"):
            argv = argv[3:] if argv[:2] == ["sudo", "-u"] else argv[1:]
        if argv:
            found.append(Command(where, tuple(argv), " ".join(argv)))
    return found


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of a document, in order."""
    text = doc.read_text()
    found = []
    for m in _FENCE.finditer(text):
        indent = len(m["indent"])
        body = "\n".join(line[indent:] for line in m["body"].split("\n"))
        found.append(Block(doc, text.count("\n", 0, m.start()) + 1, m["lang"], body))
    return found


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def prose(doc: Path) -> str:
    """A document without its fenced blocks (each replaced by as many newlines, so lines still count)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), doc.read_text())


def inline_code(doc: Path) -> list[tuple[str, str]]:
    """Every inline code span outside fenced blocks, with where it is (`docs/x.md:12`)."""
    text = prose(doc)
    return [(f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", " ".join(m.group(1).split()))
            for m in _INLINE.finditer(text)]


def is_program(word: str, name: str) -> bool:
    """`edge-agent` or a path to it in a bin directory (`/opt/edge-agent/venv/bin/edge-agent`), not
    a directory of the same name (`/etc/edge-agent`); a name with a folder (`systemd/install.sh`)
    wherever that folder is (`/tmp/edgefleet/systemd/install.sh`)."""
    if "/" in name:
        return word == name or word.endswith(f"/{name}")
    return word == name or word.endswith(f"/bin/{name}")


def _alternatives(argv: list[str]) -> list[tuple[str, ...]]:
    """`edge-agent run, install, status` and `edgectl package|convert --x` name several commands."""
    if len(argv) > 2 and all(w.endswith(",") for w in argv[1:-1]):
        return [(argv[0], w.rstrip(",")) for w in argv[1:]]
    if len(argv) > 1 and re.fullmatch(r"[a-z-]+(?:[|/][a-z-]+)+", argv[1]):
        return [(argv[0], alt, *argv[2:]) for alt in re.split("[|/]", argv[1])]
    return [tuple(argv)]


def inline_commands(programs: tuple[str, ...]) -> list[Command]:
    """Inline code spans that are commands of one of `programs`, placeholders included
    (`edgectl inventory remove GROUP [DEVICE...] --key KEY`, `edge-agent install/rollback/status`)."""
    found = []
    for doc in DOCS:
        for where, span in inline_code(doc):
            words = span.split()
            if words[:1] == ["sudo"]:
                words = words[1:]
            if not words or not any(is_program(words[0], name) for name in programs):
                continue
            if any(w.endswith(":") for w in words[:3]):  # what a command prints (`edgectl push: needs ...`)
                continue
            words = " ".join(words).replace("[", " ").replace("]", " ").split()
            found += [Command(where, argv, span) for argv in _alternatives(words)]
    return found
