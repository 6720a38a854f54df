"""Connection profiles: `edgectl.toml` in the user's configuration folder, and where each setting comes from.

    default = "lab"

    [profiles.lab]
    broker = ["mqtts://broker.lab:8884"]      # or one string; several urls are the nodes of a cluster
    ca = "lab-ca.pem"                         # relative paths: from this file's folder
    username = "edgefleet-operator"
    password_file = "lab.password"
    key = "keys"                              # the signing key (file or keygen folder)

Every setting is taken from, in this order: its option (`--ca`), its environment variable
(`EDGEFLEET_CA`), the profile (`--profile`, else `$EDGEFLEET_PROFILE`, else `default`), and a
built-in default where one is safe (the topic prefix, the MQTT version, the connect timeout). The
broker has no default: a command that talks MQTT without one says what to configure.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from edgefleet.errors import UsageError
from edgefleet.protocol import DEFAULT_PREFIX

CONFIG_NAME = "edgectl.toml"
ENV_PROFILE = "EDGEFLEET_PROFILE"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
PROTOCOLS = ("auto", "5", "3.1.1")
RESOLVED = "profile_settings"
"""The attribute of the parsed arguments that holds the `Effective` settings once resolved."""


@dataclass(frozen=True)
class Setting:
    """One setting: its option, environment variable and profile key (the option's name with '_')."""

    option: str
    kind: str = "text"
    """text, path (a file or folder: relative names in a profile are from the profile's folder),
    urls (a list; a comma-separated environment variable), protocol or seconds."""
    default: Any = None

    @property
    def name(self) -> str:
        """The profile key and the argparse dest."""
        return self.option.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable."""
        return f"EDGEFLEET_{self.name.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("--broker", "urls"),
    Setting("--ca", "path"),
    Setting("--cert", "path"),
    Setting("--key-file", "path"),
    Setting("--username"),
    Setting("--password-file", "path"),
    Setting("--key", "path"),
    Setting("--prefix", default=DEFAULT_PREFIX),
    Setting("--mqtt-protocol", "protocol", default="auto"),
    Setting("--connect-timeout", "seconds", default=DEFAULT_CONNECT_TIMEOUT_S),
)
BY_NAME = {s.name: s for s in SETTINGS}


def config_file() -> Path:
    """`$XDG_CONFIG_HOME/edgefleet/edgectl.toml`, `~/.config/edgefleet/edgectl.toml` without it."""
    base = os.environ.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "edgefleet" / CONFIG_NAME


@dataclass(frozen=True)
class ProfileFile:
    """The profiles of one file and the one it names as the default."""

    path: Path
    profiles: dict[str, dict[str, Any]]
    default: str | None = None

    @classmethod
    def load(cls, path: Path) -> ProfileFile:
        """Read and check the file (an absent file has no profiles); UsageError naming the key that is wrong."""
        if not path.exists():
            return cls(path, {})
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise UsageError(f"{path}: {err}") from err
        unknown = sorted(set(raw) - {"default", "profiles"})
        if unknown:
            raise UsageError(f"{path}: unknown key {unknown[0]!r} (expected default and [profiles.NAME] tables)")
        default, tables = raw.get("default"), raw.get("profiles", {})
        if default is not None and not isinstance(default, str):
            raise UsageError(f"{path}: default: expected a profile name, got {default!r}")
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise UsageError(f"{path}: profiles: expected [profiles.NAME] tables")
        profiles = {name: _checked(path, name, table) for name, table in tables.items()}
        if default is not None and default not in profiles:
            raise UsageError(f"{path}: default names profile {default!r}, which the file does not define")
        return cls(path, profiles, default)


def _checked(path: Path, profile: str, table: dict[str, Any]) -> dict[str, Any]:
    """A profile's values, paths made absolute; UsageError naming the key."""
    where = f"{path}: [profiles.{profile}]"
    out: dict[str, Any] = {}
    for key, value in table.items():
        setting = BY_NAME.get(key)
        if setting is None:
            hint = " (put it in a file and name that with password_file)" if key == "password" else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(BY_NAME)}")
        out[key] = _value(setting, value, f"{where} {key}", base=path.parent)
    return out


