"""Connection profiles: where each setting comes from (option > variable > profile > default), what a
profile file may hold, and the one line a mistake in it ends with."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edgefleet.converter.fleet.connect import add_broker_args, add_key_arg, broker_urls, settings_from_args
from edgefleet.converter.fleet.profiles import config_file, resolve
from edgefleet.errors import UsageError

PROFILES = """\
default = "lab"

[profiles.lab]
broker = ["mqtt://lab-1:1884", "mqtt://lab-2:1884"]
username = "op"
password_file = "lab.password"
key = "keys"
prefix = "lab"

[profiles.home]
broker = "mqtts://home.example"
ca = "/etc/ssl/home-ca.pem"
connect_timeout = 3
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = config_file()
    path.parent.mkdir(parents=True)
    path.write_text(PROFILES)
    (path.parent / "lab.password").write_text("s3cret\n")
    return path


def parse(*argv: str, key_required: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_key_arg(parser, "signing key", required=key_required)
    add_broker_args(parser)
    return parser.parse_args(argv)


def test_the_file_lives_under_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_file() == tmp_path / "edgefleet" / "edgectl.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_file() == tmp_path / "home" / ".config" / "edgefleet" / "edgectl.toml"


def test_the_default_profile_fills_what_no_option_gives(config: Path) -> None:
    args = parse()
    effective = resolve(args)
    assert (effective.profile, effective.profile_source) == ("lab", "default in the file")
    settings = settings_from_args(args)
    assert settings.urls == ("mqtt://lab-1:1884", "mqtt://lab-2:1884")
    assert (settings.username, settings.password) == ("op", "s3cret")
    # relative paths are the profile file's neighbours
    assert args.key == str(config.parent / "keys")
    assert args.prefix == "lab" and effective.values["prefix"] == ("lab", "profile lab")
    assert effective.values["connect_timeout"] == (10.0, "default")


def test_option_beats_variable_beats_profile(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_USERNAME", "from-env")
    monkeypatch.setenv("EDGEFLEET_PREFIX", "envprefix")
    monkeypatch.setenv("EDGEFLEET_BROKER", "mqtt://a:1, mqtt://b:2")
    args = parse("--prefix", "flagprefix")
    effective = resolve(args)
    assert effective.values["prefix"] == ("flagprefix", "--prefix")
    assert effective.values["username"] == ("from-env", "$EDGEFLEET_USERNAME")
    assert effective.values["password_file"][1] == "profile lab"
    assert broker_urls(args) == ["mqtt://a:1", "mqtt://b:2"]


def test_profile_chosen_by_option_then_variable(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_PROFILE", "home")
    effective = resolve(parse())
    assert (effective.profile, effective.profile_source) == ("home", "$EDGEFLEET_PROFILE")
    assert effective.values["connect_timeout"] == (3.0, "profile home")
    assert resolve(parse("--profile", "lab")).profile == "lab"


def test_no_broker_anywhere_says_what_to_configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(UsageError, match=r"no broker: give --broker URL, set \$EDGEFLEET_BROKER, or add a profile"):
        broker_urls(parse())


def test_a_required_key_may_come_from_the_profile(config: Path) -> None:
    assert parse(key_required=True).key is None  # checked once the profile is read, not by argparse
    assert resolve(parse(key_required=True)).value("key") == str(config.parent / "keys")
    with pytest.raises(UsageError, match="--key is required"):
        resolve(parse("--profile", "home", key_required=True))


@pytest.mark.parametrize(("text", "fragment"), [
    ("default = \"nope\"\n[profiles.a]\nbroker = \"mqtt://h\"\n", "default names profile 'nope'"),
    ("[profiles.a]\npassword = \"x\"\n", "unknown key 'password' (put it in a file and name that with password_file)"),
    ("[profiles.a]\nbroker = 5\n", "[profiles.a] broker: expected a broker url"),
    ("[profiles.a]\nconnect_timeout = -1\n", "expected seconds > 0"),
    ("[profiles.a]\nmqtt_protocol = \"4\"\n", "expected one of auto, 5, 3.1.1"),
    ("brokers = 1\n", "unknown key 'brokers'"),
    ("[profiles.a\n", "edgectl.toml: "),
])
def test_a_bad_file_is_one_clear_error(config: Path, text: str, fragment: str) -> None:
    config.write_text(text)
    with pytest.raises(UsageError) as err:
        resolve(parse())
    assert fragment in str(err.value) and str(config) in str(err.value)


def test_an_unknown_profile_lists_the_known_ones(config: Path) -> None:
    with pytest.raises(UsageError, match=r"--profile lob: no such profile in .* \(profiles: home, lab\)"):
        resolve(parse("--profile", "lob"))


def test_a_bad_variable_names_itself(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_CONNECT_TIMEOUT", "soon")
    with pytest.raises(UsageError, match=r"\$EDGEFLEET_CONNECT_TIMEOUT: expected seconds, got 'soon'"):
        resolve(parse())
    monkeypatch.delenv("EDGEFLEET_CONNECT_TIMEOUT")
    monkeypatch.setenv("EDGEFLEET_BROKER", "http://x")
    with pytest.raises(UsageError, match=r"^\$EDGEFLEET_BROKER: expected mqtt://"):
        broker_urls(parse())


def test_edgectl_asks_for_a_key_only_when_no_profile_gives_one(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefleet.converter.cli import main

    assert main(["rollback", "--device", "d", "--model", "m", "--profile", "home"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgectl: error: --key is required: give --key KEY, set $EDGEFLEET_KEY")
    # the lab profile's key is taken (and found missing on disk, before any connection)
    assert main(["rollback", "--device", "d", "--model", "m", "--profile", "lab"]) == 2
    assert capsys.readouterr().err.strip() == f"edgectl: error: --key {config.parent / 'keys'}: no such file or directory"
