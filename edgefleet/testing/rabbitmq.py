"""A private RabbitMQ node with its MQTT plugin (`rabbitmq_mqtt`), started by the kit on free ports.

RabbitMQ 3.10 is an engine edgefleet does not support: its MQTT plugin sends no retained message to a
wildcard subscription, and agents find their documents through `models/+`. The suite runs a real one
so that `edgectl broker check` is shown to catch it, not a look-alike that behaves as we believe it does.

The node is the distribution's RabbitMQ (Debian's `rabbitmq-server`; deploy/system-deps.sh installs it)
run as a child process, never the system service: its own node name (`edgefleet-<port>@localhost`),
AMQP, Erlang distribution and MQTT ports on 127.0.0.1, its own Mnesia directory (retained messages
live there, so a restart keeps them), logs, enabled-plugins file, configuration and Erlang cookie
(HOME), all in its work directory. The server is started through /usr/lib/rabbitmq/bin/rabbitmq-server
(the /usr/sbin wrapper switches to the rabbitmq user) in an environment of its own, so that neither the
system node's /etc/rabbitmq nor the caller's RABBITMQ_* or ERL_* variables reach it.
`EDGEFLEET_RABBITMQ_SERVER` names another installation's rabbitmq-server script.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from edgefleet.testing.servers import ServerProcess, free_ports, mqtt_accepts

RABBITMQ_SERVER_ENV = "EDGEFLEET_RABBITMQ_SERVER"
DEFAULT_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
PLUGIN = "rabbitmq_mqtt"


def rabbitmq_server() -> Path:
    """The start script to run: $EDGEFLEET_RABBITMQ_SERVER, else Debian's (which does not switch user)."""
    return Path(os.environ.get(RABBITMQ_SERVER_ENV) or DEFAULT_SERVER)


def _home() -> Path:
    """The installation the script belongs to (it holds sbin/ and plugins/, and is named after the version)."""
    return rabbitmq_server().resolve().parent.parent


def rabbitmq_version() -> str:
    """The installed server's version, e.g. `3.10.8` (its installation's name); RuntimeError without one."""
    _require()
    return _home().name.removeprefix("rabbitmq_server-")


def missing() -> str:
    """Why no private node can be started here ("" when one can): the server, its MQTT plugin or Erlang."""
    if not rabbitmq_server().exists():
        return (f"{rabbitmq_server()} not found: deploy/system-deps.sh installs Debian's rabbitmq-server "
                f"(or set {RABBITMQ_SERVER_ENV})")
    if not any((_home() / "plugins").glob(f"{PLUGIN}-*")):
        return f"the RabbitMQ in {_home()} has no {PLUGIN} plugin"
    if shutil.which("erl", path=_path()) is None:
        return "Erlang's erl is not on PATH (Debian's rabbitmq-server depends on it)"
    return ""


def available() -> bool:
    """Whether a private RabbitMQ node with MQTT can be started on this machine."""
    return not missing()


def _require() -> None:
    why = missing()
    if why:
        raise RuntimeError(why)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """`password` as RabbitMQ's definitions hold it (rabbit_password_hashing_sha256: the salt, then
    SHA-256 of salt and password, in base64)."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(users: Mapping[str, str]) -> dict[str, object]:
    """The node's definitions: the default vhost, the default user (anonymous MQTT sessions log in as it)
    and `users` (name: password), every one allowed everything in that vhost."""
    everyone = {"guest": "guest", **users}
    return {
        "vhosts": [{"name": "/"}],
        "users": [{"name": name, "password_hash": password_hash(password),
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
                  for name, password in everyone.items()],
        "permissions": [{"user": name, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                        for name in everyone],
    }


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"])


class RabbitMq(ServerProcess):
    """One private RabbitMQ node: MQTT on `mqtt_port` (`url`), AMQP on `port`, distribution on `dist_port`.

    Anonymous MQTT sessions log in as the node's default user (guest), allowed from loopback only;
    `users` (name: password) are the broker users besides it, as an agent logs in with its device id as
    its user name (RabbitMQ treats a session with a user name as a login, never as anonymous). Without a
    `workdir` the node lives in a temporary directory that `close()` (and leaving the `with` block)
    removes; restarts keep the node name and the Mnesia directory, and with them the retained messages."""

    kind = "rabbitmq"

    def __init__(self, workdir: Path | None = None, *, users: Mapping[str, str] | None = None) -> None:
        _require()
        self._owned = workdir is None
        super().__init__(Path(tempfile.mkdtemp(prefix="edgefleet-rabbitmq-")) if workdir is None else workdir)
        self.port, self.dist_port, self.mqtt_port = free_ports(3)
        self.node = f"edgefleet-{self.port}@localhost"
        self.conf = self.workdir / "rabbitmq.conf"
        self.conf.write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}",
            "mqtt.allow_anonymous = true",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            # the default user (guest) may log in from 127.0.0.1 only, which is all a test needs
            "loopback_users.guest = true",
            f"load_definitions = {self.workdir / 'definitions.json'}",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
        ]) + "\n")
        (self.workdir / "definitions.json").write_text(json.dumps(definitions(users or {}), indent=2) + "\n")
        self.plugins_file = self.workdir / "enabled_plugins"
        self.plugins_file.write_text(f"[{PLUGIN}].\n")
        # empty: the default, /etc/rabbitmq/rabbitmq-env.conf, names the system node
        self.env_file = self.workdir / "rabbitmq-env.conf"
        self.env_file.write_text("")
        for d in ("home", "mnesia", "log"):
            (self.workdir / d).mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        """The MQTT url for MqttSettings / --broker."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def environment(self) -> dict[str, str]:
        """Every variable the node starts with (nothing else is inherited)."""
        w = self.workdir
        return {
            "PATH": _path(),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(w / "home"),  # the node's own Erlang cookie
            # the script then execs the VM instead of waiting on it in a shell that forwards signals:
            # a SIGKILL must reach the node itself, not leave it orphaned
            "RUNNING_UNDER_SYSTEMD": "true",
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_MNESIA_DIR": str(w / "mnesia" / self.node),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_CONFIG_FILE": str(self.conf),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            # distribution and epmd on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(w / "log" / "erl_crash.dump"),
        }

    def command(self) -> list[str]:
        # env -i: nothing of the caller's environment; env, the script and erl exec in turn, so the
        # process started is the VM and the signals of stop() and kill() reach it
        return ["env", "-i", *(f"{k}={v}" for k, v in self.environment().items()),
                str(rabbitmq_server())]

    def ready(self) -> bool:
        return mqtt_accepts(self.mqtt_port)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the node shuts down cleanly, its retained store written), escalating to SIGKILL."""
        super().stop(timeout)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again with the same ports, node name and Mnesia directory."""
        super().restart(timeout)

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> RabbitMq:
        """Start the node (it takes several seconds); with `wait`, return once MQTT sessions are accepted."""
        return super().start(timeout, wait=wait)

    def close(self) -> None:
        """Kill the node and, when the kit made its work directory, remove it."""
        self.kill()
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
