"""The shell completion scripts of edgectl and edge-agent (edgefleet/completion.py), loaded into the real
shells: bash through its completion function with COMP_WORDS set, fish through `complete -C`, zsh by its
syntax check (the compinit run in a terminal is in tests/e2e/test_completion.py)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent import cli as agent_cli
from edgefleet.completion import DIR, FILE, TEXT, Command, command_tree, complete_as, script
from edgefleet.converter import cli as edgectl_cli

PARSERS = {"edgectl": edgectl_cli.build_parser, "edge-agent": agent_cli.build_parser}
FUNCTIONS = {"edgectl": "_edgectl", "edge-agent": "_edge_agent"}


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every program's script for every shell, written once for the module."""
    folder = tmp_path_factory.mktemp("completion")
    out = {}
    for prog, build in PARSERS.items():
        for shell in ("bash", "zsh", "fish"):
            path = folder / f"{prog}.{shell}"
            path.write_text(script(build(), shell, prog))
            out[prog, shell] = path
    return out


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A working directory with a few files and a folder, to complete paths in."""
    for name in ("ca.pem", "op.password", "train.npz", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "bundles").mkdir()
    return tmp_path


def shell_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: deploy/system-deps.sh (run by `make test` as root) installs it")
    return found


def bash_complete(script_path: Path, prog: str, *words: str, cwd: Path | None = None) -> list[str]:
    """COMPREPLY of the script's function for the command line ``prog words...`` (the cursor on the last word)."""
    code = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
            f'{FUNCTIONS[prog]}; printf "%s\\n" "${{COMPREPLY[@]}}"')
    done = subprocess.run([shell_tool("bash"), "--norc", "--noprofile", "-c", code, "bash", str(script_path), prog,
                           *words], capture_output=True, text=True, timeout=30, cwd=cwd)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [line for line in done.stdout.splitlines() if line]


def fish_complete(script_path: Path, line: str, cwd: Path | None = None) -> list[str]:
    """The candidates fish offers for ``line`` (description dropped)."""
    done = subprocess.run([shell_tool("fish"), "--no-config", "-c", 'source $argv[1]; complete -C $argv[2]',
                           str(script_path), line], capture_output=True, text=True, timeout=30, cwd=cwd)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [candidate.split("\t")[0] for candidate in done.stdout.splitlines()]


# --- what is read from the parsers ----------------------------------------------------------------------


def find(tree: Command, *path: str) -> Command:
    return next(c for c in tree.walk() if c.path == path)


def test_the_tree_has_nested_commands_options_and_value_kinds() -> None:
    tree = command_tree(edgectl_cli.build_parser())
    assert {"convert", "push", "fleet", "deployments", "completion"} <= {c.path[-1] for c in tree.subcommands}
    assert [c.path[-1] for c in find(tree, "fleet").subcommands] == ["status", "watch", "collect", "history"]
    assert {"list", "show", "withdraw", "history"} <= {c.path[-1] for c in find(tree, "deployments").subcommands}

    def value(command: tuple[str, ...], flag: str) -> tuple[str, str, tuple[str, ...]]:
        option = next(o for o in find(tree, *command).options if flag in o.flags)
        assert option.value is not None, flag
        return option.value.kind, option.value.suffix, option.value.choices

    assert value(("push",), "--ca") == (FILE, "", ())
    assert value(("push",), "--key") == (FILE, "", ())
    assert value(("push",), "--password-file") == (FILE, "", ())
    assert value(("push",), "--group") == (TEXT, "", ())  # names are not completed: static scripts
    assert value(("convert",), "--data") == (FILE, ".npz", ())
    assert value(("keygen",), "--output") == (DIR, "", ())
    assert value(("fleet", "watch"), "--sort")[2] == ("device", "cpu", "rss", "p95", "last-event")
    assert value(("push",), "--mqtt-protocol")[2] == ("auto", "5", "3.1.1")
    assert next(o for o in find(tree, "push").options if "--wait" in o.flags).value is None
    assert [v.kind for v in find(tree, "push").positionals] == [FILE]
    assert [(v.kind, v.suffix) for v in find(tree, "package").positionals] == [(FILE, ".tflite")]

    agent = command_tree(agent_cli.build_parser())
    run = find(agent, "run")
    assert {"--config", "--log-level"} <= {f for o in run.options for f in o.flags}  # on every level
    assert [v.kind for v in find(agent, "install").positionals] == [FILE]
    assert [v.choices for v in find(agent, "completion").positionals] == [("bash", "zsh", "fish")]


