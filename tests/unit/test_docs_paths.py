"""What README.md and docs/ point at exists, in this repository: links and their anchors, file paths,
module names, and the module map of docs/architecture.md, which names every module of the package."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.support.docs import DOCS, ROOT, all_blocks, inline_code, prose

CODE = ("agent", "converter", "edgefleet")
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
WILD = set("+#{}%$<>")  # MQTT topic filters and placeholders, not files
KEY_FILES = {"edgefleet.key", "edgefleet.pub"}  # what `edgectl keygen` writes, not modules


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = prose(doc)
    found: set[str] = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return found


def test_slugs_follow_github() -> None:
    assert slug("6.1 Order of checks for a deployment document") == "61-order-of-checks-for-a-deployment-document"
    assert slug("`edge-agent status`") == "edge-agent-status"
    assert slug("The validation child's sandbox") == "the-validation-childs-sandbox"


def test_links_resolve_inside_the_repository() -> None:
    bad = []
    for doc in DOCS:
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose(doc)):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):
                continue
            file, _, anchor = link.partition("#")
            target = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}: ({link})"
            if not target.is_relative_to(ROOT):
                bad.append(f"{where} points outside the repository")
            elif not target.exists():
                bad.append(f"{where} does not exist")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                bad.append(f"{where}: {target.name} has no heading #{anchor}")
    assert not bad, "\n".join(bad)


def named_paths() -> list[tuple[str, str]]:
    """Repository paths anywhere in the docs, code or prose (`agent/lifecycle/machine.py`, `deploy/`,
    `tests/e2e/x.py::test_y`)."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for word in re.findall(r"(?<![\w./~$-])[\w][\w./*:+#{}%$<>-]*", line):
                path = word.rstrip(".:,")
                first = path.split("/")[0]
                if "/" in path and first in TOP and not WILD & set(path) and ("." in path.split("/")[-1]
                                                                            or path.endswith("/")):
                    found.append((f"{doc.relative_to(ROOT)}:{number}", path))
    return found


def test_paths_named_in_the_docs_exist() -> None:
    names = named_paths()
    assert len(names) > 40
    bad = []
    for where, name in names:
        path, _, test = name.partition("::")
        if "*" in path:
            if not list(ROOT.glob(path)):
                bad.append(f"{where}: {name} matches nothing")
        elif not (ROOT / path).exists():
            bad.append(f"{where}: {name} does not exist")
        elif test and not re.search(rf"^(async )?def {re.escape(test.split('[')[0])}\(", (ROOT / path).read_text(), re.M):
            bad.append(f"{where}: {path} has no test {test}")
    assert not bad, "\n".join(bad)


def test_file_names_named_in_the_docs_exist() -> None:
    """A bare module or document name (`link.py`, `operations.md`) is a file of this repository."""
    files = {p.name for folder in (*CODE, "tests", "bench", "demo", "docs") for p in (ROOT / folder).rglob("*")}
    files |= {p.name for p in ROOT.iterdir()}
    bad = [f"{where}: {word}" for doc in DOCS for where, span in inline_code(doc)
           for word in re.findall(r"(?<![\w/.-])[\w-]+\.(?:py|md)\b", span) if word not in files]
    assert not bad, "\n".join(bad)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def test_module_names_named_in_the_docs_exist() -> None:
    """`edgefleet.runtime.warm_up`, logger names in transcripts: an importable module, then a name in it."""
    texts = [(f"{doc.relative_to(ROOT)}", doc.read_text()) for doc in DOCS]
    bad = []
    for where, text in texts:
        for dotted in set(re.findall(r"(?<![\w.])edgefleet(?:\.\w+)+(?![\w/])", text)) - KEY_FILES:
            parts = dotted.split(".")
            module = next(".".join(parts[:n]) for n in range(len(parts), 0, -1) if is_module(".".join(parts[:n])))
            rest = parts[len(module.split(".")):]
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin
            if rest and not re.search(rf"^\s*(def|class) {rest[0]}\b|^\s*{rest[0]}\s*[:=]", Path(spec.origin).read_text(), re.M):
                bad.append(f"{where}: {dotted} ({module} has no {rest[0]})")
    assert not bad, "\n".join(bad)


def test_members_named_in_the_docs_exist() -> None:
    """`Lifecycle.precheck`, `FleetLink._on_deployment`: a class of the package with that member."""
    sources = [p.read_text() for folder in CODE for p in (ROOT / folder).rglob("*.py")]
    named = [(where, cls, member) for doc in DOCS for where, span in inline_code(doc)
             for cls, member in re.findall(r"^([A-Z][a-z]\w*)\.([a-z_]\w*)$", span)]
    assert len(named) > 5
    bad = []
    for where, cls, member in named:
        bodies = [src[m.end():] for src in sources for m in re.finditer(rf"^class {cls}\b.*$", src, re.M)]
        # the class's body: up to the next line that starts at column 0 with a definition
        bodies = [re.split(r"^(?:class|def|@)\S*", body, maxsplit=1, flags=re.M)[0] for body in bodies]
        if not any(re.search(rf"^\s+(?:def {member}\(|{member}\s*[:=])", body, re.M) for body in bodies):
            bad.append(f"{where}: {cls}.{member}")
    assert not bad, "\n".join(bad)


def test_the_module_map_names_every_module() -> None:
    """docs/architecture.md's module map keeps up with the code: each module file by its path."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for folder in CODE for p in sorted((ROOT / folder).rglob("*.py"))
               if p.name != "__init__.py"]
    assert len(modules) > 60
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, "docs/architecture.md does not name:\n" + "\n".join(missing)


def test_the_layer_picture_shows_every_folder() -> None:
    """The picture that opens docs/architecture.md has a line for every package folder of each layer."""
    picture = next(b.text for b in all_blocks() if b.doc.name == "architecture.md" and b.lang == "text")
    folders = sorted({p.parent.relative_to(ROOT / top).as_posix() for top in CODE
                      for p in (ROOT / top).rglob("__init__.py") if p.parent != ROOT / top})
    assert len(folders) > 8
    missing = [f for f in folders if not re.search(rf"(?<![\w/]){re.escape(f.split('/')[-1])}/", picture)]
    assert not missing, "the layer picture does not show: " + ", ".join(missing)


def test_shell_blocks_are_found() -> None:
    """The docs' commands are where tests/e2e/test_docs_commands.py looks for them."""
    shells = [b for b in all_blocks() if b.lang == "sh"]
    assert len(shells) > 15 and all(b.commands() for b in shells)
