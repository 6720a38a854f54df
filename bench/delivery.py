"""Benchmark: model delivery over MQTT, the agent's download against raw paho on the same broker.

One Mosquitto on loopback, then one NATS node (MQTT 3.1.1 on JetStream) on loopback. The artifact is
a real float32 TFLite model of about 20 MB that this script builds (in a TensorFlow-only subprocess),
chunked at 64 KiB as a push would.

- baseline (a): raw paho, no edgefleet code: one client publishes the same chunk payloads at QoS 1
  and a second client subscribed to them receives every one; time from the first publish to the last
  message received (the issue's baseline). Also shown: raw paho fetching the same chunks when they
  are already retained on the broker (what a device does).
- agent (b): the real agent process (edge-agent run) with the chunks already retained on the
  broker; time from the deployment document's publication to the verified artifact on disk (the
  agent's DOWNLOADING event with done=true: every chunk verified and stored, the artifact joined,
  hashed and fsynced). Eight versions of the model (trained from different seeds, so they share no
  weights) are pushed one after the other, each once the previous one committed; the first round
  warms the agent up and is not counted.
- Each version is a round: the chunks are published, (a) runs three times (the round takes the
  median) and the retained fetch once, then the document goes out and the agent downloads. The sides never overlap, and a busy neighbour slows
  both sides of a round alike, so each round's ratio (b)/(a) is a fair one; the figure is the median
  of the rounds' ratios, printed with every round (single runs on a shared machine swing by a third).
- The same rounds on NATS, with a fresh agent speaking MQTT 3.1.1 to it.
- push: `edgectl push`'s publishing of the same chunks, with compression timed apart.
- delta: a small CNN, then the same CNN with only its last layer fine-tuned: bytes the agent fetched
  for v2 over the bytes of v2.

Last lines: ``DELIVERY_RATIO=<b/a>`` on Mosquitto (goal: median >= 0.6), ``NATS_DELIVERY_RATIO=<b/a>`` on
NATS (goal >= 0.5) and ``DELTA_FRACTION=<x>`` (goal <= 0.25, on Mosquitto).

Run: ``.venv/bin/python bench/delivery.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.bundle import Bundle
from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
from edgefleet.converter.fleet.publish import prepare, publish_chunks, publish_document
from edgefleet.protocol import Topics, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.nats import Nats, nats_server_version
from edgefleet.transport import MqttSettings, Transport

DEFAULT_CHUNK_SIZE = 64 * 1024
CHUNK = DEFAULT_CHUNK_SIZE
RUNS = 7
"""Rounds, each timing both sides; the figure is the median of the rounds' ratios."""
WARMUP = 1
"""Untimed rounds first: an agent's first download also pays what happens once per process (imports
on first use, the chunk workers' start), which is not throughput."""
RAW_REPEAT = 3
"""Back-to-back runs of baseline (a) in each round, of which the round takes the median."""
GOALS = {"mosquitto": 0.6, "nats": 0.5}
"""DELIVERY_RATIO's median on Mosquitto, NATS_DELIVERY_RATIO's on one NATS node."""
T = Topics()

BUILD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
out, width = sys.argv[1], int(sys.argv[2])

def convert(m):
    return bytes(tf.lite.TFLiteConverter.from_keras_model(m).convert())

for seed in range(RUNS):
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    big = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(width, activation="relu"),
                               tf.keras.layers.Dense(width, activation="relu"), tf.keras.layers.Dense(10)])
    open(f"{out}/big_{seed + 1}.tflite", "wb").write(convert(big))

def cnn(fine_tune):
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(1)
    L = tf.keras.layers
    m = tf.keras.Sequential([tf.keras.Input((28, 28, 1)), L.Conv2D(16, 3, padding="same", activation="relu"),
                             L.MaxPooling2D(), L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(),
                             L.Conv2D(64, 3, padding="same", activation="relu"), L.Flatten(),
                             L.Dense(64, activation="relu"), L.Dense(10, activation="softmax")])
    rng = np.random.default_rng(3)
    for layer in m.layers:
        if layer.get_weights():
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.1, b.shape).astype(np.float32)])
    if fine_tune:
        k, b = m.layers[-1].get_weights()
        r = np.random.default_rng(9)
        m.layers[-1].set_weights([k + r.normal(0, 0.05, k.shape).astype(np.float32),
                                  b + r.normal(0, 0.05, b.shape).astype(np.float32)])
    return convert(m)

