"""Shell completion as a user sets it up: the installed `edgectl completion` and `edge-agent completion`
print the scripts, zsh loads its script from $fpath through compinit in a real terminal, fish finds its
script in a completions directory, bash's is sourced."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True, timeout=60)


def shell_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: deploy/system-deps.sh (run by `make test` as root) installs it")
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scripts of both programs, as their `completion` commands print them, in each shell's layout."""
    folder = tmp_path_factory.mktemp("completions")
    for prog in ("edgectl", "edge-agent"):
        for shell, name in (("bash", prog), ("zsh", f"_{prog}"), ("fish", f"{prog}.fish")):
            done = run(prog, "completion", shell)
            assert done.returncode == 0 and done.stderr == "", done.stderr
            (folder / shell).mkdir(exist_ok=True)
            (folder / shell / name).write_text(done.stdout)
    return folder


def test_the_commands_print_the_scripts(installed: Path) -> None:
    assert "complete -F _edgectl edgectl" in (installed / "bash" / "edgectl").read_text()
    assert (installed / "zsh" / "_edge-agent").read_text().startswith("#compdef edge-agent\n")
    assert "complete -c edge-agent" in (installed / "fish" / "edge-agent.fish").read_text()
    for prog in ("edgectl", "edge-agent"):
        refused = run(prog, "completion", "tcsh")
        assert refused.returncode == 2 and refused.stdout == ""
        assert "error: argument shell: invalid choice: 'tcsh'" in refused.stderr.splitlines()[-1]


def test_bash_sources_the_script(installed: Path) -> None:
    code = ('source "$1"; COMP_WORDS=(edgectl fleet ""); COMP_CWORD=2; _edgectl; echo "${COMPREPLY[*]}"; '
            'source "$2"; COMP_WORDS=(edge-agent check-config --js); COMP_CWORD=2; _edge_agent; echo "${COMPREPLY[*]}"; '
            'complete -p edgectl edge-agent')
    done = subprocess.run([shell_tool("bash"), "--norc", "--noprofile", "-c", code, "bash",
                           str(installed / "bash" / "edgectl"), str(installed / "bash" / "edge-agent")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["status watch collect history", "--json", "complete -F _edgectl edgectl",
                                        "complete -F _edge_agent edge-agent"]


def test_fish_finds_the_script_in_a_completions_directory(installed: Path) -> None:
    # fish loads a command's script on the first TAB, for a command it finds on PATH
    code = ('set -p fish_complete_path $argv[1]; complete -C "edgectl deployments "; echo ==; '
            'complete -C "edge-agent --log-level w"')
    done = subprocess.run([shell_tool("fish"), "--no-config", "-c", code, str(installed / "fish")],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    commands, log_levels = done.stdout.split("==\n")
    assert sorted(line.split("\t")[0] for line in commands.splitlines()) == ["history", "list", "show", "withdraw"]
    assert [line.split("\t")[0] for line in log_levels.splitlines()] == ["warning"]


class Terminal:
    """An interactive zsh in a pseudo-terminal: type keys, read what the screen got."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd
        self.seen = ""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, *texts: str, timeout: float = 15.0) -> str:
        """Everything printed since the last wait, once every one of ``texts`` has appeared in it."""
        end = time.monotonic() + timeout
        out = b""
        while time.monotonic() < end:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    out += os.read(self.fd, 65536)
                except OSError:
                    break
                text = out.decode(errors="replace")
                if all(t in text for t in texts):
                    return text
        raise AssertionError(f"{texts} not shown within {timeout} s; the terminal got {out!r}")


@pytest.fixture
def zsh(installed: Path, tmp_path: Path) -> Iterator[Terminal]:
    """zsh -i whose .zshrc puts the scripts on $fpath and runs compinit, as a user's does."""
    binary = shell_tool("zsh")
    (tmp_path / ".zshrc").write_text(f"fpath=({installed / 'zsh'} $fpath)\n"
                                     "autoload -Uz compinit && compinit -u -D\n"
                                     "PS1='READY> '\n")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "ZDOTDIR": str(tmp_path), "TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing of pytest runs here
        os.execve(binary, [binary, "-i"], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    terminal = Terminal(pid, fd)
    try:
        terminal.wait_for("READY> ")
        yield terminal
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)


def test_zsh_completes_through_compinit(zsh: Terminal) -> None:
    zsh.type("edgectl fl\t")
    zsh.wait_for("edgectl fleet")  # the one match is inserted (its space drawn as a removable suffix)
    zsh.type("\t")
    listing = zsh.wait_for("collect", "status", "watch")  # the commands, with their help
    assert "live table of devices" in listing
    zsh.type("\x15edgectl fleet watch --sort \t")
    assert "last-event" in zsh.wait_for("cpu", "device", "last-event", "p95", "rss")
    zsh.type("\x15edge-agent check-config --js\t")
    assert "--json" in zsh.wait_for("--json")
