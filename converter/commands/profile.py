"""`edgectl profile`: the connection profiles of edgectl.toml and the settings a command would use."""

from __future__ import annotations

import argparse
from typing import Any

from edgefleet.converter.fleet.connect import add_broker_args, add_key_arg
from edgefleet.converter.fleet.profiles import (
    RESOLVED,
    SETTINGS,
    Effective,
    ProfileFile,
    config_file,
    resolve,
)
from edgefleet.converter.output import add_json, command_group, print_json
from edgefleet.errors import ExitCode

PROFILE_EPILOG = """\
Profiles live in $XDG_CONFIG_HOME/edgefleet/edgectl.toml (~/.config/edgefleet/edgectl.toml without it):

  default = "lab"

  [profiles.lab]
  broker = ["mqtts://broker.lab:8884"]     # one url, or the nodes of a cluster
  ca = "lab-ca.pem"                        # relative paths: from the file's folder
  username = "edgefleet-operator"
  password_file = "lab.password"           # the password itself never goes in this file
  key = "keys"                             # signing key (file or keygen folder)
  # also: cert, key_file, prefix, mqtt_protocol, connect_timeout

Each setting comes from its option (--ca), else its environment variable (EDGEFLEET_CA, named after
the option), else the profile (--profile, else $EDGEFLEET_PROFILE, else default), else a built-in
default (prefix, MQTT version, connect timeout). There is no default broker.

examples:
  edgectl profile list
  edgectl profile show                     # the default profile, with where each value comes from
  edgectl profile show --profile lab --json
"""

SHOW_EPILOG = """\
One line per setting: its value and where it comes from (an option, $VARIABLE, 'profile NAME' or
'default'). A password file is shown by its path, never its contents.
"""


def add_parser(subparsers: Any) -> None:
    """Register `profile` with its commands: show, list."""
    profile_commands = command_group(subparsers, "profile", title="profile commands",
                                     help="connection profiles: list them, show the effective settings",
                                     description="The connection profiles of edgectl.toml.", epilog=PROFILE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    s = profile_commands.add_parser("show", help="the settings a command would use, and where each comes from",
                                    description="Print the effective connection settings with their sources.",
                                    epilog=SHOW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_key_arg(s, "operator signing key (file or keygen dir)")
    add_json(s)
    add_broker_args(s)
    s.set_defaults(func=run_profile_show)
    li = profile_commands.add_parser("list", help="the profiles of edgectl.toml", description="List the profiles.")
    add_json(li)
    li.set_defaults(func=run_profile_list)


def _shown(value: Any) -> Any:
    if isinstance(value, list):
        return ", ".join(value)
    return "" if value is None else value


def run_profile_show(args: argparse.Namespace) -> int:
    """edgectl profile show."""
    effective = getattr(args, RESOLVED, None)
    if not isinstance(effective, Effective):
        effective = resolve(args)
    if args.json:
        print_json({
            "file": str(effective.file), "profile": effective.profile, "profile_source": effective.profile_source or None,
            "settings": {name: {"value": value, "source": source or None}
                         for name, (value, source) in effective.values.items()},
        })
        return ExitCode.OK
    chosen = f"{effective.profile} ({effective.profile_source})" if effective.profile else "none"
    rows = [("file", str(effective.file), ""), ("profile", chosen, "")]
    for setting in SETTINGS:
        value, source = effective.values.get(setting.name, (None, ""))
        text = str(_shown(value)) or "(not set)"
        if setting.name == "password_file" and value is not None:
            text += " (contents not shown)"
        rows.append((setting.name, text, source))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    for name, text, source in rows:
        print(f"{name:<{width}}  {text:<{value_width}}  {source}".rstrip())
    return ExitCode.OK


def run_profile_list(args: argparse.Namespace) -> int:
    """edgectl profile list."""
    file = ProfileFile.load(config_file())
    if args.json:
        print_json({"file": str(file.path), "default": file.default,
                    "profiles": {name: {"broker": table.get("broker")} for name, table in file.profiles.items()}})
        return ExitCode.OK
    if not file.profiles:
        print(f"no profiles in {file.path} (see 'edgectl profile --help')")
        return ExitCode.OK
    for name, table in file.profiles.items():
        mark = "*" if name == file.default else " "
        print(f"{mark} {name}  {_shown(table.get('broker')) or '(no broker)'}")
    return ExitCode.OK
