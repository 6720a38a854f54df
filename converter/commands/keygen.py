"""`edgectl keygen -o DIR`: a new Ed25519 signing key pair."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefleet.converter.output import add_json, print_json, stdout_console
from edgefleet.errors import UsageError


def add_parser(subparsers: Any) -> None:
    """Register `keygen`."""
    p = subparsers.add_parser(
        "keygen", help="create an Ed25519 key pair for signing bundles",
        description="Create DIR/edgefleet.key (private, mode 0600) and DIR/edgefleet.pub (public). "
                    "Existing keys are never overwritten. Give the private key to 'convert/package --key' "
                    "and the public key to the agents' [security] trusted keys.",
        epilog="example:\n  edgectl keygen -o keys/ && edgectl convert m.keras -o b --key keys/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the key files")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and write the key pair."""
    from edgefleet.protocol import SigningKey

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a directory; keygen writes edgefleet.key and "
                         "edgefleet.pub into a directory and never overwrites a file")
    blocker = next((q for q in out.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"-o {out}: {blocker} is a file, not a directory")
    key = SigningKey.generate()
    try:
        private, public = key.write(out)
    except OSError as err:
        raise UsageError(f"-o {out}: {err.strerror or err}") from err
    result = {"key_id": key.key_id, "private_key": str(private), "public_key": str(public)}
    if args.json:
        print_json(result)
    else:
        console = stdout_console()
        console.print(f"key id [bold]{key.key_id}[/bold]")
        console.print(f"private key {private} (mode 0600: keep it secret)")
        console.print(f"public key  {public} (install on the agents)")
    return 0
