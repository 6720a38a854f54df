"""Shell completion scripts for `edgectl` and `edge-agent`, generated from their argparse parsers.

The scripts are static: everything they know (commands, nested commands such as `fleet watch`, options,
option choices, which values are files or directories) is written into them when they are generated,
so a TAB never starts Python. Device, group and model names are not completed: knowing them means asking
the broker, which a keypress must not do.

Which values are paths is read from each argument: an explicit ``complete_as`` mark, a ``FileType`` or
``Path`` type, else its metavar (``FILE``, ``FILE.npz``, ``BUNDLE``, ``KEY``, ``DIR``, ``MODEL.tflite``
...), else, for arguments without a metavar, its name (``--config``, ``--input``, ``bundle``).

Pure standard library, no host-only imports: the agent generates its own scripts at install time.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")

FILE, DIR, TEXT = "file", "dir", "text"
"""What a value completes to: paths, directories only, or nothing (free text such as an id or a number)."""

_MARK = "edgefleet_complete"
_FILE_PREFIXES = ("FILE", "PATH", "BUNDLE", "SRC")
_FILE_WORDS = {"KEY", "PUB", "PUBKEY", "CONFIG", "CERT", "CA", "PEM"}
_DIR_WORDS = ("DIR", "DIRECTORY")
_FILE_NAMES = {"config", "bundle", "input", "output", "path", "file", "src", "ca", "cert", "key", "key_file",
               "password_file", "pubkey"}
_SUFFIX = re.compile(r"^[A-Z_]*\.([a-z0-9]+)$", re.IGNORECASE)


def complete_as(action: argparse.Action, kind: str, suffix: str = "") -> argparse.Action:
    """Mark an argument's value as ``FILE`` (optionally with ``suffix``, e.g. ".npz"), ``DIR`` or ``TEXT``,
    for the cases its metavar and name do not tell; returns the action, to wrap ``add_argument``."""
    if kind not in (FILE, DIR, TEXT):
        raise ValueError(f"unknown completion kind {kind!r}")
    setattr(action, _MARK, (kind, suffix))
    return action


@dataclass(frozen=True)
class Value:
    """What an option's value or a positional argument completes to."""

    kind: str
    hint: str
    choices: tuple[str, ...] = ()
    suffix: str = ""

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """Values completed the same way share one branch of a script."""
        return self.kind, self.suffix, self.choices


@dataclass(frozen=True)
class Option:
    """An option: its flags, a one-line help, and its value (None for a flag that takes none)."""

    flags: tuple[str, ...]
    help: str
    value: Value | None


@dataclass(frozen=True)
class Command:
    """One level of the command line: the program itself, `fleet`, or `fleet watch`."""

    path: tuple[str, ...]
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Value, ...]
    repeats: bool
    """The last positional takes any number of words (nargs * or +)."""
    subcommands: tuple[Command, ...]

    @property
    def context(self) -> str:
        """The command words after the program, space-separated ('' for the program itself)."""
        return " ".join(self.path)

    def walk(self) -> Iterator[Command]:
        """This command and every command below it, parents first."""
        yield self
        for sub in self.subcommands:
            yield from sub.walk()


def _one_line(text: str | None, action: argparse.Action | None = None, prog: str = "") -> str:
    """The help as one short line, %(default)s and friends filled in as argparse does."""
    if not text or text == argparse.SUPPRESS:
        return ""
    if action is not None and "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        if isinstance(params.get("choices"), Sequence):
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    line = " ".join(text.split())
    return line if len(line) <= 90 else line[:89].rsplit(" ", 1)[0] + "…"


