"""What `pip install edgefleet` puts on a machine, checked in clean virtual environments.

The wheel is built once, from a copy of the working tree (tests/support/wheel.py), then installed
without and with extras into fresh environments that hold nothing else, from outside the repository.
"""

from __future__ import annotations

import configparser
import email
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from tests.support.wheel import REPO, build_wheel

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
# Folders of the repository that must never become top-level names in site-packages.
REPO_FOLDERS = ("agent", "converter", "tests", "bench", "demo", "docs", "deploy", "systemd")
HOST_LIBRARIES = ("tensorflow", "keras", "rich", "scipy")


@dataclass(frozen=True)
class Install:
    extra: str
    venv: Path
    site: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args], capture_output=True, text=True, timeout=120, cwd=self.venv.parent)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel and the verbose build log (setuptools prints its warnings there)."""
    return build_wheel(tmp_path_factory.mktemp("packaging"), "--verbose")


@pytest.fixture(scope="module", params=["", "litert", "fleet"], ids=["base", "litert", "fleet"])
def install(request: pytest.FixtureRequest, built: tuple[Path, str],
            tmp_path_factory: pytest.TempPathFactory) -> Install:
    """A fresh environment with only edgefleet (and the extra) installed from the wheel."""
    wheel, _ = built
    extra = request.param
    venv = tmp_path_factory.mktemp(f"venv-{extra or 'base'}") / "venv"
    # No pip inside: site-packages then holds exactly what installing edgefleet brought.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    spec = f"{wheel}[{extra}]" if extra else str(wheel)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", spec],
                          capture_output=True, text=True, timeout=600, cwd=venv.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (site,) = venv.glob("lib/python3*/site-packages")
    return Install(extra, venv, site)


def dist_info(install: Install) -> Path:
    (found,) = install.site.glob("edgefleet-*.dist-info")
    return found


def console_scripts(install: Install) -> list[str]:
    entry_points = configparser.ConfigParser()
    entry_points.read(dist_info(install) / "entry_points.txt")
    return list(entry_points["console_scripts"])


def test_the_build_has_no_deprecation_warnings(built: tuple[Path, str]) -> None:
    _, log = built
    assert "running bdist_wheel" in log  # the log is setuptools' own output, not only pip's summary
    # pip shows a backend's warnings as BuildBackendWarning (e.g. "`project.license` as a TOML table is
    # deprecated"); setuptools' own name for them is SetuptoolsDeprecationWarning
    complaints = [line for line in log.splitlines()
                  if "BuildBackendWarning" in line or "DeprecationWarning" in line or "deprecated" in line.lower()]
    assert complaints == []


def test_only_edgefleet_goes_into_site_packages(install: Install) -> None:
    info = dist_info(install)
    assert info.name == f"edgefleet-{VERSION}.dist-info"
    bin_dir = (install.venv / "bin").resolve()
    for line in (info / "RECORD").read_text().splitlines():
        path = line.rsplit(",", 2)[0]
        top = path.split("/")[0]
        if top == "..":  # console scripts, recorded relative to site-packages
            assert (install.site / path).resolve().parent == bin_dir, path
        else:
            assert top in ("edgefleet", info.name), path
    present = {p.name for p in install.site.iterdir()}
    assert not present & set(REPO_FOLDERS)
    assert (install.site / "edgefleet" / "py.typed").is_file()
    assert (install.site / "edgefleet" / "agent" / "daemon.py").is_file()
    assert (install.site / "edgefleet" / "converter" / "cli.py").is_file()


def test_a_board_install_brings_no_host_libraries(install: Install) -> None:
    present = {p.name.split("-")[0].lower() for p in install.site.iterdir()}
    expected = {"fleet": {"rich"}}.get(install.extra, set())
    assert present & set(HOST_LIBRARIES) == expected
    if install.extra == "litert":
        assert "ai_edge_litert" in present


def test_version_and_license_metadata(install: Install) -> None:
    python = str(install.venv / "bin" / "python")
    probe = install.run(python, "-c", "import importlib.metadata as m, edgefleet; "
                                      "print(m.version('edgefleet')); print(edgefleet.__version__)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [VERSION, VERSION]

    info = dist_info(install)
    meta = email.message_from_string((info / "METADATA").read_text())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    assert (info / "licenses" / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()


def test_every_console_script_runs_or_names_its_extra(install: Install) -> None:
    scripts = console_scripts(install)
    assert {"edgectl", "edge-agent"} <= set(scripts)
    for name in scripts:
        script = str(install.venv / "bin" / name)
        helped = install.run(script, "--help")
        if helped.returncode == 0:
            assert helped.stdout.startswith(f"usage: {name}"), helped.stdout
        else:
            assert len(helped.stderr.splitlines()) == 1 and "extra" in helped.stderr, helped.stderr
        version = install.run(script, "--version")
        assert (version.returncode, version.stdout) == (0, f"{name} {VERSION}\n"), version.stderr


def edgectl_commands(install: Install) -> list[str]:
    helped = install.run(str(install.venv / "bin" / "edgectl"), "--help")
    lines = helped.stdout.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split()[0] for line in lines[1:] if line.startswith("    ") and not line.startswith("     ")]


def test_each_edgectl_command_runs_or_names_its_extra(install: Install) -> None:
    edgectl = str(install.venv / "bin" / "edgectl")
    commands = edgectl_commands(install)
    assert {"convert", "push", "fleet", "inventory"} <= set(commands)
    refused: dict[str, str] = {}
    for command in commands:
        helped = install.run(edgectl, command, "--help")
        if helped.returncode == 0:
            assert helped.stdout.startswith(f"usage: edgectl {command}"), helped.stdout
            continue
        assert helped.returncode == 2 and helped.stdout == "", helped.stdout + helped.stderr
        (line,) = helped.stderr.splitlines()
        extra = line.split("'")[1]
        assert line == f"edgectl {command}: needs the '{extra}' extra: pip install 'edgefleet[{extra}]'"
        refused[command] = extra
    # The model commands need TensorFlow everywhere here; the fleet commands work once `fleet` is in.
    assert refused["convert"] == "converter"
    if install.extra == "fleet":
        assert set(refused.values()) == {"converter"} and "push" not in refused
    else:  # all but `completion`, which needs no extra
        assert refused["push"] == "fleet" and set(refused) == set(commands) - {"completion"}


def test_completion_needs_no_extra(install: Install) -> None:
    # a board's edgectl and edge-agent print their scripts too; a command without its extra is in the
    # script by name, with no options
    for program, function in (("edgectl", "_edgectl"), ("edge-agent", "_edge_agent")):
        done = install.run(str(install.venv / "bin" / program), "completion", "bash")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert f"complete -F {function} {program}" in done.stdout
    assert "'convert package inspect diff keygen push" in install.run(
        str(install.venv / "bin" / "edgectl"), "completion", "bash").stdout


def test_keygen_writes_keys_only_with_its_extra(install: Install, tmp_path: Path) -> None:
    out = tmp_path / "keys"
    done = install.run(str(install.venv / "bin" / "edgectl"), "-v", "keygen", "-o", str(out))
    if install.extra == "fleet":
        assert done.returncode == 0, done.stderr
        assert (out / "edgefleet.key").is_file() and (out / "edgefleet.pub").is_file()
    else:
        assert done.returncode == 2
        assert done.stderr == "edgectl keygen: needs the 'fleet' extra: pip install 'edgefleet[fleet]'\n"
        assert not out.exists()
