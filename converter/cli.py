"""`edgectl`, the host command line: model commands (convert, package, inspect, diff) and fleet commands.

Each command lives in its own module exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (``args -> int``). Command modules import nothing heavy at module level:
TensorFlow is loaded inside ``convert`` only, so the other commands start fast.

The base install (a board's) has none of the host libraries, so each module names the extra it needs.
A command whose extra is not installed is still listed by ``--help``; running it prints one line naming
the extra and exits 2, before its module is imported.

Exit codes (``ExitCode`` in edgefleet/errors.py, shared with `edge-agent`; each error class carries
its own): 0 success; 1 failure (conversion, runtime, I/O); 2 bad input (files, options, data, a
tampered bundle; nothing is written); 3 the accuracy gate tripped (no bundle written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

from edgefleet import __version__
from edgefleet.errors import EdgefleetError, ExitCode, UsageError, exit_code, guard_pipe

log = logging.getLogger(__name__)

PROG = "edgectl"
DISTRIBUTION = "edgefleet"


@dataclass(frozen=True)
class CommandModule:
    """A command module, the extra (pyproject.toml) it needs (None: the base install is enough), and the
    commands it registers.

    The commands are listed here too because a module whose extra is missing cannot be imported to ask;
    tests/unit/test_edgectl_extras.py keeps the list equal to what ``add_parser`` registers.
    """

    module: str
    extra: str | None
    commands: tuple[str, ...]


# In the order `edgectl --help` lists them.
COMMAND_MODULES: tuple[CommandModule, ...] = (
    CommandModule("edgefleet.converter.commands.convert", "converter", ("convert",)),
    CommandModule("edgefleet.converter.commands.package", "converter", ("package",)),
    CommandModule("edgefleet.converter.commands.inspect", "converter", ("inspect",)),
    CommandModule("edgefleet.converter.commands.diff", "converter", ("diff",)),
    CommandModule("edgefleet.converter.commands.keygen", "fleet", ("keygen",)),
    CommandModule("edgefleet.converter.commands.push", "fleet", ("push",)),
    CommandModule("edgefleet.converter.commands.rollback", "fleet", ("rollback",)),
    CommandModule("edgefleet.converter.commands.logs", "fleet", ("logs",)),
    CommandModule("edgefleet.converter.commands.fleet", "fleet", ("fleet",)),
    CommandModule("edgefleet.converter.commands.gc", "fleet", ("gc",)),
    CommandModule("edgefleet.converter.commands.trust", "fleet", ("inventory", "timestamp", "withdraw")),
    CommandModule("edgefleet.converter.commands.deployments", "fleet", ("deployments",)),
    CommandModule("edgefleet.converter.commands.broker", "fleet", ("broker",)),
    CommandModule("edgefleet.converter.commands.profile", "fleet", ("profile",)),
    CommandModule("edgefleet.converter.commands.completion", None, ("completion",)),
)

EPILOG = """\
exit codes:
  0  success
  1  failure (conversion, runtime or I/O error)
  2  bad input: missing or corrupt file, data that does not fit the model, bad option,
     tampered bundle; nothing is written
  3  the accuracy gate refused the conversion: the drop's confidence interval lies above
     --max-accuracy-drop, or an agreement check failed; no bundle is written
  141  the reader of the output went away (`edgectl ... | head`), as for a program SIGPIPE ends

Run 'edgectl COMMAND --help' for a command's options and examples.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 through `main`), not usage + message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # On every level, so `-v` works after the command too (`edgectl push ... -v`). SUPPRESS as the
        # default: a command's parser then leaves a count given before the command alone.
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          help="more log output (-vv: debug)")

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


def missing_requirements(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed (none when edgefleet itself is not installed).

    Read from the installed metadata, so pyproject.toml stays the one place an extra is defined.
    """
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # a source tree on sys.path: nothing to compare against
        return []
    in_extra = re.compile(rf"""\bextra\s*==\s*["']{re.escape(extra)}["']""")
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if not in_extra.search(marker) or name is None:
            continue
        try:
            metadata.distribution(name.group(0))
        except metadata.PackageNotFoundError:
            missing.append(name.group(0))
    return missing


def needs_extra_line(command: str, extra: str) -> str:
    """The one line a command prints when its extra is not installed."""
    return f"{PROG} {command}: needs the '{extra}' extra: pip install '{DISTRIBUTION}[{extra}]'"


def unavailable(argv: Sequence[str]) -> tuple[str, str] | None:
    """(command, extra) when the command in ``argv`` needs an extra that is not installed."""
    # The top-level options take no value, so the first word that is not an option is the command.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    for entry in COMMAND_MODULES:
        if command in entry.commands and entry.extra and missing_requirements(entry.extra):
            return command, entry.extra
    return None


def build_parser(modules: Sequence[CommandModule] = COMMAND_MODULES) -> ArgumentParser:
    """The top-level parser: each module's commands, or a stub naming the extra when it is missing."""
    parser = ArgumentParser(
        prog=PROG,
        description="Turn trained models into small, validated, signed bundles and manage them on a fleet.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for entry in modules:
        if entry.extra and missing_requirements(entry.extra):
            for command in entry.commands:
                subparsers.add_parser(command, help=f"(not installed: needs the '{entry.extra}' extra)")
        else:
            importlib.import_module(entry.module).add_parser(subparsers)
    return parser


def error_line(message: str) -> None:
    """Print the one-line error every failure ends with."""
    text = " ".join(str(message).split())
    print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgectl` console script; returns the exit code."""
    return guard_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    verbose = 0
    argv = sys.argv[1:] if argv is None else argv
    blocked = unavailable(argv)
    if blocked:
        print(needs_extra_line(*blocked), file=sys.stderr)
        return ExitCode.USAGE
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = getattr(args, "verbose", 0)
        logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                            format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "func", None) is None:
            parser.print_help()
            return ExitCode.USAGE
        resolve_settings = getattr(args, "resolve_settings", None)
        if resolve_settings is not None:  # options left out: from the environment, then the profile
            resolve_settings(args)
        return int(args.func(args) or ExitCode.OK)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (ExitCode.OK if exc.code is None else ExitCode.FAILURE)
    except EdgefleetError as exc:  # each kind carries its exit code (edgefleet/errors.py)
        error_line(str(exc))
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        error_line("interrupted; nothing was written")
        return exit_code(exc)
    except BrokenPipeError:  # the reader of the output went away: `main` ends quietly
        raise
    except Exception as exc:  # the last line of defence: one line, the traceback with -v
        error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
        if verbose:  # the hint names -v, so -v alone must be enough to get the traceback
            import traceback

            traceback.print_exc()
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