def _value(action: argparse.Action) -> Value:
    """How the value of ``action`` completes (see the module docstring for the rules)."""
    metavar = action.metavar if isinstance(action.metavar, str) else None
    hint = metavar or action.dest.upper()
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return Value(TEXT, hint, tuple(str(c) for c in action.choices))
    mark = getattr(action, _MARK, None)
    if mark is not None:
        return Value(mark[0], hint, suffix=mark[1])
    if isinstance(action.type, argparse.FileType) or action.type is Path:
        return Value(FILE, hint)
    if metavar is not None:
        for alternative in metavar.split("|"):
            found = _SUFFIX.match(alternative)
            if found:
                return Value(FILE, hint, suffix="." + found.group(1))
            word = alternative.upper()
            if word.endswith(_DIR_WORDS):
                return Value(DIR, hint)
            if word in _FILE_WORDS or word.startswith(_FILE_PREFIXES) or word.endswith(("_FILE", "_PATH")):
                return Value(FILE, hint)
        return Value(TEXT, hint)
    name = action.dest
    if name.endswith("_dir"):
        return Value(DIR, hint)
    if name in _FILE_NAMES or name.endswith(("_file", "_path")):
        return Value(FILE, hint)
    return Value(TEXT, hint)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help: str = "") -> Command:
    """The commands, options and arguments of ``parser`` and of every parser below it."""
    options: list[Option] = []
    positionals: list[Value] = []
    repeats = False
    subcommands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                subcommands.append(command_tree(sub, (*path, name), _one_line(helps.get(name))))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            options.append(Option(tuple(action.option_strings), _one_line(action.help, action, parser.prog),
                                  _value(action) if _takes_value(action) else None))
        elif not repeats:
            value = _value(action)
            if isinstance(action.nargs, int):
                positionals.extend([value] * action.nargs)
            else:
                positionals.append(value)
                repeats = action.nargs in ("*", "+", argparse.REMAINDER)
    return Command(path, help, tuple(options), tuple(positionals), repeats, tuple(subcommands))


def script(parser: argparse.ArgumentParser, shell: str, prog: str | None = None) -> str:
    """The completion script of ``parser`` for ``shell`` (one of ``SHELLS``)."""
    emitters: dict[str, Callable[[Command, str], str]] = {"bash": _bash, "zsh": _zsh, "fish": _fish}
    if shell not in emitters:
        raise ValueError(f"no completion for {shell!r}: one of {', '.join(SHELLS)}")
    return emitters[shell](command_tree(parser), prog or parser.prog)


def add_shell_argument(parser: argparse.ArgumentParser) -> None:
    """The SHELL argument of a `completion` command."""
    parser.add_argument("shell", choices=SHELLS, help="the shell to print the completion script for")


def _function(prog: str) -> str:
    return "_" + re.sub(r"[^A-Za-z0-9]", "_", prog)


def _q(text: str) -> str:
    """Single-quoted for sh and zsh (always quoted, '' for the empty string)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _grouped(pairs: Sequence[tuple[str, tuple[str, str, tuple[str, ...]]]]) -> dict[tuple[str, str, tuple[str, ...]],
                                                                                   list[str]]:
    """Patterns grouped by the branch they lead to, in first-seen order."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for pattern, key in pairs:
        groups.setdefault(key, []).append(pattern)
    return groups


def _takes_value_function(f: str, value_options: list[tuple[Command, str, Value]], pattern: str) -> str:
    """The shell function `{f}_takes_value CONTEXT OPTION`: true for an option that takes a value there.
    `pattern` wraps the case patterns (bash: `{})`, zsh: `({})`)."""
    patterns = " | ".join(_q(f"{c.context}|{flag}") for c, flag, _ in value_options)
    lines = [f"{f}_takes_value() {{  # CONTEXT OPTION\n    case \"$1|$2\" in"]
    if patterns:
        lines.append(f"        {pattern.format(patterns)} return 0 ;;")
    lines.append("    esac\n    return 1\n}\n")
    return "\n".join(lines)


def _value_options(tree: Command) -> list[tuple[Command, str, Value]]:
    return [(c, flag, o.value) for c in tree.walk() for o in c.options if o.value is not None for flag in o.flags]


def _positional_arms(tree: Command) -> list[tuple[str, Value]]:
    """(quoted case pattern of "CONTEXT|INDEX", value) for every positional, in order: a repeating last
    positional matches every later index, so each command's arms must stay in this order."""
    arms = []
    for c in tree.walk():
        for i, value in enumerate(c.positionals):
            last = c.repeats and i == len(c.positionals) - 1
            arms.append((_q(f"{c.context}|") + "*" if last else _q(f"{c.context}|{i}"), value))
    return arms


HEADER = """\
# {shell} completion for {prog}: {usage}
# Generated by `{prog} completion {shell}` from {prog}'s own options; generate it again after an upgrade.
"""

_USAGE = {
    "bash": "source it, or put it in ~/.local/share/bash-completion/completions/{prog}",
    "zsh": "put it as _{prog} in a directory of $fpath (before compinit runs)",
    "fish": "put it in ~/.config/fish/completions/{prog}.fish",
}