def _value(setting: Setting, value: Any, where: str, base: Path | None = None) -> Any:
    """A setting's value checked (and a profile's path made absolute); UsageError naming `where`."""
    if setting.kind == "urls":
        urls = [value] if isinstance(value, str) else value
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise UsageError(f"{where}: expected a broker url or a list of them, got {value!r}")
        return [u.strip() for u in urls]
    if setting.kind == "seconds":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UsageError(f"{where}: expected seconds, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{where}: expected seconds > 0, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: expected a string, got {value!r}")
    if setting.kind == "protocol" and value not in PROTOCOLS:
        raise UsageError(f"{where}: expected one of {', '.join(PROTOCOLS)}, got {value!r}")
    if setting.kind == "path" and base is not None:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)
    return value


@dataclass(frozen=True)
class Effective:
    """The settings a command uses, each with where it came from."""

    file: Path
    profile: str | None
    profile_source: str
    values: dict[str, tuple[Any, str]]
    """Per setting name: (value, source), the source an option, `$VARIABLE`, `profile NAME` or `default`."""

    def value(self, name: str) -> Any:
        """A setting's value (None when nothing sets it)."""
        return self.values.get(name, (None, ""))[0]


def _choose_profile(args: argparse.Namespace, file: ProfileFile) -> tuple[str | None, str]:
    """The profile in use and what chose it: --profile, $EDGEFLEET_PROFILE, or the file's default."""
    for name, source in ((getattr(args, "profile", None), "--profile"),
                         (os.environ.get(ENV_PROFILE, "").strip() or None, f"${ENV_PROFILE}")):
        if name is None:
            continue
        if name not in file.profiles:
            known = f"profiles: {', '.join(sorted(file.profiles))}" if file.profiles else "it has no profiles"
            raise UsageError(f"{source} {name}: no such profile in {file.path} ({known})")
        return name, source
    return (file.default, "default in the file") if file.default else (None, "")


def resolve(args: argparse.Namespace) -> Effective:
    """Fill each setting of the parsed arguments from its option, variable, profile or default (once; the
    result is kept on `args`); UsageError naming what is wrong."""
    done = getattr(args, RESOLVED, None)
    if isinstance(done, Effective):
        return done
    file = ProfileFile.load(config_file())
    name, chosen_by = _choose_profile(args, file)
    profile = file.profiles.get(name, {}) if name else {}
    values: dict[str, tuple[Any, str]] = {}
    for s in SETTINGS:
        if not hasattr(args, s.name):
            continue  # the command has no such option (only fleet commands sign)
        given = getattr(args, s.name)
        env = os.environ.get(s.env, "").strip()
        if given is not None:
            value, source = given, s.option
        elif env:
            value, source = _value(s, [u for u in env.split(",") if u.strip()] if s.kind == "urls" else env,
                                   f"${s.env}"), f"${s.env}"
        elif s.name in profile:
            value, source = profile[s.name], f"profile {name}"
        else:
            value, source = s.default, "default" if s.default is not None else ""
        setattr(args, s.name, value)
        values[s.name] = (value, source)
    effective = Effective(file.path, name, chosen_by, values)
    setattr(args, RESOLVED, effective)
    if getattr(args, "key_required", False) and args.key is None:
        raise UsageError(f"--key is required: give --key KEY, set ${BY_NAME['key'].env}, or set key in a profile "
                         f"of {file.path}")
    return effective


def add_profile_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--profile NAME."""
    parser.add_argument("--profile", metavar="NAME",
                        help=f"the connection profile of {CONFIG_NAME} to use (default: ${ENV_PROFILE}, else the "
                             f"file's default; see 'edgectl profile --help')")
