#!/usr/bin/env bash
# Install the edgefleet device agent on a board as a systemd service (or stage it into an image).
# Run with --help for the options. Safe to run again: it upgrades in place and keeps the config.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)

PREFIX=/opt/edge-agent
VENV=$PREFIX/venv
EXAMPLES=$PREFIX/examples
UNIT_NAME=edge-agent.service
UNIT=/usr/lib/systemd/system/$UNIT_NAME
WANTS=/etc/systemd/system/multi-user.target.wants/$UNIT_NAME
DROPINS=/etc/systemd/system/$UNIT_NAME.d
SYSUSERS=/usr/lib/sysusers.d/edge-agent.conf
TMPFILES=/usr/lib/tmpfiles.d/edge-agent.conf
CONF_DIR=/etc/edge-agent
STATE_DIR=/var/lib/edge-agent
MIN_PYTHON=3.10

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]

Install the edgefleet device agent as the systemd service edge-agent:
  $VENV                        the agent and one interpreter backend
  $EXAMPLES/                   example config and drop-ins
  $UNIT  the unit (change it with: systemctl edit edge-agent)
  $SYSUSERS         the edge-agent system user and group
  $TMPFILES         ownership of $CONF_DIR
  $CONF_DIR/agent.toml                  configuration, written only if absent
  $CONF_DIR/keys/                       trusted public keys
then systemctl daemon-reload, enable and (re)start edge-agent. Running it again upgrades the agent
(or keeps it when the wheelhouse, backend and Python are unchanged) and never touches an existing
agent.toml. A failed install leaves the previous one in place.

Options:
  --backend litert|tflite  interpreter backend (default litert; tflite-runtime: Python <= 3.11, numpy < 2)
  --wheels DIR             install offline from a wheelhouse (pip --no-index --find-links DIR)
  --source PATH            the edgefleet wheel or project directory (default: the wheelhouse given
                           with --wheels, else the project directory this script belongs to)
  --python PATH            Python ($MIN_PYTHON or newer) that runs the agent (default python3)
  --root DIR               stage everything under DIR (an image or a test directory): no systemctl,
                           no user creation on this host (sysusers.d and tmpfiles.d do it at first
                           boot); the unit is enabled in DIR unless --no-start. The venv is built with
                           --python, which must be the same Python version as the image's.
  --no-start               install, but neither enable nor start the service
  --uninstall              stop and remove the service and $PREFIX; keep $CONF_DIR and $STATE_DIR
  --purge                  with --uninstall: also remove $CONF_DIR, $STATE_DIR and local drop-ins
  -h, --help               this help

Exit status: 0 done, 1 the install failed or the machine is not fit (not root, Python too old,
systemd absent), 2 bad options.

Examples:
  sudo ./install.sh --wheels ./wheelhouse            # offline, from a wheelhouse built on a workstation
  sudo ./install.sh --backend tflite --no-start      # from this project directory, start later
  ./install.sh --root /srv/image --wheels ./wheelhouse --python /srv/image/usr/bin/python3
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
usage_error() { echo "$PROG: $*" >&2; echo "Try '$PROG --help'." >&2; exit 2; }
say() { echo "$PROG: $*"; }

BACKEND=litert
WHEELS=""
SOURCE=""
PYTHON=python3
ROOT=""
NO_START=0
UNINSTALL=0
PURGE=0

need_arg() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "option $1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) need_arg "$@"; BACKEND=$2; shift 2 ;;
        --backend=*) BACKEND=${1#*=}; shift ;;
        --wheels) need_arg "$@"; WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#*=}; shift ;;
        --source) need_arg "$@"; SOURCE=$2; shift 2 ;;
        --source=*) SOURCE=${1#*=}; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --root) need_arg "$@"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --no-start) NO_START=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown option: $1" ;;
    esac
done

case "$BACKEND" in
    litert) BACKEND_MODULE=ai_edge_litert.interpreter ;;
    tflite) BACKEND_MODULE=tflite_runtime.interpreter ;;
    *) usage_error "--backend must be litert or tflite, not '$BACKEND'" ;;
esac
[ "$PURGE" -eq 0 ] || [ "$UNINSTALL" -eq 1 ] || usage_error "--purge only goes with --uninstall"
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || usage_error "--root: no such directory: $ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=""
fi
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || usage_error "--wheels: no such directory: $WHEELS"
    WHEELS=$(cd "$WHEELS" && pwd)
