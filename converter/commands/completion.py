"""`edgectl completion SHELL`: print the shell completion script for bash, zsh or fish."""

from __future__ import annotations

import argparse
from typing import Any

from edgefleet.completion import add_shell_argument, script
from edgefleet.errors import ExitCode

EPILOG = """\
The script is static: commands, options, choices and file arguments, read from this edgectl (commands
whose extra is not installed complete no options). Generate it again after an upgrade.

examples:
  edgectl completion bash > ~/.local/share/bash-completion/completions/edgectl
  edgectl completion zsh > ~/.zfunc/_edgectl        # with fpath=(~/.zfunc $fpath) before compinit
  edgectl completion fish > ~/.config/fish/completions/edgectl.fish
  source <(edgectl completion bash)                 # this shell only
"""


def add_parser(subparsers: Any) -> None:
    """Register `completion`."""
    p = subparsers.add_parser("completion", help="print the shell completion script (bash, zsh, fish)",
                              description="Print edgectl's completion script for a shell.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shell_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the script of the whole edgectl parser (built again here: the command sees only its own)."""
    from edgefleet.converter.cli import PROG, build_parser

    print(script(build_parser(), args.shell, PROG), end="")
    return ExitCode.OK