def _header(shell: str, prog: str) -> str:
    return HEADER.format(shell=shell, prog=prog, usage=_USAGE[shell].format(prog=prog))


# --- bash ---------------------------------------------------------------------------------------------

_BASH_MAIN = """\
{f}_fill() {{  # KIND SUFFIX CURRENT [CHOICES]: COMPREPLY from choices, files or directories
    case $1 in
        choices) mapfile -t COMPREPLY < <(compgen -W "$4" -- "$3") ;;
        file)
            compopt -o filenames 2>/dev/null
            if [ -n "$2" ]; then
                mapfile -t COMPREPLY < <(compgen -d -- "$3"; compgen -f -X "!*$2" -- "$3")
            else
                mapfile -t COMPREPLY < <(compgen -f -- "$3")
            fi ;;
        dir)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -d -- "$3") ;;
    esac
}}

{f}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} ctx='' word subs valopt='' npos=0 i=1
    COMPREPLY=()
    while [ "$i" -lt "$COMP_CWORD" ]; do
        word=${{COMP_WORDS[i]}}
        i=$((i + 1))
        case $word in
            -*=*) ;;
            -*)
                if {f}_takes_value "$ctx" "$word"; then
                    # bash splits --option=value into three words: --option, =, value
                    if [ "${{COMP_WORDS[i]-}}" = "=" ]; then i=$((i + 1)); fi
                    if [ "$i" -ge "$COMP_CWORD" ]; then valopt=$word; fi
                    i=$((i + 1))
                fi ;;
            *)
                subs=" $({f}_subcommands "$ctx") "
                if [[ $subs == *" $word "* ]]; then
                    ctx=${{ctx:+$ctx }}$word
                    npos=0
                else
                    npos=$((npos + 1))
                fi ;;
        esac
    done
    if [ -n "$valopt" ]; then
        if [ "$cur" = "=" ]; then cur=''; fi
        {f}_value "$ctx" "$valopt" "$cur"
        return 0
    fi
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$({f}_options "$ctx")" -- "$cur")
        return 0
    fi
    subs=$({f}_subcommands "$ctx")
    if [ -n "$subs" ]; then
        mapfile -t COMPREPLY < <(compgen -W "$subs" -- "$cur")
        return 0
    fi
    {f}_positional "$ctx" "$npos" "$cur"
}}

complete -F {f} {prog}
"""


def _bash_fill(value: Value, cur: str) -> str:
    if value.choices:
        return f"{cur}_fill choices '' \"$3\" {_q(' '.join(value.choices))}"
    return f"{cur}_fill {value.kind} {_q(value.suffix)} \"$3\""


def _bash(tree: Command, prog: str) -> str:
    f = _function(prog)
    out = [_header("bash", prog)]
    out.append(f"{f}_subcommands() {{\n    case $1 in")
    for c in tree.walk():
        if c.subcommands:
            out.append(f"        {_q(c.context)}) echo {_q(' '.join(s.path[-1] for s in c.subcommands))} ;;")
    out.append("    esac\n}\n")
    out.append(f"{f}_options() {{\n    case $1 in")
    for c in tree.walk():
        flags = " ".join(flag for o in c.options for flag in o.flags)
        out.append(f"        {_q(c.context)}) echo {_q(flags)} ;;")
    out.append("    esac\n}\n")
    value_options = _value_options(tree)
    out.append(_takes_value_function(f, value_options, "{})"))
    out.append(f"{f}_value() {{  # CONTEXT OPTION CURRENT\n    case \"$1|$2\" in")
    values = {v.key: v for _, _, v in value_options}
    for key, pats in _grouped([(f"{c.context}|{flag}", v.key) for c, flag, v in value_options]).items():
        if values[key].kind != TEXT or values[key].choices:
            out.append(f"        {' | '.join(_q(p) for p in pats)})\n            {_bash_fill(values[key], f)} ;;")
    out.append("    esac\n}\n")
    out.append(f"{f}_positional() {{  # CONTEXT INDEX CURRENT\n    case \"$1|$2\" in")
    for pattern, value in _positional_arms(tree):
        fill = _bash_fill(value, f) + " " if value.kind != TEXT or value.choices else ""
        out.append(f"        {pattern}) {fill};;")
    out.append("    esac\n}\n")
    out.append(_BASH_MAIN.format(f=f, prog=prog))
    return "\n".join(out)