open(f"{out}/cnn_v1.tflite", "wb").write(cnn(False))
open(f"{out}/cnn_v2.tflite", "wb").write(cnn(True))
"""


def build_models(work: Path, width: int) -> None:
    """Build the models with TensorFlow in a subprocess (the agent side never shares a process with it)."""
    subprocess.run([sys.executable, "-c", BUILD.replace("RUNS", str(WARMUP + RUNS)), str(work), str(width)], check=True,
                   timeout=600,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def bundle(work: Path, model: str, version: int, shape: tuple[int, ...]) -> Path:
    """A bundle of a built model with a few golden samples."""
    out = work / f"bundle-{model}-v{version}"
    golden = [np.random.default_rng(version).normal(size=(3, 1, *shape)).astype(np.float32)]
    write_bundle(out, (work / f"{model}.tflite").read_bytes(),
                 BundleSpec(name=model.split("_")[0], version=version, golden_inputs=golden, chunk_size=CHUNK))
    return out


def _counter(expected: int) -> tuple[Any, threading.Event, list[int]]:
    """A paho on_message that counts messages, the event set when `expected` arrived, and the count."""
    got = threading.Event()
    count = [0]

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        count[0] += 1
        if count[0] == expected:
            got.set()

    return on_message, got, count


def _client(protocol: int) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)  # type: ignore[arg-type]


def raw_pub_sub(port: int, chunks: dict[str, bytes], protocol: int = mqtt.MQTTv5) -> float:
    """Seconds for plain paho to publish the payloads at QoS 1 and a plain paho subscriber to get them all."""
    prefix = f"bench-live-{time.monotonic_ns()}"
    on_message, got, count = _counter(len(chunks))
    sub = _client(protocol)
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe(f"{prefix}/#", qos=1)
    subscribed.wait(10)
    pub = _client(protocol)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    started = time.perf_counter()
    for i, payload in enumerate(chunks.values()):
        pub.publish(f"{prefix}/{i}", payload, qos=1)
    if not got.wait(120):
        raise SystemExit(f"raw paho: {count[0]} of {len(chunks)} messages arrived")
    took = time.perf_counter() - started
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return took


def raw_retained_fetch(port: int, chunks: dict[str, bytes], protocol: int = mqtt.MQTTv5, qos: int = 1) -> float:
    """Seconds for plain paho to receive chunks already retained on the broker (one subscription each,
    all at once). QoS 1 on Mosquitto, which drops QoS 0 messages beyond a few dozen queued for one
    client; QoS 0 on NATS, which grants a session at most 63 QoS 1 subscriptions."""
    on_message, got, count = _counter(len(chunks))
    c = _client(protocol)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    started = time.perf_counter()
    topics = [(T.chunk(sha), qos) for sha in chunks]
    for i in range(0, len(topics), 32):
        c.subscribe(topics[i:i + 32])
    if not got.wait(120):
        raise SystemExit(f"retained fetch: {count[0]} of {len(chunks)} messages arrived")
    took = time.perf_counter() - started
    c.loop_stop()
    c.disconnect()
    return took


def deliver(url: str, port: int, protocol: Literal["auto", "5", "3.1.1"], bigs: list[Path], root: Path,
            then: Callable[[Host], Any] | None = None) -> dict[str, Any]:
    """One round per version of the big model, on one broker: raw paho publish -> subscribe of its chunks,
    raw paho fetching them retained, then the agent's download of the deployment; `then(host)` runs last.

    The three steps of a round run one after the other, never at once, and the rounds interleave the
    sides, so a busy neighbour slows both sides of a round alike: each round's ratio is a fair one, and
    their median is the figure."""
    paho_protocol = mqtt.MQTTv311 if protocol == "3.1.1" else mqtt.MQTTv5
    out: dict[str, Any] = {"raws": [], "fetches": [], "downloads": [], "ratios": []}

    def baselines(p: Any) -> None:
        # the chunks are on the broker, the document is not yet: nothing competes with these. The
        # baseline takes a tenth of a second, so one descheduling doubles it: the median of three
        out["raws"].append(statistics.median(raw_pub_sub(port, p.chunks, paho_protocol) for _ in range(RAW_REPEAT)))
        out["fetches"].append(raw_retained_fetch(port, p.chunks, paho_protocol, 0 if protocol == "3.1.1" else 1))

    host = Host(url, protocol)
    agent = AgentProcess(root, device_id="bench-dev", mqtt={"url": url, "protocol": protocol},
                         api={"socket": str(root / "api.sock")}, health={"probation_s": 1, "min_requests": 1},
                         security={"max_artifact_bytes": 64 << 20})
    agent.start()
    try:
        for version, big in enumerate(bigs, 1):
            out["prepared"], out["publish_s"], published_at = host.push(big, baselines)
            done = host.wait_event(done_event("big", version))
            out["downloads"].append(done["ts"] - published_at)
            host.wait_event(lambda e, v=version: e["model"] == "big" and e["step"] == "COMMITTED"
                            and e.get("version") == v)
        for key in ("raws", "fetches", "downloads"):
            del out[key][:WARMUP]
        out["ratios"] = [raw / agent for raw, agent in zip(out["raws"], out["downloads"], strict=True)]
        if then is not None:
            out["then"] = then(host)
    finally:
        agent.stop()
        host.close()
    return out


def delta_run(host: Host, work: Path) -> dict[str, Any]:
    """A small CNN, then its last-layer fine-tune: the agent's DOWNLOADING details of v2."""
    cnn1, cnn2 = bundle(work, "cnn_v1", 1, (28, 28, 1)), bundle(work, "cnn_v2", 2, (28, 28, 1))
    host.push(cnn1)
    host.wait_event(lambda e: e["model"] == "cnn" and e["step"] == "PROBATION" and e.get("version") == 1)
    host.push(cnn2)
    return host.wait_event(done_event("cnn", 2))["details"]  # type: ignore[no-any-return]


