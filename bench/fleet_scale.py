"""Issue 5's benchmark: a fleet of real agents on one Mosquitto, a collector's ingest rate, an idle agent's CPU.

1. Fleet rollout. N agents run the real agent code (`edgefleet.agent.daemon.Daemon`: store, lifecycle with its
   validation fork server, serving, API on a Unix socket, MQTT link, telemetry every second), several per
   worker process, each in its own thread with its own state directory and MQTT client. A tiny dense
   model (built once in a TensorFlow subprocess; no process that runs agents imports TensorFlow) is
   pushed to their group, and the time from publishing the group document to the last retained state
   document saying COMMITTED is FLEET_ALL_COMMITTED_S. Probation is 1 s with no traffic (the agent
   commits a model that served nothing once the window passes), so 1 s of every figure is probation.
   Baseline: the same push to one agent alone in its own process.
2. Collector. `edgectl fleet collect` (a separate process, writing JSON Lines to a file) takes in
   (a) the fleet's own telemetry stream for a few seconds (N agents at 1 s: about N msg/s, bounded by
   what the agents send), then, with the fleet stopped, (b) a load generator's stream: processes that
   publish real telemetry documents at QoS 0 as fast as they can. COLLECTOR_MSGS_PER_S is (b), the
   collector's ceiling on this machine while the generator and the broker share its two cores.
   Baseline for (b): a bare paho subscriber that only counts messages, under the same load.
3. Agent CPU: one `edge-agent run` process with one committed model and nothing else to do, its own
   CPU time (psutil cpu_times, user + system, the fork server excluded) over a window, with telemetry
   every 1 s against the same agent with telemetry every hour (the baseline).

Prints every figure, then ``FLEET_AGENTS=<N> FLEET_ALL_COMMITTED_S=<t> COLLECTOR_MSGS_PER_S=<r>`` last.
Goals: 200 agents committed within 60 s; a collector ingesting >= 5,000 msg/s; <= 2 % of one core.

With ``--cluster``, instead: the fleet rollout of part 1 on a three-node NATS cluster on loopback (MQTT
streams replicated on all three nodes). Agent k starts on node k mod 3 and lists the other nodes after
its own (`mqtt.urls`); the host pushes through the first node. Fresh agents each time: (a) one
Mosquitto, the baseline; (b) the cluster; (c) the cluster, its second node killed (SIGKILL) once a
quarter of the fleet committed, so that its agents move to the other nodes mid-rollout. Last line:
``CLUSTER_AGENTS=<N> CLUSTER_ALL_COMMITTED_S=<b> NODE_KILL_ALL_COMMITTED_S=<c> MOSQUITTO_ALL_COMMITTED_S=<a>``.
Goals: 200 agents committed within 60 s on the cluster, within 90 s with a node killed.

Run: .venv/bin/python bench/fleet_scale.py [--agents 200] [--quick] [--cluster]
"""

from __future__ import annotations

import argparse
import json
import math
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

ROOT = Path(__file__).resolve().parent.parent

GOALS = {"committed_s": 60.0, "collector": 5000.0, "cpu_pct": 2.0, "cluster_s": 60.0, "node_kill_s": 90.0}
GROUP = "fleet"

BUILD = r"""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
tf.keras.utils.set_random_seed(5)
m = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="relu"),
                         tf.keras.layers.Dense(4, activation="softmax")])
open(sys.argv[1], "wb").write(tf.lite.TFLiteConverter.from_keras_model(m).convert())
"""