# --- zsh ----------------------------------------------------------------------------------------------

_ZSH_MAIN = """\
{f}() {{
    local ctx='' word subs valopt='' cur=${{words[CURRENT]}}
    local -i i=2 npos=0
    while (( i < CURRENT )); do
        word=${{words[i]}}
        (( i += 1 ))
        case $word in
            -*=*) ;;
            -*)
                if {f}_takes_value "$ctx" "$word"; then
                    (( i >= CURRENT )) && valopt=$word
                    (( i += 1 ))
                fi ;;
            *)
                subs=" $({f}_subcommand_names "$ctx") "
                if [[ $subs == *" $word "* ]]; then
                    ctx=${{ctx:+$ctx }}$word
                    npos=0
                else
                    (( npos += 1 ))
                fi ;;
        esac
    done
    if [[ -n $valopt ]]; then
        {f}_value "$ctx" "$valopt"
        return
    fi
    if [[ $cur == -*=* ]]; then
        valopt=${{cur%%=*}}
        if {f}_takes_value "$ctx" "$valopt"; then
            compset -P '*='
            {f}_value "$ctx" "$valopt"
        fi
        return
    fi
    if [[ $cur == -* ]]; then
        {f}_options "$ctx"
        return
    fi
    {f}_subcommands "$ctx" && return
    {f}_positional "$ctx" $npos
}}

# Autoloaded from $fpath (as _{prog}), this file is the body of the completion function: run it.
# Sourced, register it.
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    {f} "$@"
elif (( $+functions[compdef] )); then
    compdef {f} {prog}
fi
"""


def _zsh_escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace(":", "\\:")


def _zsh_fill(value: Value) -> str:
    if value.choices:
        return f"local -a values=({' '.join(_q(c) for c in value.choices)}); _describe -t values {_q(value.hint)} values"
    if value.kind == DIR:
        return "_files -/"
    if value.kind == FILE:
        return f"_files -g {_q('*' + value.suffix)}" if value.suffix else "_files"
    return f"_message -e values {_q(value.hint)}"


def _zsh(tree: Command, prog: str) -> str:
    f = _function(prog)
    out = [f"#compdef {prog}", _header("zsh", prog)]
    out.append(f"{f}_subcommand_names() {{\n    case $1 in")
    for c in tree.walk():
        if c.subcommands:
            out.append(f"        {_q(c.context)}) echo {_q(' '.join(s.path[-1] for s in c.subcommands))} ;;")
    out.append("    esac\n}\n")
    out.append(f"{f}_subcommands() {{  # CONTEXT: offer its commands; false when it has none\n"
               "    local -a commands\n    case $1 in")
    for c in tree.walk():
        if c.subcommands:
            entries = " ".join(_q(f"{_zsh_escape(s.path[-1])}:{s.help}") for s in c.subcommands)
            out.append(f"        {_q(c.context)}) commands=({entries}) ;;")
    out.append("        *) return 1 ;;\n    esac\n    _describe -t commands command commands\n}\n")
    out.append(f"{f}_options() {{\n    local -a options\n    case $1 in")
    for c in tree.walk():
        entries = " ".join(_q(f"{_zsh_escape(flag)}:{o.help}") for o in c.options for flag in o.flags)
        out.append(f"        {_q(c.context)}) options=({entries}) ;;")
    out.append("    esac\n    _describe -t options option options\n}\n")
    value_options = _value_options(tree)
    out.append(_takes_value_function(f, value_options, "({})"))

    out.append(f"{f}_value() {{  # CONTEXT OPTION\n    case \"$1|$2\" in")
    hinted = [(f"{c.context}|{flag}", (v.kind, v.suffix, (*v.choices, v.hint))) for c, flag, v in value_options]
    values = {(v.kind, v.suffix, (*v.choices, v.hint)): v for _, _, v in value_options}
    for key, pats in _grouped(hinted).items():
        out.append(f"        ({' | '.join(_q(p) for p in pats)}) {_zsh_fill(values[key])} ;;")
    out.append("    esac\n}\n")
    out.append(f"{f}_positional() {{  # CONTEXT INDEX\n    case \"$1|$2\" in")
    for pattern, value in _positional_arms(tree):
        out.append(f"        ({pattern}) {_zsh_fill(value)} ;;")
    out.append("        (*) _message 'no more arguments' ;;\n    esac\n}\n")
    out.append(_ZSH_MAIN.format(f=f, prog=prog))
    return "\n".join(out)