class Host:
    """Publishes bundles and follows one device's events."""

    def __init__(self, url: str, protocol: Literal["auto", "5", "3.1.1"] = "auto"):
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.transport = Transport(MqttSettings(url=url, client_id=f"bench-host-{os.getpid()}", protocol=protocol),
                                   on_message=self._on_message)
        self.transport.subscribe(T.events("bench-dev"))
        self.transport.start()
        if not self.transport.wait_connected(10):
            raise SystemExit(f"host: {self.transport.last_error}")

    def _on_message(self, message: Any) -> None:
        with self.cond:
            self.events.append(parse_json(message.payload))
            self.cond.notify_all()

    def wait_event(self, pred: Any, timeout: float = 120.0) -> dict[str, Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: any(pred(e) for e in self.events), timeout):
                raise SystemExit("the agent did not report the expected event in time")
            return next(e for e in self.events if pred(e))

    def push(self, path: Path, before_document: Any = None) -> tuple[Any, float, float]:
        """Publish chunks then the document; return (prepared, publish seconds, document publication time)."""
        prepared = prepare(Bundle.load(path), allow_unsigned=True, target="device:bench-dev")
        publish_s = publish_chunks(self.transport, T, prepared.chunks)
        if before_document is not None:
            before_document(prepared)
        published_at = time.time()
        publish_document(self.transport, [T.device_model("bench-dev", prepared.deployment.model.name)],
                         prepared.document)
        return prepared, publish_s, published_at

    def close(self) -> None:
        self.transport.stop()


def done_event(name: str, version: int) -> Any:
    return lambda e: (e["model"] == name and e["step"] == "DOWNLOADING" and e.get("version") == version
                      and e["details"].get("done"))