fi
if [ -n "$SOURCE" ]; then
    [ -e "$SOURCE" ] || usage_error "--source: no such file or directory: $SOURCE"
    SOURCE=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")
fi

STAGED=0
[ -z "$ROOT" ] || STAGED=1

# --- is this machine fit? (checked before anything is changed) ---------------------------------------

if [ "$STAGED" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "must run as root (try: sudo $0 ...), or stage into a directory with --root DIR"
fi

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

if [ "$UNINSTALL" -eq 0 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "Python not found: $PYTHON (use --python PATH)"
    PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || die "cannot run $PYTHON"
    [[ "$PY_VERSION" =~ ^[0-9]+\.[0-9]+$ ]] || die "cannot tell the version of $PYTHON (it printed '$PY_VERSION')"
    py_major=${PY_VERSION%%.*}
    py_minor=${PY_VERSION#*.}
    if [ "$py_major" -lt 3 ] || { [ "$py_major" -eq 3 ] && [ "$py_minor" -lt 10 ]; }; then
        die "Python $MIN_PYTHON or newer is required; $PYTHON is $PY_VERSION (use --python PATH)"
    fi
    if [ "$BACKEND" = tflite ] && [ "$py_major" -eq 3 ] && [ "$py_minor" -ge 12 ]; then
        die "tflite-runtime has no wheels for Python $PY_VERSION (3.11 at most); use --backend litert"
    fi
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "$PYTHON cannot create virtual environments (Debian/Ubuntu: apt install python3-venv)"
    if [ "$STAGED" -eq 0 ]; then
        if [ "$NO_START" -eq 0 ] && ! systemd_running; then
            die "systemd is not running on this machine (no /run/systemd/system or systemctl); use --no-start to install without starting, or --root DIR to stage"
        fi
        for tool in systemd-sysusers systemd-tmpfiles; do
            command -v "$tool" >/dev/null 2>&1 || die "$tool not found: this installer needs systemd"
        done
    fi
fi

# --- uninstall --------------------------------------------------------------------------------------

if [ "$UNINSTALL" -eq 1 ]; then
    if [ "$STAGED" -eq 0 ] && systemd_running; then
        systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$ROOT$PREFIX"
    rm -f "$ROOT$UNIT" "$ROOT$WANTS" "$ROOT$SYSUSERS" "$ROOT$TMPFILES"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$ROOT$CONF_DIR" "$ROOT$STATE_DIR" "$ROOT/var/lib/private/edge-agent" "$ROOT$DROPINS"
        say "removed the agent, its configuration and its state"
    else
        say "removed the agent; kept $CONF_DIR and $STATE_DIR (remove them with --uninstall --purge)"
    fi
    if [ "$STAGED" -eq 0 ] && systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT_NAME" >/dev/null 2>&1 || true
    fi
    # The edge-agent user stays: deleting a system user lets a later one reuse its id and inherit
    # whatever files it still owns.
    exit 0
fi

# --- what to install --------------------------------------------------------------------------------

PIP_ARGS=(--quiet --disable-pip-version-check --no-compile)
[ -z "$WHEELS" ] || PIP_ARGS+=(--no-index --find-links "$WHEELS")
if [ -z "$SOURCE" ]; then
    if [ -n "$WHEELS" ]; then
        SOURCE=$WHEELS
    elif [ -f "$SCRIPT_DIR/../pyproject.toml" ]; then
        SOURCE=$(cd "$SCRIPT_DIR/.." && pwd)
    else
        usage_error "no edgefleet source: give --wheels DIR or --source PATH"
    fi
fi
if [ -f "$SOURCE" ]; then
    case "$SOURCE" in
        *.whl) SPEC="${SOURCE}[$BACKEND]" ;;
        *) usage_error "--source: not a wheel (.whl) or directory: $SOURCE" ;;
    esac
elif [ -f "$SOURCE/pyproject.toml" ]; then
    SPEC="${SOURCE}[$BACKEND]"
else
    compgen -G "$SOURCE/edgefleet-*.whl" >/dev/null \
        || usage_error "no edgefleet wheel in $SOURCE (build one with: pip wheel . --no-deps -w $SOURCE)"
    [ "$SOURCE" = "$WHEELS" ] || PIP_ARGS+=(--find-links "$SOURCE")
    SPEC="edgefleet[$BACKEND]"
fi

# The unit, sysusers/tmpfiles entries and examples come from this script's directory.
for f in edge-agent.service agent.toml sysusers.conf tmpfiles.conf; do
    [ -f "$SCRIPT_DIR/$f" ] || die "$SCRIPT_DIR/$f is missing: run the script from the edgefleet systemd/ directory"
done

# --- build the new virtual environment next to the old one, then swap ---------------------------------

# The venv is built at venv.new and renamed to venv only once it imports: a failed install (no
# network, a missing wheel) leaves the running agent's venv untouched. Paths the venv records (script
# shebangs, pyvenv.cfg, compiled files) are rewritten from the build location to the one it runs at.
# A re-run with the same wheels, backend, Python and installer keeps the environment it built before
# (recorded in venv/.edgefleet-install): re-running is cheap and changes nothing. Installs from a
# project directory are always rebuilt, since its content is not pinned.
FINGERPRINT=""
if [ -n "$WHEELS" ] && { [ "$SOURCE" = "$WHEELS" ] || [ -f "$SOURCE" ]; }; then
    FINGERPRINT=$(
        echo "backend=$BACKEND python=$(command -v "$PYTHON") $("$PYTHON" -c 'import sys; print(sys.version)' | head -1)"
        sha256sum "$0"
        cd "$WHEELS" && find . -maxdepth 1 -name '*.whl' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
        [ ! -f "$SOURCE" ] || sha256sum "$SOURCE"
    )
    FINGERPRINT=$(echo "$FINGERPRINT" | sha256sum | cut -d' ' -f1)
fi

build_venv() {
    STAGE=$ROOT$VENV.new
    cleanup() { rm -rf "$STAGE"; }
    trap cleanup EXIT

    mkdir -p "$ROOT$PREFIX"
    rm -rf "$STAGE"
    say "creating the virtual environment with $PYTHON ($PY_VERSION)"
    "$PYTHON" -m venv "$STAGE" || die "cannot create a virtual environment at $STAGE"
    # ensurepip compiled pip and setuptools with the build location in their .pyc files; the agent never
    # imports them, so they stay uncompiled (see compileall below).
    find "$STAGE/lib" -name __pycache__ -prune -exec rm -rf {} +
    say "installing $SPEC${WHEELS:+ from $WHEELS}"
    "$STAGE/bin/python" -m pip install "${PIP_ARGS[@]}" "$SPEC" \
        || die "pip could not install $SPEC${WHEELS:+ from $WHEELS} (is the wheelhouse built for this board's platform and Python $PY_VERSION?)"
    "$STAGE/bin/python" -B - "$BACKEND_MODULE" <<'PY' || die "the new environment is unusable (see above); nothing was changed"
import importlib, importlib.util, sys
import agent  # noqa: F401
importlib.import_module(sys.argv[1])
# Boards never get TensorFlow: the agent serves with LiteRT or tflite-runtime alone.
if importlib.util.find_spec("tensorflow") is not None:
    sys.exit("TensorFlow was pulled into the agent's environment")
PY

    "$PYTHON" - "$STAGE" "$VENV" "$ROOT" <<'PY' || die "cannot relocate the virtual environment"
import os, sys
from pathlib import Path

stage, final, root = sys.argv[1:4]
venv = Path(stage)
for p in (venv / "bin").iterdir():
    if p.is_symlink():
        target = os.readlink(p)
        if root and target.startswith(root + "/"):
            p.unlink()
            p.symlink_to(target[len(root):])
        continue
    data = p.read_bytes()
    if b"\0" not in data[:4096] and stage.encode() in data:
        p.write_bytes(data.replace(stage.encode(), final.encode()))
cfg = venv / "pyvenv.cfg"
lines = []
for line in cfg.read_text().splitlines():
    line = line.replace(stage, final)
    key, sep, value = line.partition(" = ")
    if root and sep and value.startswith(root + "/"):
        line = f"{key}{sep}{value[len(root):]}"
    lines.append(line)
cfg.write_text("\n".join(lines) + "\n")
PY
    # Compiled now, since ProtectSystem=strict keeps the agent from writing __pycache__ at run time.
    # A file that does not compile (some packages ship templates or test data as .py) is not an error.
    "$PYTHON" -m compileall -q -j 0 -x '/site-packages/(pip|setuptools|_distutils_hack)/' \
        -s "$STAGE" -p "$VENV" "$STAGE/lib" >/dev/null 2>&1 \
        || say "warning: some modules could not be compiled ahead of time"

    echo "$FINGERPRINT" > "$STAGE/.edgefleet-install"
    if [ -e "$ROOT$VENV" ]; then
        rm -rf "$ROOT$VENV.old"
        mv "$ROOT$VENV" "$ROOT$VENV.old"
    fi
    mv "$STAGE" "$ROOT$VENV"
    rm -rf "$ROOT$VENV.old"
    trap - EXIT
}

if [ -n "$FINGERPRINT" ] && [ -f "$ROOT$VENV/pyvenv.cfg" ] \
        && [ "$(cat "$ROOT$VENV/.edgefleet-install" 2>/dev/null)" = "$FINGERPRINT" ]; then
    say "the agent's environment is up to date (same wheels, backend and Python): kept"
else
    build_venv
fi

# --- unit, user, configuration ------------------------------------------------------------------------

install -D -m 0644 "$SCRIPT_DIR/edge-agent.service" "$ROOT$UNIT"
install -D -m 0644 "$SCRIPT_DIR/sysusers.conf" "$ROOT$SYSUSERS"
install -D -m 0644 "$SCRIPT_DIR/tmpfiles.conf" "$ROOT$TMPFILES"
install -d -m 0755 "$ROOT$EXAMPLES"
install -m 0644 "$SCRIPT_DIR/agent.toml" "$ROOT$EXAMPLES/agent.toml"
for f in "$SCRIPT_DIR"/edge-agent.service.d/*.example; do
    [ -e "$f" ] && install -m 0644 "$f" "$ROOT$EXAMPLES/"
done
[ ! -f "$SCRIPT_DIR/../docs/install.md" ] || install -m 0644 "$SCRIPT_DIR/../docs/install.md" "$ROOT$EXAMPLES/install.md"

if [ "$STAGED" -eq 0 ]; then
    systemd-sysusers "$SYSUSERS" || die "systemd-sysusers could not create the edge-agent user"
fi
install -d -m 0750 "$ROOT$CONF_DIR" "$ROOT$CONF_DIR/keys"
if [ -e "$ROOT$CONF_DIR/agent.toml" ]; then
    say "kept the existing $CONF_DIR/agent.toml (the current example is $EXAMPLES/agent.toml)"
else
    install -m 0640 "$SCRIPT_DIR/agent.toml" "$ROOT$CONF_DIR/agent.toml"
    say "wrote the example $CONF_DIR/agent.toml: set mqtt.url and the keys there"
    # The shipped broker config knows a board by one name (its broker user or certificate CN), which
    # must be the board's device_id; a credential made for another name does not work.
    say "the board's broker user name (or client certificate CN) must be its device_id (default: the host name)"
fi
if [ "$STAGED" -eq 0 ]; then
    # Ownership root:edge-agent of the config directory, as at every boot.
    systemd-tmpfiles --create "$TMPFILES" || die "systemd-tmpfiles could not set up $CONF_DIR"
fi

# --- enable and start ---------------------------------------------------------------------------------

if [ "$STAGED" -eq 1 ]; then
    if [ "$NO_START" -eq 0 ]; then
        mkdir -p "$(dirname "$ROOT$WANTS")"
        ln -sfn "$UNIT" "$ROOT$WANTS"
        say "staged into $ROOT; edge-agent starts at its first boot"
    else
        say "staged into $ROOT; enable it in the image with: systemctl --root=DIR enable edge-agent"
    fi
    exit 0
fi

if [ "$NO_START" -eq 1 ]; then
    systemd_running && systemctl daemon-reload
    say "installed; start it with: systemctl enable --now edge-agent"
    exit 0
fi
systemctl daemon-reload
systemctl enable "$UNIT_NAME" >/dev/null 2>&1 || die "systemctl enable $UNIT_NAME failed"
# restart, not start: an upgrade must replace a running agent with the new code.
if ! systemctl restart "$UNIT_NAME"; then
    # Exit status 2 is a configuration the agent refuses (fail closed, e.g. no trusted key yet): the
    # install itself is done, and the unit does not restart in a loop (RestartPreventExitStatus=2).
    if [ "$(systemctl show -p ExecMainStatus --value "$UNIT_NAME" 2>/dev/null)" = "2" ]; then
        say "installed, but edge-agent refuses its configuration (journalctl -u edge-agent says why);"
        say "list the fleet's public key in security.trusted_keys of $CONF_DIR/agent.toml, then: systemctl restart edge-agent"
        exit 0
    fi
    die "edge-agent did not start; see: systemctl status edge-agent; journalctl -u edge-agent"
fi
say "edge-agent is running; check: systemctl status edge-agent; journalctl -u edge-agent -f"