def test_value_rules() -> None:
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--cfg", type=argparse.FileType("r"))
    p.add_argument("--where", type=Path)
    p.add_argument("--log", metavar="FILE.jsonl|-")
    p.add_argument("--keys", metavar="DIR")
    p.add_argument("--mode", choices=["a", "b"], metavar="FILE")  # choices win over the metavar
    p.add_argument("--trust-dir")
    p.add_argument("--count", metavar="N")
    p.add_argument("--name")
    complete_as(p.add_argument("--odd", metavar="THING"), FILE, ".bin")
    p.add_argument("items", nargs="*", metavar="FILE")
    values = {o.flags[0]: o.value for o in command_tree(p).options if o.value is not None}
    kinds = {flag: (v.kind, v.suffix, v.choices) for flag, v in values.items()}
    assert kinds == {"--cfg": (FILE, "", ()), "--where": (FILE, "", ()), "--log": (FILE, ".jsonl", ()),
                     "--keys": (DIR, "", ()), "--mode": (TEXT, "", ("a", "b")), "--trust-dir": (DIR, "", ()),
                     "--count": (TEXT, "", ()), "--name": (TEXT, "", ()), "--odd": (FILE, ".bin", ())}
    tree = command_tree(p)
    assert tree.repeats and [v.kind for v in tree.positionals] == [FILE]
    with pytest.raises(ValueError, match="unknown completion kind"):
        complete_as(p.add_argument("--x"), "url")
    with pytest.raises(ValueError, match="one of bash, zsh, fish"):
        script(p, "tcsh")


# --- bash ----------------------------------------------------------------------------------------------


def test_bash_commands_and_nested_commands(scripts: dict[tuple[str, str], Path]) -> None:
    bash = scripts["edgectl", "bash"]
    top = bash_complete(bash, "edgectl", "")
    assert {"convert", "push", "fleet", "deployments", "completion", "profile"} <= set(top)
    assert bash_complete(bash, "edgectl", "fl") == ["fleet"]
    assert bash_complete(bash, "edgectl", "fleet", "") == ["status", "watch", "collect", "history"]
    assert bash_complete(bash, "edgectl", "-v", "fleet", "wa") == ["watch"]  # an option before the command
    assert bash_complete(bash, "edgectl", "deployments", "") == ["list", "show", "withdraw", "history"]


def test_bash_options(scripts: dict[tuple[str, str], Path]) -> None:
    bash = scripts["edgectl", "bash"]
    options = bash_complete(bash, "edgectl", "push", "bundles/det-v2", "--")
    assert {"--group", "--device", "--key", "--wait", "--canary", "--ca", "--password-file", "--help"} <= set(options)
    assert "--sort" not in options  # fleet watch's, not push's
    assert bash_complete(bash, "edgectl", "push", "--wa") == ["--wait"]
    assert "--sort" in bash_complete(bash, "edgectl", "fleet", "watch", "--")


def test_bash_choices(scripts: dict[tuple[str, str], Path]) -> None:
    bash = scripts["edgectl", "bash"]
    sort = ["device", "cpu", "rss", "p95", "last-event"]
    assert bash_complete(bash, "edgectl", "fleet", "watch", "--sort", "") == sort
    assert bash_complete(bash, "edgectl", "fleet", "watch", "--sort", "l") == ["last-event"]
    # bash splits --sort=c into --sort, =, c
    assert bash_complete(bash, "edgectl", "fleet", "watch", "--sort", "=", "c") == ["cpu"]
    assert bash_complete(bash, "edgectl", "fleet", "watch", "--sort", "=") == sort
    assert bash_complete(bash, "edgectl", "push", "--mqtt-protocol", "") == ["auto", "5", "3.1.1"]
    # an option's value is not a command: after `--group fleet` the line is still push's
    assert bash_complete(bash, "edgectl", "push", "--group", "fleet", "--wa") == ["--wait"]
    assert bash_complete(bash, "edgectl", "completion", "") == ["bash", "zsh", "fish"]
    agent = scripts["edge-agent", "bash"]
    assert bash_complete(agent, "edge-agent", "--log-level", "") == ["debug", "info", "warning", "error"]
    assert bash_complete(agent, "edge-agent", "status", "--log-level", "w") == ["warning"]


