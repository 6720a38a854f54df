#!/usr/bin/env bash
# What `make test` needs from the system rather than from the package index: Mosquitto and its clients
# (the integration tests start real brokers), systemd's tools (the unit file checks and the install
# staging), util-linux's setpriv and unshare, zsh and fish (the shell completion scripts are loaded
# into them), RabbitMQ (the tests run a private node of it: what `edgectl broker check` says of an
# engine edgefleet does not support), and Python's venv for the interpreter .venv is made from and for
# the distribution's own interpreter of that version (systemd/install.sh is staged with it).
#
# Run as root it installs what is missing with apt-get; run as anyone else it stops with one line
# naming what to install. Nothing is printed when everything is there.
#
# usage: deploy/system-deps.sh [PYTHON]    PYTHON: the interpreter make uses (default python3.11)
# SYSTEM_DEPS_PATH: where to look for the tools (default: $PATH, then /usr/sbin and /sbin, where Debian
# puts the broker and which an ordinary user's PATH lacks)
set -euo pipefail

python=${1:-python3.11}
search=${SYSTEM_DEPS_PATH:-$PATH:/usr/sbin:/sbin}
me=system-deps.sh

found() { PATH=$search command -v "$1" >/dev/null 2>&1; }

need=()
want() {  # want PACKAGE TOOL...: add the Debian PACKAGE when one of its TOOLs is missing
    local package=$1 tool
    shift
    for tool in "$@"; do
        if ! found "$tool"; then
            need+=("$package")
            return
        fi
    done
}
want mosquitto mosquitto mosquitto_passwd
want mosquitto-clients mosquitto_pub mosquitto_sub
want systemd systemd-analyze systemd-sysusers systemd-tmpfiles
want util-linux setpriv unshare
want zsh zsh
want fish fish
want rabbitmq-server rabbitmq-server

has_venv() { PATH=$search "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

if found "$python"; then
    version=$(PATH=$search "$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
elif [[ $python =~ python(3\.[0-9]+)$ ]]; then
    version=${BASH_REMATCH[1]}
else
    echo "$me: no Python at '$python': install Python 3.10 or 3.11, or name one with make PYTHON=..." >&2
    exit 1
fi
if ! { found "$python" && has_venv "$python" && has_venv "/usr/bin/python$version"; }; then
    need+=("python$version-venv")
fi

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "$me: make test needs ${need[*]}: run 'sudo apt-get install ${need[*]}' (or run make as root, which installs them)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$me: make test needs the Debian packages ${need[*]} and there is no apt-get here: install their equivalents" >&2
    exit 1
fi
echo "$me: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
