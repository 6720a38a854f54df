"""A minimal MQTT 3.1.1 broker (amqtt) for machines without Mosquitto: ``python -m demo.embedded_broker PORT``.

Anonymous, retained messages kept in memory. It is for the demo only; real fleets use Mosquitto or a
clustered broker (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys


async def serve(port: int) -> None:
    """Run the broker on 127.0.0.1:`port` until cancelled."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 256}},
        "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
        "topic-check": {"enabled": False},
    }
    broker = Broker(config)
    await broker.start()
    print(f"embedded broker listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    """Entry point."""
    logging.basicConfig(level=logging.ERROR)
    try:
        asyncio.run(serve(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
