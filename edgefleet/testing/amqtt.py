"""amqtt, a pure-Python MQTT 3.1.1 broker, as a process of its own: ``python -m edgefleet.testing.amqtt PORT``.

Anonymous, retained messages kept in memory only (a restart forgets them), MQTT 3.1.1 only: the
smallest conforming broker the suite runs edgefleet against. `Amqtt` launches and owns one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from edgefleet.testing.servers import ServerProcess, free_ports, mqtt_accepts


def broker_config(port: int) -> dict[str, object]:
    """amqtt's configuration: one anonymous listener on 127.0.0.1:`port`, no topic checks."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1024}},
        "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
        "topic-check": {"enabled": False},
    }


async def serve(port: int) -> None:
    """Run the broker on 127.0.0.1:`port` until cancelled."""
    from amqtt.broker import Broker

    broker = Broker(broker_config(port))
    await broker.start()
    print(f"amqtt listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve on the port given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m edgefleet.testing.amqtt PORT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    try:
        asyncio.run(serve(int(args[0])))
    except KeyboardInterrupt:
        pass
    return 0


class Amqtt(ServerProcess):
    """One amqtt broker process on a free port (`url`)."""

    kind = "amqtt"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_ports(1)[0]

    @property
    def url(self) -> str:
        """The broker's url for MqttSettings / --broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edgefleet.testing.amqtt", str(self.port)]

    def ready(self) -> bool:
        return mqtt_accepts(self.port)


if __name__ == "__main__":
    sys.exit(main())