def main() -> int:
    """Run the benchmark."""
    global CHUNK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 5 MB model instead of 20 MB")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"chunk size in bytes (default {DEFAULT_CHUNK_SIZE}, the converter's)")
    args = parser.parse_args()
    CHUNK = args.chunk_size
    width = 1100 if args.quick else 2230
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        build_models(work, width)
        bigs = [bundle(work, f"big_{v}", v, (64,)) for v in range(1, WARMUP + RUNS + 1)]
        size = len((bigs[0] / "model.tflite").read_bytes())
        prepared_probe = prepare(Bundle.load(bigs[0]), allow_unsigned=True)
        print(f"artifact: float32 TFLite model of {size / 1e6:.1f} MB, {len(prepared_probe.deployment.model.artifact.chunks)}"
              f" chunks of {CHUNK // 1024} KiB ({prepared_probe.wire_bytes / 1e6:.1f} MB on the wire with golden "
              f"vectors); built in {time.perf_counter() - t0:.0f} s")
        chunks = prepared_probe.chunks
        wire = sum(len(p) for p in chunks.values())
        broker = Mosquitto(work / "broker").start()
        try:
            mosq = deliver(broker.url, broker.port, "auto", bigs, work / "agent-mosquitto", then=lambda host: delta_run(
                host, work))
        finally:
            broker.kill()
        nats = Nats(work / "nats").start()
        try:
            on_nats = deliver(nats.url, nats.mqtt_port, "3.1.1", bigs, work / "agent-nats")
        finally:
            nats.kill()
    delta, publish_s, prepared = mosq["then"], mosq["publish_s"], mosq["prepared"]
    raws, downloads = mosq["raws"], mosq["downloads"]
    raw_live, raw_fetch, agent_s = (statistics.median(mosq[k]) for k in ("raws", "fetches", "downloads"))
    mb = wire / 1e6
    a_rate, b_rate, fetch_rate = mb / raw_live, mb / agent_s, mb / raw_fetch
    ratio = statistics.median(mosq["ratios"])
    nats_ratio = statistics.median(on_nats["ratios"])
    n_raw, n_fetch, n_agent = (statistics.median(on_nats[k]) for k in ("raws", "fetches", "downloads"))
    fraction = delta["fetched_bytes"] / delta["artifact_bytes"]
    print(f"{'measurement (median of ' + str(RUNS) + ' runs)':<58} {'seconds':>8} {'MB/s':>8}")
    print(f"{'(a) raw paho publish -> subscribe, QoS 1 (baseline)':<58} {raw_live:8.3f} {a_rate:8.1f}")
    print(f"{'    raw paho fetching the chunks retained on the broker':<58} {raw_fetch:8.3f} {fetch_rate:8.1f}")
    print(f"{'(b) agent: document -> verified artifact on disk':<58} {agent_s:8.3f} {b_rate:8.1f}")
    print(f"    runs, seconds: raw {' '.join(f'{t:.3f}' for t in raws)}; agent "
          f"{' '.join(f'{t:.3f}' for t in downloads)}")
    print(f"    runs, ratio (b)/(a) of each round: {' '.join(f'{r:.2f}' for r in mosq['ratios'])}; median {ratio:.2f}")
    print(f"{'NATS ' + nats_server_version() + ', one node, MQTT 3.1.1:':<58}")
    print(f"{'(a) raw paho publish -> subscribe, QoS 1 (baseline)':<58} {n_raw:8.3f} {mb / n_raw:8.1f}")
    print(f"{'    raw paho fetching the chunks retained on the broker':<58} {n_fetch:8.3f} {mb / n_fetch:8.1f}")
    print(f"{'(b) agent: document -> verified artifact on disk':<58} {n_agent:8.3f} {mb / n_agent:8.1f}")
    print(f"    runs, seconds: raw {' '.join(f'{t:.3f}' for t in on_nats['raws'])}; agent "
          f"{' '.join(f'{t:.3f}' for t in on_nats['downloads'])}")
    print(f"    runs, ratio (b)/(a) of each round: {' '.join(f'{r:.2f}' for r in on_nats['ratios'])}; "
          f"median {nats_ratio:.2f}")
    print(f"{'push: publishing the chunks (edgectl push)':<58} {publish_s:8.3f} {mb / publish_s:8.1f}")
    print(f"{'push: chunking + compression (host work, before publishing)':<58} {prepared.compress_s:8.3f}")
    print(f"agent vs raw retained fetch: {b_rate / fetch_rate:.2f}x")
    print(f"delta: v2 (last layer fine-tuned) fetched {delta['fetched_bytes']} of {delta['artifact_bytes']} bytes "
          f"({delta['chunks_fetched']} of {delta['chunks_total']} chunks; {delta['local_bytes']} bytes copied "
          f"from v1 on the device)")
    figures = {"artifact_bytes": size, "wire_bytes": wire, "raw_pub_sub_s": raw_live, "raw_retained_fetch_s": raw_fetch,
               "agent_download_s": agent_s, "push_publish_s": publish_s, "push_compress_s": prepared.compress_s,
               "delivery_ratio": ratio, "delta_fraction": fraction, "ratios": mosq["ratios"],
               "nats": {"raw_pub_sub_s": n_raw, "raw_retained_fetch_s": n_fetch, "agent_download_s": n_agent,
                        "ratios": on_nats["ratios"], "delivery_ratio": nats_ratio}}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"DELIVERY_RATIO={ratio:.2f} (median of {RUNS} rounds; goal >= {GOALS['mosquitto']:g})")
    print(f"NATS_DELIVERY_RATIO={nats_ratio:.2f} (median of {RUNS} rounds; goal >= {GOALS['nats']:g})")
    print(f"DELTA_FRACTION={fraction:.3f} (goal <= 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