def agent_config(root: Path, device: str, groups: list[str], urls: list[str], pub: Path, telemetry_s: float,
                 protocol: str = "auto") -> str:
    """TOML of one agent: own state dir and API socket, short probation, telemetry every `telemetry_s`;
    `mqtt.urls` when there are several brokers (the nodes of a cluster, tried in this order)."""
    from edgefleet.testing.agentproc import toml

    brokers: dict[str, Any] = {"urls": urls} if len(urls) > 1 else {"url": urls[0]}
    return toml({
        "device_id": device, "groups": groups, "state_dir": str(root / device / "state"), "log_level": "warning",
        "api": {"socket": str(root / device / "api.sock")},
        "mqtt": {**brokers, "protocol": protocol, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
        "security": {"trusted_keys": [str(pub)]},
        "health": {"probation_s": 1, "min_requests": 1},
        "validation": {"timeout_s": 300},
        "telemetry": {"interval_s": telemetry_s},
    })


# ---------------------------------------------------------------------- child processes


def spread(urls: list[str], k: int) -> list[str]:
    """The broker urls of the fleet's k-th agent: node k mod n first, then the others in turn."""
    i = k % len(urls)
    return urls[i:] + urls[:i]


def worker_main(spec: dict[str, Any]) -> None:
    """Child: run the agents of `spec` as Daemons in threads until stdin closes."""
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {spec['index']}: %(levelname)s %(name)s: %(message)s")
    from edgefleet.agent.config import parse_config
    from edgefleet.agent.daemon import Daemon

    root = Path(spec["root"])
    daemons = []
    for k, device in enumerate(spec["devices"], spec["offset"]):
        (root / device).mkdir(parents=True, exist_ok=True)
        text = agent_config(root, device, spec["groups"], spread(spec["urls"], k), Path(spec["pub"]),
                            spec["telemetry_s"], spec["protocol"])
        daemons.append(Daemon(parse_config(text, source=device)))
    threads = [threading.Thread(target=d.run, name=d.config.device_id, daemon=True) for d in daemons]
    for t in threads:
        t.start()
    print("started", flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    for d in daemons:
        d.request_stop()
    for t in threads:
        t.join(15)


def generator_main(port: int, count: int, devices: int, payloads_file: str) -> None:
    """Child: publish `count` telemetry documents at QoS 0 as fast as paho takes them."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    payloads = [bytes.fromhex(line) for line in Path(payloads_file).read_text().split()]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    topics = [f"edgefleet/devices/gen-{i}/telemetry" for i in range(devices)]
    for i in range(count):
        k = i % devices
        while c.publish(topics[k], payloads[k], qos=0).rc != 0:
            time.sleep(0.001)
    c.disconnect()
    c.loop_stop()


def raw_subscriber_main(port: int, count: int, limit_s: float) -> None:
    """Child: the baseline collector, a bare paho subscriber that counts; prints its rate as JSON."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(c: Any, u: Any, m: Any) -> None:
        now = time.time()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if state["n"] >= count:
            done.set()

    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe("edgefleet/devices/+/telemetry", qos=0)
    ready.wait(10)
    print("collecting", file=sys.stderr, flush=True)
    done.wait(limit_s)
    c.disconnect()
    c.loop_stop()
    n, span = state["n"], state["last"] - state["first"]
    print(json.dumps({"messages": n, "msgs_per_s": (n - 1) / span if n > 1 and span > 0 else 0.0,
                      "first_received": state["first"], "last_received": state["last"]}))


# ---------------------------------------------------------------------- the parent's steps


def build_model(out: Path) -> bytes:
    """The tiny dense model, converted by TensorFlow in a subprocess."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", BUILD, str(out)], check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out.read_bytes()


class Fleet:
    """Worker processes running the agents."""

    def __init__(self, root: Path, url: str | list[str], pub: Path, devices: list[str], groups: list[str],
                 per_process: int, telemetry_s: float, protocol: str = "auto") -> None:
        """`url` may list a cluster's nodes: agent k then starts on node k mod n (`spread`)."""
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        urls = [url] if isinstance(url, str) else url
        for i in range(0, len(devices), per_process):
            spec = {"index": i // per_process, "root": str(root), "urls": urls, "offset": i, "pub": str(pub),
                    "devices": devices[i:i + per_process], "groups": groups, "telemetry_s": telemetry_s,
                    "protocol": protocol}
            log = root / f"worker-{devices[i]}.log"
            root.mkdir(parents=True, exist_ok=True)
            self.logs.append(log)
            with open(log, "ab") as err:  # the interpreters' INFO lines and the agents' warnings
                self.procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}))
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "started":
                raise RuntimeError(f"worker exited with {p.wait()}")

    def warnings(self) -> list[str]:
        """The agents' WARNING and ERROR lines."""
        lines = []
        for log in self.logs:
            lines += [line for line in log.read_text(errors="replace").splitlines() if " WARNING " in line
                      or " ERROR " in line]
        return lines

    def stop(self) -> None:
        """Close every worker's stdin and wait for it."""
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_online(observer: Any, devices: list[str], timeout: float) -> float:
    """Seconds until every device's retained status says online."""
    started = time.monotonic()
    seen = observer.version
    while True:
        views = observer.devices()
        if all(d in views and views[d].online for d in devices):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            missing = [d for d in devices if d not in views or not views[d].online]
            raise RuntimeError(f"{len(missing)} agent(s) not online after {timeout:g} s: {missing[:5]}")
        seen = observer.wait_change(seen, 1.0)