def test_bash_files(scripts: dict[tuple[str, str], Path], files: Path) -> None:
    bash = scripts["edgectl", "bash"]
    assert bash_complete(bash, "edgectl", "push", "b", "--ca", "c", cwd=files) == ["ca.pem"]
    assert bash_complete(bash, "edgectl", "push", "b", "--password-file", "op", cwd=files) == ["op.password"]
    assert bash_complete(bash, "edgectl", "push", "bu", cwd=files) == ["bundles"]  # the bundle argument
    assert bash_complete(bash, "edgectl", "push", "--group", "lab", "bu", cwd=files) == ["bundles"]
    assert sorted(bash_complete(bash, "edgectl", "convert", "m.keras", "--data", "", cwd=files)) == ["bundles",
                                                                                                     "train.npz"]
    assert bash_complete(bash, "edgectl", "keygen", "-o", "", cwd=files) == ["bundles"]
    assert bash_complete(bash, "edgectl", "push", "--group", "", cwd=files) == []  # no names, no files
    agent = scripts["edge-agent", "bash"]
    assert bash_complete(agent, "edge-agent", "--config", "n", cwd=files) == ["notes.txt"]
    assert bash_complete(agent, "edge-agent", "install", "b", cwd=files) == ["bundles"]


def test_bash_scripts_pass_shellcheck(scripts: dict[tuple[str, str], Path]) -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck not found beside the interpreter: `pip install -e '.[dev]'` brings it"
    for prog in PARSERS:
        done = subprocess.run([str(shellcheck), "--shell=bash", str(scripts[prog, "bash"])], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout


# --- zsh and fish --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prog", PARSERS)
def test_zsh_and_fish_syntax(scripts: dict[tuple[str, str], Path], prog: str) -> None:
    for shell in ("zsh", "fish"):
        done = subprocess.run([shell_tool(shell), "-n", str(scripts[prog, shell])], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0 and done.stderr == "", f"{shell}: {done.stderr}"
    assert scripts[prog, "zsh"].read_text().startswith(f"#compdef {prog}\n")


def test_zsh_script_sourced_after_compinit_registers_itself(scripts: dict[tuple[str, str], Path],
                                                            tmp_path: Path) -> None:
    # `source <(edgectl completion zsh)` in a .zshrc, the other way to load it than $fpath
    code = ('autoload -Uz compinit && compinit -u -D; source $1; source $2; '
            'print -r -- $_comps[edgectl] $_comps[edge-agent]')
    done = subprocess.run([shell_tool("zsh"), "-f", "-c", code, "zsh", str(scripts["edgectl", "zsh"]),
                           str(scripts["edge-agent", "zsh"])], capture_output=True, text=True, timeout=30,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "_edgectl _edge_agent\n", "")


def test_fish_completes(scripts: dict[tuple[str, str], Path], files: Path) -> None:
    fish = scripts["edgectl", "fish"]
    assert fish_complete(fish, "edgectl fl") == ["fleet"]
    assert sorted(fish_complete(fish, "edgectl fleet ")) == ["collect", "history", "status", "watch"]
    assert sorted(fish_complete(fish, "edgectl fleet watch --sort ")) == ["cpu", "device", "last-event", "p95", "rss"]
    assert fish_complete(fish, "edgectl fleet watch --sort=l") == ["--sort=last-event"]
    assert "--wait" in fish_complete(fish, "edgectl push b --")
    assert "--sort" not in fish_complete(fish, "edgectl push b --")
    assert fish_complete(fish, "edgectl push b --ca c", cwd=files) == ["ca.pem"]
    assert fish_complete(fish, "edgectl push bu", cwd=files) == ["bundles/"]
    assert fish_complete(fish, "edgectl push --group ", cwd=files) == []
    agent = scripts["edge-agent", "fish"]
    assert sorted(fish_complete(agent, "edge-agent --log-level ")) == ["debug", "error", "info", "warning"]
    assert fish_complete(agent, "edge-agent st") == ["status"]


# --- the commands --------------------------------------------------------------------------------------


def test_edgectl_completion_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert edgectl_cli.main(["completion", "bash"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == script(edgectl_cli.build_parser(), "bash", "edgectl")
    assert "complete -F _edgectl edgectl" in out
    assert edgectl_cli.main(["completion", "tcsh"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("edgectl: error: argument shell: invalid choice: 'tcsh'")


def test_edge_agent_completion_needs_no_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    # the default /etc/edge-agent/agent.toml is absent here: no warning about it, no config read
    assert agent_cli.main(["completion", "fish", "--config", "/nonexistent/agent.toml"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == script(agent_cli.build_parser(), "fish", "edge-agent")
    assert "complete -c edge-agent" in out
