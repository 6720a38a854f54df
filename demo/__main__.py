"""`make demo`: train, convert, sign, push over MQTT, serve, roll back a bad model, and sum up.

Everything runs on this machine in `demo-out/`: a broker (Mosquitto when installed, otherwise an
embedded MQTT 3.1.1 broker), one agent process, and the real `edgectl` commands, printed as they run.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
DEVICE = "demo-board-1"
GROUP = "demo"
BIN = Path(sys.executable).parent


@dataclass
class Summary:
    """The figures the demo prints at the end."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, value: str) -> None:
        self.lines.append((what, value))


class Demo:
    """One run of the demo; `processes` are stopped whatever happens."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.processes: list[subprocess.Popen[bytes]] = []
        self.summary = Summary()
        # EDGEFLEET_STATE_DIR: what edgectl remembers (the newest inventory seen) stays in demo-out.
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
                        EDGEFLEET_STATE_DIR=str(OUT / "edgectl-state"))
        self.env.pop("NOTIFY_SOCKET", None)
        self.broker_url = ""
        self.started = time.monotonic()
        self.step_no = 0
        self._step_started = self.started

    # --- output ----------------------------------------------------------------------------------

    def step(self, text: str) -> None:
        now = time.monotonic()
        if self.step_no:
            print(f"  ({now - self._step_started:.1f} s)")
        self._step_started = now
        self.step_no += 1
        print(f"\n\033[1m[{self.step_no}] {text}\033[0m" if sys.stdout.isatty() else f"\n[{self.step_no}] {text}",
              flush=True)

    def run(self, *cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command line, show it, and return its result."""
        shown = " ".join(c if " " not in c else repr(c) for c in cmd)
        print(f"  $ {shown.replace(str(OUT) + '/', '')}", flush=True)
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=OUT)
            self.processes.append(proc)
            while proc.poll() is None:
                # Short waits, not one blocking wait: with TensorFlow's threads in this process, Ctrl-C may
                # land on another thread, and only a main thread that wakes up raises KeyboardInterrupt.
                try:
                    proc.wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        res = subprocess.CompletedProcess(proc.args, proc.returncode, text, "")
        if not quiet:
            for line in text.rstrip().splitlines():
                print(f"    {line}")
        if check and res.returncode != 0:
            raise SystemExit(f"demo: `{shown}` failed with exit code {res.returncode}")
        return res

    # --- parts -----------------------------------------------------------------------------------

    def start_broker(self) -> None:
        port = _free_port()
        mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if self.args.broker == "mosquitto" or (self.args.broker == "auto" and mosquitto):
            if not mosquitto:
                raise SystemExit("demo: --broker mosquitto but no mosquitto binary is installed")
            conf = OUT / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            "max_queued_messages 20000\nmax_inflight_messages 20\n"
                            + ("user root\n" if os.geteuid() == 0 else ""))
            with open(OUT / "mosquitto.log", "wb") as log:
                proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
            kind = "Mosquitto"
        else:
            with open(OUT / "broker.log", "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "demo.embedded_broker", str(port)], env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
            kind = "embedded amqtt broker (MQTT 3.1.1; Mosquitto is not installed)"
            self.env["EDGEFLEET_MQTT_PROTOCOL"] = "3.1.1"
        self.processes.append(proc)
        _wait_port(port, proc)
        self.broker_url = f"mqtt://127.0.0.1:{port}"
        self.env["EDGEFLEET_BROKER"] = self.broker_url
        print(f"  {kind} on {self.broker_url}")
        self.summary.add("broker", kind.split(" (")[0])

    def train(self) -> dict[str, Any]:
        """Digits, a small CNN (v1) and a much larger one with the same interface (v2)."""
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[..., None]
        y = digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
        np.savez(OUT / "digits-train.npz", x=x_train, y=y_train)
        np.savez(OUT / "digits-test.npz", x=x_test, y=y_test)
        (OUT / "labels.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
        from edgefleet.converter.tflite.native import captured_native_output, import_tensorflow

        tf = import_tensorflow()
        tf.keras.utils.set_random_seed(0)
        L = tf.keras.layers

        def fit(model: Any, epochs: int) -> float:
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
            return float(model.evaluate(x_test, y_test, verbose=0)[1])

        t0 = time.perf_counter()
        v1 = tf.keras.Sequential([L.Input((8, 8, 1)), L.Conv2D(32, 3, padding="same", activation="relu"),
                                  L.Conv2D(64, 3, padding="same", activation="relu"), L.MaxPooling2D(),
                                  L.Flatten(), L.Dense(128, activation="relu"), L.Dense(10, activation="softmax")])
        with captured_native_output():
            acc1 = fit(v1, 15)
        v1.save(OUT / "digits-v1.keras")
        # v2: someone's "better" model, much wider: it passes its golden test but is far slower.
        v2 = tf.keras.Sequential([L.Input((8, 8, 1)), L.Flatten(), L.Dense(1536, activation="relu"),
                                  L.Dense(1536, activation="relu"), L.Dense(1536, activation="relu"),
                                  L.Dense(10, activation="softmax")])
        with captured_native_output():
            acc2 = fit(v2, 2)
        v2.save(OUT / "digits-v2.keras")
        took = time.perf_counter() - t0
        print(f"  {len(x_train)} training / {len(x_test)} held-out digits; v1 CNN {acc1:.1%} held-out accuracy, "
              f"v2 wide MLP {acc2:.1%} ({took:.1f} s)")
        self.summary.add("float v1 accuracy (Keras, held out)", f"{acc1:.1%}")
        return {"x_test": x_test, "y_test": y_test}

    def convert(self) -> None:
        self.run("edgectl", "keygen", "-o", "keys")
        self.run("edgectl", "convert", "digits-v1.keras", "-o", "bundles/digits-v1", "--name", "digits",
                       "--version", "1", "--data", "digits-train.npz", "--eval-data", "digits-test.npz",
                       "--prune", "0.8", "--quantize", "int8", "--labels", "labels.txt", "--key", "keys", quiet=True)
        report = json.loads((OUT / "bundles" / "digits-v1" / "report.json").read_text())
        _show_report("v1", report)
        self.summary.add("v1 bundle (80 % pruned, int8)", _sizes(report))
        self.summary.add("v1 accuracy after conversion (held-out digits, --eval-data)", _accuracy(report))
        self.run("edgectl", "convert", "digits-v2.keras", "-o", "bundles/digits-v2", "--name", "digits",
                       "--version", "2", "--data", "digits-train.npz", "--eval-data", "digits-test.npz",
                       "--labels", "labels.txt", "--key", "keys", "--max-accuracy-drop", "5", quiet=True)
        report = json.loads((OUT / "bundles" / "digits-v2" / "report.json").read_text())
        _show_report("v2", report)

    def start_agent(self) -> Any:
        from edgefleet.agent.api.client import ApiClient

        state = OUT / "agent"
        state.mkdir()
        protocol = self.env.get("EDGEFLEET_MQTT_PROTOCOL", "auto")
        (state / "agent.toml").write_text(
            f'device_id = "{DEVICE}"\ngroups = ["{GROUP}"]\nstate_dir = "{state / "state"}"\n'
            f'[mqtt]\nurl = "{self.broker_url}"\nprotocol = "{protocol}"\nreconnect_max_s = 2.0\n'
            f'[security]\ntrusted_keys = ["{OUT / "keys" / "edgefleet.pub"}"]\n'
            f'[health]\nprobation_s = 5\nmin_requests = 20\nmax_latency_ratio = 1.5\nlatency_slack_ms = 0.5\n'
            f'[telemetry]\ninterval_s = 2\n[api]\nsocket = "{state / "api.sock"}"\n')
        print(f"  $ edge-agent --config agent/agent.toml run   (device {DEVICE}, group {GROUP})")
        with open(state / "agent.log", "wb") as log:
            proc = subprocess.Popen([str(BIN / "edge-agent"), "--config", str(state / "agent.toml"), "run"],
                                    stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=OUT)
        self.processes.append(proc)
        self.agent = proc
        self.socket = state / "api.sock"
        client = ApiClient(socket_path=self.socket)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.health()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"demo: the agent did not start; see {state / 'agent.log'}") from None
                time.sleep(0.1)
        print("  agent is up: local API on demo-out/agent/api.sock, no model installed yet")
        return client

    def push_v1(self) -> None:
        # Group membership comes from the operator-signed inventory, never from what a board claims.
        self.run("edgectl", "inventory", "set", GROUP, DEVICE, "--key", "keys")
        t0 = time.monotonic()
        self.run("edgectl", "push", "bundles/digits-v1", "--group", GROUP, "--key", "keys", "--wait",
                 "--timeout", "60")
        took = time.monotonic() - t0
        self.summary.add("v1 push to committed (incl. 5 s probation)", f"{took:.1f} s")

    def predict(self, client: Any, data: dict[str, Any]) -> None:
        x, y = data["x_test"], data["y_test"]
        correct, times = 0, []
        for xi, yi in zip(x, y, strict=True):
            t0 = time.perf_counter()
            answer = client.predict("digits", [xi.tolist()])
            times.append(time.perf_counter() - t0)
            correct += int(answer["edgefleet"]["top_k"][0][0]["label"] == str(yi))
        acc = correct / len(y)
        p50 = float(np.percentile(np.array(times) * 1e3, 50))
        print(f"  {len(y)} held-out digits through the local API (JSON, with top-k labels): accuracy {acc:.1%}, "
              f"p50 {p50:.2f} ms per request")
        sample = client.predict("digits", [x[0].tolist()])
        print(f"  e.g. {json.dumps(sample['edgefleet']['top_k'][0][:3])} (model v{sample['edgefleet']['model_version']})")
        self.summary.add("v1 accuracy on the board (local API)", f"{acc:.1%}")
        self.summary.add("request latency through the API, p50", f"{p50:.2f} ms")

    def push_bad_v2(self, client: Any, data: dict[str, Any]) -> None:
        stop = threading.Event()
        served: dict[int, int] = {}

        def traffic() -> None:
            from edgefleet.agent.api.client import ApiClient

            c = ApiClient(socket_path=self.socket)
            i = 0
            while not stop.is_set():
                try:
                    v = c.predict("digits", [data["x_test"][i % len(data["x_test"])].tolist()])["edgefleet"]["model_version"]
                    served[v] = served.get(v, 0) + 1
                except Exception:
                    served[-1] = served.get(-1, 0) + 1
                i += 1
                stop.wait(0.01)

        print("  live traffic: a client sends held-out digits to the local API all along")
        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        t0 = time.monotonic()
        res = self.run("edgectl", "push", "bundles/digits-v2", "--group", GROUP, "--key", "keys", "--wait",
                       "--timeout", "60",
                       check=False)
        took = time.monotonic() - t0
        time.sleep(0.5)
        stop.set()
        worker.join(5)
        if res.returncode == 0:
            raise SystemExit("demo: the bad v2 was committed; expected an automatic rollback")
        version = client.predict("digits", [data["x_test"][0].tolist()])["edgefleet"]["model_version"]
        outcome = client.admin("status")["state"]["models"]["digits"]["last_outcome"]
        reason = f"{outcome['result']}: {outcome['reason']}"
        print(f"  rolled back automatically in {took:.1f} s; the board serves v{version} again")
        print(f"  requests during the update: {sum(v for k, v in served.items() if k > 0)} answered "
              f"(v1: {served.get(1, 0)}, v2: {served.get(2, 0)}), {served.get(-1, 0)} failed")
        self.summary.add("bad v2 rolled back after", f"{took:.1f} s")
        self.summary.add("rollback reason", reason)
        self.summary.add("failed requests during the switch", str(served.get(-1, 0)))

    def fleet(self) -> None:
        self.run("edgectl", "fleet", "status", "--trust", "keys")
        self.run("edge-agent", "--config", "agent/agent.toml", "status")

    def stop_agent(self) -> None:
        t0 = time.monotonic()
        self.agent.send_signal(signal.SIGTERM)
        code = self.agent.wait(15)
        print(f"  agent stopped with exit code {code} in {time.monotonic() - t0:.2f} s (SIGTERM, as systemd does)")
        self.summary.add("agent shutdown", f"exit {code}")

    def cleanup(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # --- the whole thing -------------------------------------------------------------------------

    def main(self) -> int:
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir()
        print("edgefleet demo: everything runs on this machine, in demo-out/")
        self.step("Broker")
        self.start_broker()
        self.step("Train a small CNN on scikit-learn's digits (and a wide, slow MLP for later)")
        data = self.train()
        self.step("Convert, prune 80 %, quantize to int8, validate, sign (edgectl)")
        self.convert()
        self.step("Start an agent (edge-agent), as systemd would on a board")
        client = self.start_agent()
        self.step("Push v1 to the group and wait until the board commits it")
        self.push_v1()
        self.step("Predict through the board's local API")
        self.predict(client, data)
        self.step("Push a bad v2: it passes its golden test, but is far slower on live traffic")
        self.push_bad_v2(client, data)
        self.step("The fleet as the operator sees it")
        self.fleet()
        self.step("Shut down")
        self.stop_agent()
        self.cleanup()
        width = max(len(w) for w, _ in self.summary.lines)
        print("\nSummary")
        for what, value in self.summary.lines:
            print(f"  {what:<{width}}  {value}")
        print(f"  {'demo run time':<{width}}  {time.monotonic() - self.started:.0f} s")
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the broker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the broker did not start")


def _sizes(report: dict[str, Any]) -> str:
    size = report["size"]
    return (f"{size['bytes'] / 1024:.0f} KiB on disk, {size['wire_bytes'] / 1024:.0f} KiB on the wire: "
            f"{size['ratio_wire']:.1f}x less than the float32 TFLite model ({size['float32_tflite_bytes'] / 1024:.0f} KiB)")


def _accuracy(report: dict[str, Any]) -> str:
    v = report["validation"]
    low, high = v.get("accuracy_drop_interval_pt") or (None, None)
    ci = f", 95 % CI {low:.2f} to {high:.2f}" if low is not None else ""
    return (f"{v['accuracy']:.1%} (float model {v['float_accuracy']:.1%}, drop {v['accuracy_drop_pt']:.2f} points"
            f"{ci} on {v['samples']} samples)")


def _show_report(label: str, report: dict[str, Any]) -> None:
    print(f"    {label}: {_sizes(report)}")
    print(f"    {' ' * len(label)}  accuracy {_accuracy(report)}, {report['quantization']['summary']}, "
          f"host p50 {report['latency']['p50_ms']:.3f} ms, converted in {report['timings']['total_s']:.0f} s")


def main() -> int:
    """Entry point of `python -m demo`."""
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                        help="auto: Mosquitto when installed, else the embedded amqtt broker")
    demo = Demo(parser.parse_args())

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return demo.main()
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
