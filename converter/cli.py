"""`edgectl`, the host command line: convert, package, inspect, diff and keygen (more plug in).

Each command lives in its own module exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (``args -> int``). Command modules import nothing heavy at module level:
TensorFlow is loaded inside ``convert`` only, so the other commands start fast.

Exit codes: 0 success; 1 failure (conversion, runtime, I/O); 2 bad input (files, options, data, a
tampered bundle; nothing is written); 3 the accuracy gate tripped (no bundle written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from edgefleet.converter.errors import (
    EXIT_FAILURE,
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    AccuracyGateError,
    UsageError,
)

from edgefleet.errors import ConfigError, EdgefleetError, ProtocolError

log = logging.getLogger(__name__)

PROG = "edgectl"
# Command modules, in the order `edgectl --help` lists them.
COMMAND_MODULES: list[str] = [
    "edgefleet.converter.commands.convert",
    "edgefleet.converter.commands.package",
    "edgefleet.converter.commands.inspect",
    "edgefleet.converter.commands.diff",
    "edgefleet.converter.commands.keygen",
    "edgefleet.converter.commands.mqtt",
    "edgefleet.converter.commands.trust",
]

EPILOG = """\
exit codes:
  0  success
  1  failure (conversion, runtime or I/O error)
  2  bad input: missing or corrupt file, data that does not fit the model, bad option,
     tampered bundle; nothing is written
  3  the accuracy gate refused the conversion: the drop's confidence interval lies above
     --max-accuracy-drop, or an agreement check failed; no bundle is written

Run 'edgectl COMMAND --help' for a command's options and examples.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 through `main`), not usage + message."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> ArgumentParser:
    """The top-level parser with every command module's subcommand registered."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version("edgefleet")
    except PackageNotFoundError:
        own_version = "unknown"
    parser = ArgumentParser(
        prog=PROG,
        description="Turn trained models into small, validated, signed bundles and manage them on a fleet.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {own_version}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def error_line(message: str) -> None:
    """Print the one-line error every failure ends with."""
    text = " ".join(str(message).split())
    print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgectl` console script; returns the exit code."""
    verbose = 0
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                            format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "func", None) is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args) or EXIT_OK)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_FAILURE)
    except AccuracyGateError as exc:
        error_line(str(exc))
        return EXIT_GATE
    except (UsageError, ProtocolError, ConfigError) as exc:
        error_line(str(exc))
        return EXIT_USAGE
    except EdgefleetError as exc:
        error_line(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        error_line("interrupted; nothing was written")
        return 130
    except Exception as exc:  # the last line of defence: one line, the traceback with -v
        error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
        if verbose:  # the hint names -v, so -v alone must be enough to get the traceback
            import traceback

            traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
