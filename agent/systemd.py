"""The agent's side of systemd's notify protocol (sd_notify), with no dependency.

systemd starts the agent with `NOTIFY_SOCKET` (a datagram socket path, or an abstract name starting
with '@') and, with `WatchdogSec=`, `WATCHDOG_USEC` (and `WATCHDOG_PID`, the process the watchdog is
meant for). The agent sends newline-separated `KEY=value` datagrams: `READY=1` once it can serve,
`WATCHDOG=1` from the loop that would stall, `STATUS=...` for `systemctl status`, `STOPPING=1` on
SIGTERM. Without `NOTIFY_SOCKET` (a terminal, a test, another init) every call does nothing.

A failed send never raises into the caller: the agent keeps serving, the first failure is logged
as a warning and later ones at debug level (a stuck manager must not flood the journal).

Typical use from the daemon's loop::

    notifier = Notifier.from_environment()
    ...load models...
    notifier.ready(status="serving m v3")
    tick = min(1.0, notifier.watchdog_interval() or 1.0)
    while not stop.wait(tick):
        if loop_is_healthy():
            notifier.watchdog_if_due()
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 1.0
"""A manager that does not drain its queue must not stall the agent's loop for longer than this."""


def _socket_address(value: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value; None when it is of a kind this module cannot use."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@', no trailing NUL (as sd_notify does).
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # relative paths are invalid; vsock: addresses (systemd >= 254) are not needed on boards


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or equal to our pid)."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # inherited from a parent that systemd watches, not us
        except ValueError:
            log.debug("ignoring WATCHDOG_PID=%r: not a pid", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.debug("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when there is no notify socket."""

    def __init__(self, socket_path: str | None, *, watchdog_usec: int | None = None) -> None:
        """Notify on `socket_path` ('@name' for an abstract socket; None disables every message)."""
        self._address: str | bytes | None = None
        if socket_path:
            self._address = _socket_address(socket_path)
            if self._address is None:
                log.warning("NOTIFY_SOCKET=%r is not an absolute path or '@' name; not notifying systemd",
                            socket_path)
        self._watchdog_usec = watchdog_usec if self._address is not None and watchdog_usec else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False
        self._last_watchdog: float | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None, *,
                         unset_environment: bool = True) -> Notifier:
        """Build from NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID of `environ` (default os.environ).

        With `unset_environment` (the default) the three variables are removed from `environ`, so the
        processes the agent starts (the validation child) neither inherit nor misuse them.
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=_watchdog_usec(env))
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether messages are sent at all (a usable NOTIFY_SOCKET was given)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as systemd advises); None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; True when sent, False when disabled or the send failed."""
        if self._address is None or not fields:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(data, self._address)
            except OSError as err:
                if not self._failed_once:
                    self._failed_once = True
                    log.warning("cannot notify systemd on %r: %s (further failures logged at debug level)",
                                self._address, err)
                else:
                    log.debug("cannot notify systemd: %s", err)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the agent can serve (READY=1), with an optional status line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows (STATUS=...)."""
        return self.notify(_status_field(text))

    def watchdog(self) -> bool:
        """Ping the watchdog (WATCHDOG=1); call only from the loop whose stall should restart the agent."""
        if self._watchdog_usec is None:
            return False
        self._last_watchdog = time.monotonic()
        return self.notify("WATCHDOG=1")

    def watchdog_if_due(self, now: float | None = None) -> bool:
        """Ping the watchdog when at least watchdog_interval() passed since the last ping; True when sent."""
        interval = self.watchdog_interval()
        if interval is None:
            return False
        now = time.monotonic() if now is None else now
        if self._last_watchdog is not None and now - self._last_watchdog < interval:
            return False
        sent = self.watchdog()
        self._last_watchdog = now
        return sent

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more to start or stop (EXTEND_TIMEOUT_USEC), e.g. while a large model loads."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}")

    def reloading(self) -> bool:
        """Tell systemd the agent is reloading its configuration (RELOADING=1); send ready() when done."""
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match this message to the reload request.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the agent is shutting down (STOPPING=1), with an optional status line."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def close(self) -> None:
        """Close the socket; later calls open a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_field(text: str) -> str:
    # One datagram is newline-separated fields: a newline in the text would start a bogus field.
    return "STATUS=" + " ".join(text.splitlines())
