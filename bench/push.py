"""Benchmark: how fast `edgectl push` gets chunks onto a broker, against raw paho on the same broker.

One Mosquitto on loopback (the test suite's config, the shipped limits). The artifact is 20 MB of
float32 weights drawn from a normal distribution: like trained dense weights, zlib cannot shrink
them, so every chunk goes out raw. For each chunk size:

- baseline: raw paho publishes the chunk payloads retained at QoS 1 and waits for every PUBACK
  (no edgefleet code; its default window of 20 unacknowledged messages);
- push: `edgefleet.converter.fleet.publish.publish_chunks` through `edgefleet.transport` to an empty broker;
- republish: the same when the broker already holds every chunk (what a second push costs);
- probe: the alternative to republishing, asking the broker which chunks it holds by subscribing
  to them (the only way MQTT offers), which transfers every held chunk back to the host; it is also
  the Transport's receive speed, compared with
- raw receive: plain paho subscribing to the same retained chunks.

Prints MB/s for each and ``PUSH_RATIO=<push/baseline>`` (goal >= 0.8) and
``PROBE_OVER_REPUBLISH=<probe time / republish time>`` at 64 KiB chunks.

Run: ``.venv/bin/python bench/push.py``
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.converter.fleet.publish import publish_chunks, split_parallel
from edgefleet.protocol import Topics, split
from edgefleet.testing.broker import Mosquitto
from edgefleet.transport import MqttSettings, Transport

SIZE = 20 * 1000 * 1000
CHUNK_SIZES = (64 * 1024, 256 * 1024)
ROUNDS = 5
GOAL = 0.8


def weights() -> bytes:
    """20 MB of float32 normal weights, fixed seed."""
    return np.random.default_rng(0).normal(0, 0.05, SIZE // 4).astype(np.float32).tobytes()


def raw_paho(port: int, topics: Topics, chunks: dict[str, bytes]) -> float:
    """Seconds for plain paho to publish every chunk retained at QoS 1 and get every PUBACK."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    started = time.perf_counter()
    infos = [c.publish(topics.chunk(sha), payload, qos=1, retain=True) for sha, payload in chunks.items()]
    for info in infos:
        info.wait_for_publish(60)
    took = time.perf_counter() - started
    c.disconnect()
    c.loop_stop()
    return took


def ours(url: str, topics: Topics, chunks: dict[str, bytes]) -> float:
    """Seconds for publish_chunks through the Transport."""
    t = Transport(MqttSettings(url=url), on_message=lambda m: None)
    t.start()
    assert t.wait_connected(10), t.last_error
    took = publish_chunks(t, topics, chunks)
    t.stop()
    return took


def probe(url: str, topics: Topics, chunks: dict[str, bytes]) -> float:
    """Seconds to learn which chunks the broker holds by subscribing to them and receiving them back."""
    done = threading.Event()
    seen: set[str] = set()

    def on_message(m: object) -> None:
        seen.add(m.topic)  # type: ignore[attr-defined]
        if len(seen) == len(chunks):
            done.set()

    t = Transport(MqttSettings(url=url), on_message=on_message)
    t.start()
    assert t.wait_connected(10), t.last_error
    started = time.perf_counter()
    t.subscribe([topics.chunk(sha) for sha in chunks], wait=30)
    assert done.wait(60), f"only {len(seen)} of {len(chunks)} chunks came back"
    took = time.perf_counter() - started
    t.stop()
    return took


def raw_receive(port: int, topics: Topics, chunks: dict[str, bytes]) -> float:
    """Seconds for plain paho to subscribe to the retained chunks and receive them all (QoS 1)."""
    done = threading.Event()
    seen: set[str] = set()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        seen.add(m.topic)
        if len(seen) == len(chunks):
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    started = time.perf_counter()
    c.subscribe([(topics.chunk(sha), 1) for sha in chunks])
    assert done.wait(60), f"only {len(seen)} of {len(chunks)} chunks came back"
    took = time.perf_counter() - started
    c.disconnect()
    c.loop_stop()
    return took


def main() -> None:
    """Run every measurement and print the figures."""
    data = weights()
    topics = Topics("bench")
    results: dict[int, dict[str, float]] = {}
    for chunk_size in CHUNK_SIZES:
        started = time.perf_counter()
        artifact, payloads = split(data, chunk_size)
        compress_s = time.perf_counter() - started
        started = time.perf_counter()
        assert split_parallel(data, chunk_size) == (artifact, payloads)
        parallel_s = time.perf_counter() - started
        chunks = {ref.sha256: p for ref, p in zip(artifact.chunks, payloads, strict=True)}
        best: dict[str, float] = {}
        for _ in range(ROUNDS):
            with tempfile.TemporaryDirectory() as tmp:
                base_broker = Mosquitto(Path(tmp) / "a", persistence=False).start()
                try:
                    base = raw_paho(base_broker.port, topics, chunks)
                finally:
                    base_broker.kill()
                broker = Mosquitto(Path(tmp) / "b", persistence=False).start()
                try:
                    push = ours(broker.url, topics, chunks)
                    again = ours(broker.url, topics, chunks)
                    asked = probe(broker.url, topics, chunks)
                    raw_in = raw_receive(broker.port, topics, chunks)
                finally:
                    broker.kill()
            for k, v in (("baseline", base), ("push", push), ("republish", again), ("probe", asked),
                         ("raw receive", raw_in)):
                best[k] = min(best.get(k, float("inf")), v)
        wire = artifact.wire_size
        mb = wire / 1e6
        compressed = sum(c.compressed for c in artifact.chunks)
        print(f"chunk {chunk_size // 1024} KiB: {len(chunks)} chunks, {mb:.1f} MB on the wire "
              f"({compressed} compressed); split+compress {compress_s:.2f} s on one core, "
              f"{parallel_s:.2f} s on all cores (push uses these)")
        for k in ("baseline", "push", "republish", "probe", "raw receive"):
            print(f"  {k:11s} {best[k]:6.3f} s  {mb / best[k]:7.1f} MB/s")
        results[chunk_size] = best
    r = results[64 * 1024]
    ratio = r["baseline"] / r["push"]
    print(f"PUSH_RATIO={ratio:.2f} (goal >= {GOAL})")
    print(f"PROBE_OVER_REPUBLISH={r['probe'] / r['republish']:.2f}")
    print(f"TRANSPORT_RECEIVE_RATIO={r['raw receive'] / r['probe']:.2f} (Transport receive speed / raw paho's)")


if __name__ == "__main__":
    main()