# --- fish ---------------------------------------------------------------------------------------------

_FISH_WALK = """\
function {f}_walk --description 'The command words and the positional index at the cursor'
    set -l ctx ''
    set -l npos 0
    set -l skip 0
    for word in (commandline -opc)[2..-1]
        if test $skip -eq 1
            set skip 0
            continue
        end
        switch $word
            case '-*=*'
            case '-*'
                if {f}_takes_value "$ctx" $word
                    set skip 1
                end
            case '*'
                if contains -- $word ({f}_subcommands "$ctx")
                    set ctx (string trim -- "$ctx $word")
                    set npos 0
                else
                    set npos (math $npos + 1)
                end
        end
    end
    printf '%s\\n' "$ctx" $npos
end

function {f}_at --description 'True when the cursor is in command CONTEXT (at positional INDEX, N+: N or later)'
    set -l here ({f}_walk)
    test "$here[1]" = "$argv[1]"; or return 1
    set -q argv[2]; or return 0
    if string match -q -- '*+' $argv[2]
        test $here[2] -ge (string replace -- '+' '' $argv[2])
    else
        test $here[2] -eq $argv[2]
    end
end
"""


def _fish_q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_arguments(value: Value) -> str:
    """The `complete` switches that complete ``value``."""
    if value.choices:
        words = " ".join(re.sub(r"([^A-Za-z0-9_.,:+%/@=-])", r"\\\1", c) for c in value.choices)
        return f"-x -a {_fish_q(words)}"
    if value.kind == DIR:
        return "-x -a '(__fish_complete_directories (commandline -ct))'"
    if value.kind == FILE:
        return f"-x -a {_fish_q(f'(__fish_complete_suffix {value.suffix})')}" if value.suffix else "-r -F"
    return "-x"


def _fish_positional(value: Value) -> str:
    """The `complete` switches that complete a positional argument."""
    if value.choices:
        return _fish_arguments(value).removeprefix("-x ")
    if value.kind == DIR:
        return "-a '(__fish_complete_directories (commandline -ct))'"
    return f"-a {_fish_q(f'(__fish_complete_suffix {value.suffix})')}" if value.suffix else "-F"


def _fish_flag(flag: str) -> str:
    if flag.startswith("--"):
        return f"-l {shlex.quote(flag[2:])}"
    return f"-s {shlex.quote(flag[1:])}" if len(flag) == 2 else f"-o {shlex.quote(flag[1:])}"


def _fish(tree: Command, prog: str) -> str:
    f = "_" + _function(prog)
    out = [_header("fish", prog)]
    out.append(f"function {f}_subcommands\n    switch $argv[1]")
    for c in tree.walk():
        if c.subcommands:
            out.append(f"        case {_fish_q(c.context)}\n            printf '%s\\n' "
                       + " ".join(_fish_q(s.path[-1]) for s in c.subcommands))
    out.append("    end\nend\n")
    out.append(f"function {f}_takes_value\n    switch \"$argv[1]|$argv[2]\"")
    patterns = " ".join(_fish_q(f"{c.context}|{flag}") for c, flag, _ in _value_options(tree))
    if patterns:
        out.append(f"        case {patterns}\n            return 0")
    out.append("    end\n    return 1\nend\n")
    out.append(_FISH_WALK.format(f=f))
    out.append(f"complete -c {prog} -e\ncomplete -c {prog} -f")
    for c in tree.walk():
        at = _fish_q(f"{f}_at {_fish_q(c.context)}")
        for s in c.subcommands:
            out.append(f"complete -c {prog} -n {at} -a {_fish_q(s.path[-1])} -d {_fish_q(s.help)}")
        for o in c.options:
            flags = " ".join(_fish_flag(flag) for flag in o.flags)
            value = _fish_arguments(o.value) if o.value is not None else ""
            out.append(f"complete -c {prog} -n {at} {flags} {value} -d {_fish_q(o.help)}".replace("  ", " "))
        for i, v in enumerate(c.positionals):
            if v.kind == TEXT and not v.choices:
                continue
            index = f"{i}+" if c.repeats and i == len(c.positionals) - 1 else str(i)
            where = _fish_q(f"{f}_at {_fish_q(c.context)} {index}")
            out.append(f"complete -c {prog} -n {where} {_fish_positional(v)}")
    return "\n".join(out) + "\n"