def rollout(transport: Any, observer: Any, prepared: Any, group: str, devices: list[str],
            timeout: float, during: Callable[[dict[str, float], float], None] | None = None) -> dict[str, Any]:
    """Publish the group document and follow the retained states until every device committed it;
    `during` is called on every turn with the devices committed so far and the seconds elapsed."""
    from edgefleet.converter.fleet.publish import publish_document
    from edgefleet.protocol import Topics

    dep_id = prepared.deployment.deployment_id
    name = prepared.deployment.model.name
    committed: dict[str, float] = {}
    activated: dict[str, float] = {}
    failed: dict[str, str] = {}
    seen = observer.version
    started = time.monotonic()
    publish_document(transport, [Topics().group_model(group, name)], prepared.for_target(f"group:{group}"))
    while len(committed) + len(failed) < len(devices) and time.monotonic() - started < timeout:
        seen = observer.wait_change(seen, 1.0)
        now = time.monotonic() - started
        views = observer.devices()
        for d in devices:
            if d in committed or d in failed or d not in views:
                continue
            m = views[d].model(name)
            if m is None:
                continue
            if m.active is not None and m.active.deployment_id == dep_id:
                activated.setdefault(d, now)
                if m.phase == "COMMITTED":
                    committed[d] = now
            elif m.last_outcome is not None and m.last_outcome.deployment_id == dep_id:
                failed[d] = f"{m.last_outcome.result}: {m.last_outcome.reason}"
        if during is not None:
            during(committed, now)
    times = sorted(committed.values())
    return {"committed": len(committed), "failed": failed, "all_s": times[-1] if len(times) == len(devices) else None,
            "first_s": times[0] if times else None, "median_s": statistics.median(times) if times else None,
            "activated_all_s": max(activated.values()) if len(activated) == len(devices) else None,
            "elapsed_s": time.monotonic() - started, "committed_at": committed}


def collect(url: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    """Start `edgectl fleet collect` and return once it is subscribed."""
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "collect", "--out", str(out), "--json",
                             "--only", "telemetry", "--report-every", "3600", "--broker", url, *extra],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if not line.startswith("collecting"):
        raise RuntimeError(f"collector did not start: {line}{proc.stderr.read()}")
    return proc


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON summary a collector prints when it stops."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"collector failed ({proc.returncode}): {err}")
    return json.loads(out)  # type: ignore[no-any-return]


