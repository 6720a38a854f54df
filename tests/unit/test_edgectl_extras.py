"""edgectl's table of command modules and extras, and the one line a command without its extra prints.

The clean installs that really lack the extras are in tests/e2e/test_packaging.py.
"""

from __future__ import annotations

import argparse
import importlib
from importlib import metadata

import pytest

from edgefleet.converter import cli
from edgefleet.converter.cli import COMMAND_MODULES, DISTRIBUTION, main, needs_extra_line, unavailable


@pytest.mark.parametrize("entry", COMMAND_MODULES, ids=lambda entry: entry.module.rsplit(".", 1)[-1])
def test_table_lists_what_each_module_registers(entry: cli.CommandModule) -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    importlib.import_module(entry.module).add_parser(subparsers)
    assert tuple(subparsers.choices) == entry.commands


def test_every_extra_named_is_an_extra_of_the_distribution() -> None:
    extras = set(metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or [])
    assert {entry.extra for entry in COMMAND_MODULES if entry.extra} <= extras


def test_installed_extras_are_found() -> None:
    # the suite's environment installs every extra (Makefile)
    assert cli.missing_requirements("converter") == []
    assert cli.missing_requirements("fleet") == []
    assert cli.missing_requirements("no-such-extra") == []


def test_a_missing_extra_is_read_from_the_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.distribution

    def without_rich(name: str) -> metadata.Distribution:
        if name == "rich":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(cli.metadata, "distribution", without_rich)
    assert cli.missing_requirements("fleet") == ["rich"]
    assert cli.missing_requirements("converter") == ["rich"]
    assert unavailable(["-v", "push", "bundles/x", "--group", "lab"]) == ("push", "fleet")
    assert unavailable(["convert", "--help"]) == ("convert", "converter")
    assert unavailable(["--help"]) is None
    assert unavailable(["--version"]) is None


def test_main_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "missing_requirements", lambda extra: ["tensorflow"] if extra == "converter" else [])
    assert main(["convert", "model.keras", "-o", "out"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == needs_extra_line("convert", "converter") + "\n"
    assert err == "edgectl convert: needs the 'converter' extra: pip install 'edgefleet[converter]'\n"

    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "convert      (not installed: needs the 'converter' extra)" in listing
    assert "push         publish a bundle" in listing
