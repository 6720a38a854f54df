"""Every command README.md and docs/ show, against the real command lines (the docs' conventions are in
tests/support/docs.py).

- Every `edgectl`, `edge-agent` and `systemd/install.sh` command, in fenced blocks, after a `$ ` prompt
  or in inline code, must name subcommands and options the installed console scripts have (read from
  their `--help`), and every `make` target must exist: a renamed flag or subcommand fails here.
- A fenced block with commands of any other tool (systemctl, curl to a board, pip, ssh) either runs
  in the tour or starts with `# needs: ...`; those blocks are few, and listed below.
- The tour runs as written: README's workstation and board blocks and the converter guide's quick
  start, in a sandbox with a real Mosquitto, real agents and a small Keras model trained for it.
  The operations guide's commands run in test_docs_operations.py, with this module's sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.waiting import wait_for
from tests.support.docs import ROOT, Block, Command, all_blocks, inline_code, inline_commands

BIN = Path(sys.executable).parent
PROGRAMS: dict[str, tuple[str, ...]] = {
    "edgectl": (str(BIN / "edgectl"),),
    "edge-agent": (str(BIN / "edge-agent"),),
    "systemd/install.sh": ("bash", str(ROOT / "systemd" / "install.sh")),
}
CHECKED = (*PROGRAMS, "make")

# The blocks of other tools that only run where their `# needs:` line says; a new one belongs here.
NEEDS = {
    ("docs/install.md", "network access to the package index"),
    ("docs/install.md", "the board, over ssh"),
    ("docs/install.md", "root on the board"),
    ("docs/install.md", "root on the board, systemd"),
    ("docs/install.md", "systemd on the board"),
    ("docs/operations.md", "the site broker"),
    ("docs/operations.md", "root on the board, systemd"),
    ("docs/operations.md", "a board with api.port and api.token_file set"),
    ("docs/operations.md", "a PostgreSQL server"),
    ("docs/serving.md", "a board serving a model named digits"),
}

# Options of other programs that the docs name on their own.
OTHER_OPTIONS = {"--platform"}  # pip download, in install.md

# The blocks the tour runs, by document and first command.
TOUR = (("README.md", "edgectl keygen"), ("README.md", "edge-agent status"), ("docs/converter.md", "edgectl keygen"))

# Commands that run until stopped: the tour lets them do their work, then stops them as systemd would.
SERVICES = (("timestamp",), ("fleet", "watch"), ("fleet", "collect"))


# ---------------------------------------------------------------------- what the command lines offer


@dataclass(frozen=True)
class Help:
    """What one command level offers: option strings (-> whether they take a value) and subcommands."""

    options: dict[str, bool]
    commands: frozenset[str]


def parse_help(text: str) -> Help:
    """Options and subcommands from argparse-style `--help` output (install.sh's follows the same layout)."""
    options: dict[str, bool] = {}
    commands: set[str] = set()
    listing = False
    for line in text.splitlines():
        if re.fullmatch(r"  (COMMAND|\{[\w,-]+\})\s*", line):
            listing = True
            continue
        if listing:
            m = re.match(r"    ([a-z][\w-]*)(\s|$)", line)
            if m:
                commands.add(m[1])
                continue
            if line.startswith("      "):  # a wrapped description
                continue
            listing = False
        if re.match(r"\s+-", line):
            head = re.split(r"\s{2,}", line.strip())[0]
            for part in head.split(", "):
                name, _, metavar = part.partition(" ")
                if name.startswith("-"):
                    options[name] = bool(metavar)
    return Help(options, frozenset(commands))


@functools.cache
def help_of(program: str, path: tuple[str, ...] = ()) -> Help:
    res = subprocess.run([*PROGRAMS[program], *path, "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, f"{program} {' '.join(path)} --help exited {res.returncode}: {res.stderr}"
    return parse_help(res.stdout)


def problems(cmd: Command) -> list[str]:
    """What in `cmd` its program does not have: a subcommand or an option, at the level it is given."""
    if cmd.program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        return [f"{cmd.where}: make has no target {t!r} ({cmd.text})" for t in cmd.args if t not in targets]
    program = next(name for name in PROGRAMS if cmd.runs(name))
    path: list[str] = []
    level = help_of(program)
    found = []
    words = iter(cmd.args)
    for word in words:
        if re.match(r"-[A-Za-z-]", word):
            name = word.split("=", 1)[0]
            if name not in level.options:
                found.append(f"{cmd.where}: `{' '.join([program, *path])}` has no option {name} ({cmd.text})")
            elif level.options[name] and "=" not in word:
                next(words, None)  # its value
        elif word in level.commands:
            path.append(word)
            level = help_of(program, tuple(path))
        elif level.commands:
            found.append(f"{cmd.where}: `{' '.join([program, *path])}` has no command {word!r} ({cmd.text})")
            break
    return found


def all_paths(program: str, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command level of a program, the program itself first."""
    yield path
    for sub in sorted(help_of(program, path).commands):
        yield from all_paths(program, (*path, sub))


def shown_commands() -> list[Command]:
    """Every command the docs show, fenced or inline."""
    fenced = [cmd for block in all_blocks() for cmd in block.commands()]
    return fenced + inline_commands(tuple(PROGRAMS))


def block_id(block: Block) -> tuple[str, str]:
    cmds = block.commands()
    return str(block.doc.relative_to(ROOT)), " ".join(cmds[0].argv[:2]) if cmds else ""


# ---------------------------------------------------------------------- checked: names and options


def test_the_checker_finds_what_does_not_exist() -> None:
    bad = [Command("x", ("edgectl", "push", "b", "--chunk-size", "8"), ""),
           Command("x", ("edgectl", "fleet", "stats"), ""),
           Command("x", ("edge-agent", "status", "--model", "m"), ""),
           Command("x", ("make", "docs"), "")]
    assert [len(problems(c)) for c in bad] == [1, 1, 1, 1]
    for good in (Command("x", ("edge-agent", "--config", "a.toml", "rollback", "--model", "m", "--json"), ""),
                 Command("x", ("edge-agent", "status", "--config", "a.toml"), "")):  # global options go either side
        assert problems(good) == []


def test_every_command_shown_names_real_subcommands_and_options() -> None:
    commands = [c for c in shown_commands() if any(c.runs(name) for name in CHECKED)]
    found = [p for c in commands for p in problems(c)]
    assert not found, "\n".join(found)
    # the docs show every subcommand of both command lines at least once
    shown = {(c.program, *c.args[:3]) for c in commands}
    for program in ("edgectl", "edge-agent"):
        for path in all_paths(program):
            if path and not help_of(program, path).commands:
                assert any(s[0] == program and s[1:1 + len(path)] == path for s in shown), \
                    f"no doc shows `{program} {' '.join(path)}`"


def test_every_option_named_in_the_docs_exists() -> None:
    """An option named in prose (`push --canary`, `--mqtt-protocol`) is one of the command lines'; code
    spans of other programs (`curl --unix-socket ...`) are theirs."""
    levels = [(program, path) for program in PROGRAMS for path in all_paths(program)]
    known = {opt for program, path in levels for opt in help_of(program, path).options}
    ours = {*(Path(p).name for p in PROGRAMS), *(path[-1] for _, path in levels if path)}
    named = []
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for where, span in inline_code(doc):
            first = Path(span.split()[0]).name
            if first.startswith("-") or first in ours:
                named += [(where, flag) for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)]
    conf = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
    named += [(f"{conf.relative_to(ROOT)}", flag) for line in conf.read_text().splitlines() if line.startswith("#")
              for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", line)]
    assert len(named) > 50
    unknown = [f"{where}: {flag}" for where, flag in named if flag not in known | OTHER_OPTIONS]
    assert not unknown, "\n".join(unknown)


def test_blocks_of_other_tools_are_run_or_say_what_they_need() -> None:
    needs = set()
    for block in all_blocks():
        others = sorted({c.program for c in block.commands() if not any(c.runs(n) for n in CHECKED)})
        if block.needs is not None:
            needs.add((str(block.doc.relative_to(ROOT)), block.needs))
        elif others and block_id(block) not in TOUR:
            raise AssertionError(f"{block.where}: {', '.join(others)} neither run by the tour nor marked '# needs:'")
    assert needs == NEEDS


# ---------------------------------------------------------------------- run: the tour


def tour_block(doc: str, first: str) -> list[Command]:
    found = [b for b in all_blocks() if block_id(b) == (doc, first)]
    assert len(found) == 1, f"{doc}: no single block starting with `{first}` (the tour)"
    return found[0].commands()


BUILD = """
import sys
import numpy as np
from edgefleet.converter.tflite.native import captured_native_output, import_tensorflow
from sklearn.datasets import load_digits

digits = load_digits()
x = (digits.images / 16.0).astype(np.float32)[..., None]
y = digits.target.astype(np.int64)
order = np.random.default_rng(0).permutation(len(x))
train, test = order[: len(x) * 4 // 5], order[len(x) * 4 // 5:]
np.savez("train.npz", x=x[train], y=y[train])
np.savez("test.npz", x=x[test], y=y[test])
np.save("x.npy", x[test[:1]])
open("labels.txt", "w").write("".join(f"{d}\\n" for d in range(10)))
tf = import_tensorflow()
tf.keras.utils.set_random_seed(0)
L = tf.keras.layers
model = tf.keras.Sequential([L.Input((8, 8, 1)), L.Conv2D(16, 3, padding="same", activation="relu"),
                             L.MaxPooling2D(), L.Flatten(), L.Dense(64, activation="relu"),
                             L.Dense(10, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
with captured_native_output():
    model.fit(x[train], y[train], epochs=10, batch_size=32, verbose=0)
    model.save("model.keras")
    open("float.tflite", "wb").write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits CNN (Keras and float TFLite), its data split in two, labels and one input, made
    in a TensorFlow-only process."""
    out = tmp_path_factory.mktemp("trained")
    subprocess.run([sys.executable, "-c", BUILD], cwd=out, check=True, timeout=300,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return out


def place(trained: Path, where: Path, names: dict[str, str]) -> None:
    """The files a doc's reader has, under the names the doc uses."""
    where.mkdir(parents=True, exist_ok=True)
    for name, source in names.items():
        (where / name).symlink_to(trained / source)


class Sandbox:
    """Runs the docs' commands in one directory, with the venv's console scripts and a broker."""

    def __init__(self, cwd: Path, broker: Mosquitto | None = None, agent_config: Path | None = None):
        self.cwd = cwd
        self.agent_config = agent_config
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        if broker is not None:
            self.env["EDGEFLEET_BROKER"] = broker.url

    def argv(self, cmd: Command) -> list[str]:
        # The docs' `edge-agent` reads /etc/edge-agent/agent.toml; here it reads the sandbox's agent's.
        if cmd.runs("edge-agent") and self.agent_config is not None:
            return [cmd.argv[0], "--config", str(self.agent_config), *cmd.args]
        return list(cmd.argv)

    def run(self, cmd: Command, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(cmd), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert res.returncode == 0, f"{cmd.where}: `{cmd.text}` exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        return res

    def service(self, cmd: Command, until: Callable[[str], bool], what: str) -> str:
        """Start a command that runs until stopped, wait until its work shows, stop it with SIGTERM."""
        out = self.cwd / f".{cmd.args[0]}.out"
        with open(out, "w") as log:
            proc = subprocess.Popen(self.argv(cmd), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: until(out.read_text()) or proc.poll() is not None, timeout=60, what=what)
            assert proc.poll() is None, f"{cmd.where}: `{cmd.text}` exited {proc.returncode}:\n{out.read_text()}"
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return out.read_text()


def model_state(agent: AgentProcess, name: str) -> dict[str, Any]:
    return agent.status()["state"]["models"].get(name, {})  # type: ignore[no-any-return]


def committed(agent: AgentProcess, name: str, version: int) -> bool:
    m = model_state(agent, name)
    return m.get("phase") == "COMMITTED" and (m.get("active") or {}).get("version") == version


def board(root: Path, device: str, keys: Path, **sections: Any) -> AgentProcess:
    return AgentProcess(root, device, api={"socket": str(root / "api.sock"), "admin_socket": str(root / "admin.sock")},
                        security={"trusted_keys": [str(keys / "edgefleet.pub")]}, **sections)


def test_readme_tour(trained: Path, broker: Mosquitto, tmp_path: Path, agents: list[AgentProcess]) -> None:
    """The workstation commands against a fleet whose cam-7 is online (the tour gives it det v1, then v2),
    then the board commands on a fresh board."""
    work = tmp_path / "workstation"
    place(trained, work, {"model.keras": "model.keras", "samples.npz": "train.npz", "held-out.npz": "test.npz",
                          "labels.txt": "labels.txt", "det-v1.tflite": "float.tflite", "x.npy": "x.npy"})
    sh = Sandbox(work, broker)
    commands = tour_block("README.md", "edgectl keygen")
    assert all(c.runs("edgectl") for c in commands), "the workstation tour runs edgectl only"
    sh.run(commands[0])
    assert (work / "keys" / "edgefleet.key").exists()
    # What the reader has: the fleet's det v1 as a .tflite file, and cam-7 of group lab online.
    cam7 = board(tmp_path / "cam-7", "cam-7", work / "keys", groups=["lab"], mqtt={"url": broker.url})
    agents.append(cam7.start())

    ran = []
    for cmd in commands[1:]:
        sub = tuple(a for a in cmd.args[:2] if not a.startswith("-"))
        if sub == ("timestamp",):
            sh.service(cmd, lambda _: bool((cam7.status()["state"].get("channel") or {}).get("fresh")),
                       "cam-7 to hold a fresh signed timestamp")
        elif any(sub[:len(s)] == s for s in SERVICES):
            shown = sh.service(cmd, lambda text: "cam-7" in text, "a row for cam-7")
            assert "det" in shown, shown
        else:
            sh.run(cmd)
        ran.append(sub[0])
        if sub == ("convert",):
            assert json.loads((work / "bundles" / "det-v2" / "report.json").read_text())
        elif sub == ("push",):
            version = 1 if "bundles/det-v1" in cmd.args else 2
            assert committed(cam7, "det", version), model_state(cam7, "det")
        elif sub == ("rollback",):
            m = model_state(cam7, "det")
            assert (m["phase"], m["active"]["version"]) == ("ROLLED_BACK", 1), m
    assert {"package", "convert", "diff", "push", "rollback"} <= set(ran)

    # On a board: a fresh one, without a broker, installing the bundle made above by hand.
    cam1 = board(tmp_path / "cam-1", "cam-1", work / "keys")
    agents.append(cam1.start())
    x = np.load(trained / "x.npy")
    sh = Sandbox(work, agent_config=cam1.config_path)
    for cmd in tour_block("README.md", "edge-agent status"):
        if cmd.runs("curl"):
            # `[...]` is the reader's own input; the socket is this board's
            argv = [a.replace("/run/edge-agent/api.sock", str(cam1.socket)).replace("[[...]]", json.dumps(x.tolist()))
                    for a in cmd.argv]
            res = sh.run(Command(cmd.where, tuple(argv), cmd.text))
            assert len(json.loads(res.stdout)["predictions"]) == 1, res.stdout
            continue
        res = sh.run(cmd)
        if cmd.args[:1] == ("status",):
            assert "device cam-1: agent running" in res.stdout, res.stdout
        elif cmd.args[:1] == ("install",):
            wait_for(lambda: committed(cam1, "det", 2), timeout=30, what="det v2 committed on cam-1")
        elif cmd.args[:1] == ("predict",):
            assert res.stdout.splitlines()[:1] == ["model version 2"] and "  0: " in res.stdout, res.stdout
    assert committed(cam1, "det", 2)


def test_converter_quick_start(trained: Path, tmp_path: Path) -> None:
    place(trained, tmp_path, {"digits.keras": "model.keras", "digits-train.npz": "train.npz",
                              "digits-test.npz": "test.npz", "labels.txt": "labels.txt"})
    sh = Sandbox(tmp_path)
    commands = tour_block("docs/converter.md", "edgectl keygen")
    assert [c.args[0] for c in commands] == ["keygen", "convert"]
    for cmd in commands:
        sh.run(cmd)
    manifest = json.loads((tmp_path / "bundles" / "digits-v1" / "manifest.json").read_text())
    assert (manifest["model"]["name"], manifest["model"]["version"]) == ("digits", 1)
    assert manifest["signature"]