def generated_load(port: int, url: str, work: Path, count: int, generators: int, payloads: Path,
                   consumers: list[list[str]]) -> list[dict[str, Any]]:
    """Start the consumers, run the generators, return each consumer's summary."""
    procs = []
    for i, argv in enumerate(consumers):
        if argv[0] == "raw":
            p = subprocess.Popen([sys.executable, __file__, "--raw-subscriber", str(port), str(count * generators)],
                                 cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert p.stderr is not None
            p.stderr.readline()
        else:
            p = collect(url, work / f"load-{i}-{time.monotonic_ns()}.jsonl", *argv)
        procs.append(p)
    gens = [subprocess.Popen([sys.executable, __file__, "--generate", str(port), str(count), "200", str(payloads)],
                             cwd=ROOT) for _ in range(generators)]
    for g in gens:
        g.wait(300)
    return [finish(p, 300) for p in procs]


def rates(runs: list[dict[str, Any]]) -> str:
    """`5012, 4800` from collector summaries."""
    return ", ".join(f"{r['msgs_per_s']:.0f}" for r in runs)


def idle_cpu(work: Path, url: str, bundle: Path, telemetry_s: float, window: float) -> float:
    """Percent of one core an idle agent process with one committed model uses over `window` s."""
    import psutil

    from edgefleet.testing.agentproc import AgentProcess
    from edgefleet.testing.waiting import wait_for

    a = AgentProcess(work / "cpu-agent", device_id="cpu-agent", groups=["cpu"],
                     mqtt={"url": url}, health={"probation_s": 1, "min_requests": 1},
                     telemetry={"interval_s": telemetry_s}, log_level="warning")
    a.start()
    try:
        if not a.state_dir.joinpath("state.json").exists() or "m" not in a.state_file().get("models", {}):
            res = a.cli("install", str(bundle))
            if res.returncode != 0:
                raise RuntimeError(f"install failed: {res.stdout}{res.stderr}")
        wait_for(lambda: a.status()["state"]["models"]["m"]["phase"] == "COMMITTED", timeout=30, what="commit")
        assert a.proc is not None
        proc = psutil.Process(a.proc.pid)
        threading.Event().wait(2.0)  # let the install's work settle
        before = proc.cpu_times()
        t0 = time.monotonic()
        threading.Event().wait(window)
        after = proc.cpu_times()
        elapsed = time.monotonic() - t0
        return 100.0 * ((after.user - before.user) + (after.system - before.system)) / elapsed
    finally:
        a.stop()


# ---------------------------------------------------------------------- the cluster


def make_bundle(work: Path) -> tuple[Path, Any, Path]:
    """The tiny model's signed bundle, its signing key and the public key file agents trust."""
    import numpy as np

    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.protocol import SigningKey

    model = build_model(work / "model.tflite")
    key = SigningKey.generate()
    _, pub = key.write(work / "keys")
    rng = np.random.default_rng(0)
    bundle = work / "bundle"
    write_bundle(bundle, model, BundleSpec(name="m", version=1,
                                           golden_inputs=[rng.normal(size=(4, 1, 8)).astype(np.float32)]), key=key)
    return bundle, key, pub


def fleet_mosquitto(workdir: Path) -> Any:
    """A started Mosquitto without persistence whose queues hold a whole fleet's traffic."""
    from edgefleet.testing.broker import Mosquitto

    broker = Mosquitto(workdir, persistence=False)
    broker.conf.write_text(broker.conf.read_text().replace("max_queued_messages 20000", "max_queued_messages 2000000"))
    return broker.start()


def fleet_rollout(work: Path, label: str, urls: list[str], bundle: Path, key: Any, pub: Path, n: int,
                  per_process: int, protocol: Literal["auto", "5", "3.1.1"] = "auto",
                  during: Callable[[dict[str, float], float], None] | None = None) -> dict[str, Any]:
    """`n` fresh agents named `label`-NNNN in group `label`, spread over `urls`; the rollout of the bundle
    to the group through the first url, with how long the fleet took to come online."""
    from edgefleet.bundle import Bundle
    from edgefleet.converter.fleet.observer import FleetObserver
    from edgefleet.converter.fleet.publish import prepare, publish_chunks
    from edgefleet.protocol import Topics
    from edgefleet.transport import MqttSettings, Transport

    topics = Topics()
    observer = FleetObserver(topics, leaves=("status", "state"))
    host = Transport(MqttSettings(url=urls[0], fallback_urls=tuple(urls[1:]), client_id=f"bench-host-{label}",
                                  protocol=protocol), on_message=observer.handle)
    host.start()
    try:
        if not host.wait_connected(30):
            raise RuntimeError(f"host: {host.last_error}")
        observer.attach(host)
        prepared = prepare(Bundle.load(bundle), key=key)
        publish_chunks(host, topics, prepared.chunks)
        devices = [f"{label}-{i:04d}" for i in range(n)]
        t0 = time.monotonic()
        fleet = Fleet(work / label, urls, pub, devices, [label], per_process, 1.0, protocol)
        try:
            online_s = wait_online(observer, devices, 300) + time.monotonic() - t0
            result = rollout(host, observer, prepared, label, devices, 600, during)
        finally:
            fleet.stop()
        result["online_s"] = online_s
        result["warnings"] = fleet.warnings()
        return result
    finally:
        host.stop()


def describe(label: str, r: dict[str, Any], base: float | None = None) -> str:
    """One line of a rollout's figures, with its ratio to `base` seconds."""
    head = f"  {label}: online after {r['online_s']:.1f} s; "
    if r["all_s"] is None:
        return head + f"only {r['committed']} committed within {r['elapsed_s']:.0f} s, {len(r['failed'])} failed"
    ratio = f" (x{r['all_s'] / base:.2f} one Mosquitto)" if base else ""
    return head + (f"first committed {r['first_s']:.2f} s, median {r['median_s']:.2f} s, all committed "
                   f"{r['all_s']:.2f} s{ratio}")


def cluster_main(n: int, per_process: int) -> None:
    """The same rollout on one Mosquitto (the baseline), on a three-node NATS cluster, and on the cluster
    with one node killed when a quarter of the fleet committed."""
    from edgefleet.testing.nats import NatsCluster, nats_server_version

    with tempfile.TemporaryDirectory(prefix="fleet-cluster-") as tmp:
        work = Path(tmp)
        bundle, key, pub = make_bundle(work)
        print(f"{n} agents ({per_process} per worker process), probation 1 s, telemetry every 1 s; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run")
        broker = fleet_mosquitto(work / "mosquitto")
        try:
            mosq = fleet_rollout(work, "mosq", [broker.url], bundle, key, pub, n, per_process)
        finally:
            broker.kill()
        cluster = NatsCluster(work / "nats", 3, stream_replicas=3).start()
        killed: dict[str, Any] = {}
        try:
            clus = fleet_rollout(work, "clus", cluster.urls, bundle, key, pub, n, per_process, "3.1.1")
            victim = cluster.nodes[1]  # the host is on the first node

            def kill_mid(committed: dict[str, float], now: float) -> None:
                if not killed and len(committed) >= max(1, n // 4):
                    victim.kill()
                    # agent k starts on node k mod 3 (`spread`)
                    on_victim = [f"kill-{k:04d}" for k in range(1, n, 3)]
                    killed.update(at=now, agents=len(on_victim),
                                  left=sum(1 for d in on_victim if d not in committed))

            kill = fleet_rollout(work, "kill", cluster.urls, bundle, key, pub, n, per_process, "3.1.1", kill_mid)
        finally:
            cluster.kill()
        version = nats_server_version()
    print(f"one Mosquitto, then three NATS {version} nodes on loopback (MQTT stream replicas 3, MQTT 3.1.1); agent "
          "k starts on node k mod 3 and lists the other nodes after its own (mqtt.urls); the push goes through "
          "node 1; fresh agents for each rollout")
    for label, r in (("one Mosquitto (baseline)", mosq), ("cluster", clus), ("cluster, node 2 killed", kill)):
        print(describe(label, r, None if r is mosq else mosq["all_s"]))
        if r["failed"]:
            print(f"    FAILED on {len(r['failed'])} agent(s), e.g. {next(iter(r['failed'].items()))}")
        if r["warnings"]:
            print(f"    {len(r['warnings'])} warning(s) from the agents, e.g.:", *r["warnings"][:3], sep="\n    ")
    if killed:
        print(f"  node 2 killed {killed['at']:.2f} s after the group document, once {max(1, n // 4)} agents had "
              f"committed; {killed['left']} of its {killed['agents']} agents had not committed yet")
    print(f"goals: all {n} committed <= {GOALS['cluster_s']:g} s on the cluster, <= {GOALS['node_kill_s']:g} s "
          f"with a node killed; load average {os.getloadavg()[0]:.1f} at the end")

    def figure(r: dict[str, Any]) -> str:
        return f"{r['all_s']:.2f}" if r["all_s"] is not None else "none"

    print(f"CLUSTER_AGENTS={n} CLUSTER_ALL_COMMITTED_S={figure(clus)} NODE_KILL_ALL_COMMITTED_S={figure(kill)} "
          f"MOSQUITTO_ALL_COMMITTED_S={figure(mosq)}")


# ---------------------------------------------------------------------- main


def main() -> None:
    """Run the three parts and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200, help="agents in the fleet (200)")
    parser.add_argument("--per-process", type=int, default=25, help="agents per worker process (25)")
    parser.add_argument("--quick", action="store_true", help="20 agents, short windows")
    parser.add_argument("--cluster", action="store_true",
                        help="the rollout on a three-node NATS cluster, clean and with a node killed, against one "
                             "Mosquitto (instead of the three parts)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--raw-subscriber", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.generate:
        port, count, devices, payloads = args.generate
        return generator_main(int(port), int(count), int(devices), payloads)
    if args.raw_subscriber:
        return raw_subscriber_main(int(args.raw_subscriber[0]), int(args.raw_subscriber[1]), 300.0)
    n = 20 if args.quick and args.agents == 200 else args.agents
    cpu_window = 5.0 if args.quick else 20.0
    load_count = 20_000 if args.quick else 100_000
    stream_s = 3.0 if args.quick else 8.0
    rounds = 2 if args.quick else 3
    share_s = 8.0 if args.quick else 25.0

    if args.cluster:
        return cluster_main(n, args.per_process)

    from edgefleet.bundle import Bundle
    from edgefleet.converter.fleet.observer import FleetObserver
    from edgefleet.converter.fleet.publish import prepare, publish_chunks
    from edgefleet.protocol import Telemetry, Topics, canonical_json
    from edgefleet.transport import MqttSettings, Transport

    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        work = Path(tmp)
        bundle, key, pub = make_bundle(work)
        broker = fleet_mosquitto(work / "broker")
        try:
            topics = Topics()
            observer = FleetObserver(topics, leaves=("status", "state"))
            host = Transport(MqttSettings(url=broker.url, client_id="bench-host"), on_message=observer.handle)
            host.start()
            assert host.wait_connected(10), host.last_error
            observer.attach(host)
            prepared = prepare(Bundle.load(bundle), key=key)
            publish_chunks(host, topics, prepared.chunks)
            print(f"model: {prepared.deployment.model.artifact.size} bytes, {len(prepared.chunks)} chunks; "
                  f"probation 1 s, telemetry every 1 s; {os.cpu_count()} cores, load average "
                  f"{os.getloadavg()[0]:.1f} before the run")

            # 1. baseline: one agent alone
            solo = Fleet(work / "agents", broker.url, pub, ["solo-0"], ["solo"], 1, 1.0)
            try:
                wait_online(observer, ["solo-0"], 60)
                base = rollout(host, observer, prepared, "solo", ["solo-0"], 120)
            finally:
                solo.stop()
            if base["all_s"] is None:
                raise RuntimeError(f"the single agent did not commit: {base}")

            # 1. the fleet
            devices = [f"agent-{i:04d}" for i in range(n)]
            t0 = time.monotonic()
            fleet = Fleet(work / "agents", broker.url, pub, devices, [GROUP], args.per_process, 1.0)
            stream: dict[str, Any] = {}
            try:
                started_s = time.monotonic() - t0
                online_s = wait_online(observer, devices, 300) + started_s
                result = rollout(host, observer, prepared, GROUP, devices, 600)
                # 2a. the fleet's own telemetry through one collector
                p = collect(broker.url, work / "fleet.jsonl", "--duration", str(stream_s))
                stream = finish(p, stream_s + 60)
            finally:
                fleet.stop()
            host.stop()
            warnings = fleet.warnings()
            if warnings:
                print(f"{len(warnings)} warning(s) from the agents, e.g.:", *warnings[:3], sep="\n  ")
            if result["failed"]:
                print(f"FAILED on {len(result['failed'])} agent(s), e.g. {next(iter(result['failed'].items()))}")
            all_s = result["all_s"]
            print(f"fleet: {n} agents in {math.ceil(n / args.per_process)} worker process(es); started in "
                  f"{started_s:.1f} s, all online after {online_s:.1f} s")
            print(f"  single agent alone (baseline): committed {base['all_s']:.2f} s after the group document")
            if all_s is not None:
                print(f"  {n} agents: first committed {result['first_s']:.2f} s, median {result['median_s']:.2f} s, "
                      f"all activated {result['activated_all_s']:.2f} s, all committed {all_s:.2f} s "
                      f"(x{all_s / base['all_s']:.1f} the single agent; goal <= {GOALS['committed_s']:g} s for 200)")
            else:
                print(f"  only {result['committed']} of {n} committed within {result['elapsed_s']:.0f} s")
            expected = n / 1.0
            print(f"  fleet telemetry into one collector: {stream['by_kind'].get('telemetry', 0)} messages in "
                  f"{stream['elapsed_s']:.1f} s = {stream['messages'] / stream['elapsed_s']:.0f} msg/s "
                  f"(the agents send {expected:.0f} msg/s: ratio {stream['messages'] / stream['elapsed_s'] / expected:.2f})"
                  f"; {stream['bad']} bad")

            # 2b. the collector's ceiling under a generator's load
            sample = Telemetry.from_dict(json.loads((work / "fleet.jsonl").read_text().splitlines()[0])["doc"])
            payloads = work / "payloads.hex"
            payloads.write_text("\n".join(
                canonical_json({**sample.to_dict(), "device_id": f"gen-{i}"}).hex() for i in range(200)))
            size = len(bytes.fromhex(payloads.read_text().split()[0]))
            raw_runs, our_runs, shared_runs = [], [], []
            for _ in range(rounds):  # interleaved, best of each: a busy neighbour hits them alike
                raw_runs.append(generated_load(broker.port, broker.url, work, load_count, 1, payloads, [["raw"]])[0])
                our_runs.append(generated_load(broker.port, broker.url, work, load_count, 1, payloads,
                                               [["--count", str(load_count), "--duration", "300"]])[0])
                shared_runs.append(generated_load(broker.port, broker.url, work, load_count, 1, payloads,
                                                  [["--share", "bench", "--duration", str(share_s)]] * 2))
            raw = max(raw_runs, key=lambda r: r["msgs_per_s"])
            ours = max(our_runs, key=lambda r: r["msgs_per_s"])
            together = []
            for shared in shared_runs:
                span = max(s["last_received"] for s in shared) - min(s["first_received"] for s in shared)
                together.append((sum(s["messages"] for s in shared), [s["messages"] for s in shared],
                                 sum(s["messages"] for s in shared) / span))
            best_shared = max(together, key=lambda t: t[2])
            print(f"collector under a generator's load ({load_count} telemetry documents of {size} bytes, QoS 0, "
                  "one generator process; broker, generator and collector share the machine; best of "
                  f"{rounds} interleaved rounds):")
            print(f"  bare paho subscriber counting (baseline): {raw['msgs_per_s']:.0f} msg/s "
                  f"(rounds: {rates(raw_runs)})")
            print(f"  edgectl fleet collect (parse, check, write JSONL): {ours['msgs_per_s']:.0f} msg/s "
                  f"(rounds: {rates(our_runs)}), {ours['messages']} received, "
                  f"{ours['bad']} bad; x{ours['msgs_per_s'] / raw['msgs_per_s']:.2f} the baseline "
                  f"(goal >= {GOALS['collector']:g} msg/s)")
            print(f"  two collectors sharing $share/bench: {best_shared[0]} received together, {best_shared[1]} "
                  f"each, {best_shared[2]:.0f} msg/s together (rounds: {', '.join(f'{t[2]:.0f}' for t in together)})")

            # 3. one idle agent's CPU
            cpu_on = idle_cpu(work, broker.url, bundle, 1.0, cpu_window)
            cpu_off = idle_cpu(work, broker.url, bundle, 3600.0, cpu_window)
            print(f"idle agent with one model over {cpu_window:g} s: {cpu_on:.2f} % of one core with telemetry every "
                  f"1 s; {cpu_off:.2f} % with telemetry every hour (baseline): {cpu_on - cpu_off:+.2f} points "
                  f"(goal <= {GOALS['cpu_pct']:g} %)")
            print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine makes every figure "
                  "worse, never better)")
        finally:
            broker.kill()
    committed = f"{all_s:.2f}" if all_s is not None else "none"
    print(f"FLEET_AGENTS={n} FLEET_ALL_COMMITTED_S={committed} COLLECTOR_MSGS_PER_S={ours['msgs_per_s']:.0f}")


if __name__ == "__main__":
    main()
