"""What shadow probation costs and how long it takes to decide (issue 18, "Shadow probation").

SHADOW_OVERHEAD_RATIO: served p50 of Serving.predict on the medium model (bench/agent_overhead.py's
MobileNet-like CNN, about a millisecond) while a candidate shadows it at a 20 % sample rate, over the
p50 of the same model under another name that nothing shadows, in the same process and the same
interleaved rounds (so the shadow worker's CPU use is on the machine for both). Every interpreter
uses one thread.

SHADOW_DECISION_S: the real agent (`edge-agent run`) serving the medium model under 50 requests/s
through its local API; a faithful new version is installed with a shadow policy (the agent's
defaults: 200 samples at 20 %), timed from the install request to the shadow verdict (the SHADOW
event that passes it on to ACTIVATING). At 50 req/s and 20 %, 200 samples take about 20 s.

Run: .venv/bin/python bench/shadow.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from agent_overhead import BUILD, interleaved  # bench/ is the script's folder

from edgefleet.agent.api.client import ApiClient
from edgefleet.agent.serving.models import Serving
from edgefleet.bundle import MODEL_FILE, Bundle
from edgefleet.protocol.documents import Policy, ShadowPolicy
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.reliability import build_bundle

THREADS = 1
RATE = 0.2
REQUESTS_PER_S = 50.0
GOALS = {"overhead": 1.05, "decision_s": 30.0}


def overhead(work: Path, rounds: int, per_round: int) -> tuple[float, float, float]:
    """(p50 µs unshadowed, p50 µs shadowed, ratio) of Serving.predict on the medium model."""
    v1 = build_bundle(work / "m-v1", (work / "medium.tflite").read_bytes(), name="m", version=1)
    v2 = build_bundle(work / "m-v2", (work / "medium.tflite").read_bytes(), name="m", version=2)
    serving = Serving(num_threads=THREADS)
    for name in ("plain", "shadowed"):
        serving.activate(name, v1 / MODEL_FILE, Bundle.load(v1).deployment)
    serving.start_shadow("shadowed", v2 / MODEL_FILE, Bundle.load(v2).deployment, sample_rate=RATE, queue_size=16)
    x = np.random.default_rng(0).normal(size=(1, 128, 128, 3)).astype(np.float32)
    try:
        times = interleaved({"plain": lambda: serving.predict("plain", [x]),
                             "shadowed": lambda: serving.predict("shadowed", [x])}, rounds, per_round)
        figures = serving.shadow_figures("shadowed")
    finally:
        serving.stop_shadow("shadowed")
    plain, shadowed = float(np.median(times["plain"]) * 1e6), float(np.median(times["shadowed"]) * 1e6)
    assert figures is not None and figures.samples > 0 and figures.agreed == figures.samples, figures
    print(f"shadow run: {figures.samples} compared, {figures.agreed} agreed, {figures.dropped} dropped, "
          f"candidate p50 {figures.candidate_p50_ms:.3f} ms")
    return plain, shadowed, shadowed / plain


def decision(work: Path, repeats: int) -> list[float]:
    """Seconds from the install request to the shadow verdict, `repeats` times, under 50 req/s."""
    model = (work / "medium.tflite").read_bytes()
    agent = AgentProcess(work / "agent", health={"probation_s": 1, "min_requests": 5},
                         runtime={"num_threads": THREADS})
    assert agent.cli("install", str(build_bundle(work / "d-v1", model, name="m", version=1))).returncode == 0
    agent.start()
    stop = threading.Event()
    x = np.random.default_rng(1).normal(size=(1, 128, 128, 3)).astype(np.float32)

    def traffic() -> None:
        client = ApiClient(socket_path=agent.socket, timeout=10)
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                client.predict_npy("m", x)
            except Exception:
                pass
            next_at += 1.0 / REQUESTS_PER_S
            stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    out = []
    try:
        for i in range(repeats):
            bundle = build_bundle(work / f"d-v{i + 2}", model, name="m", version=i + 2,
                                  policy=Policy(shadow=ShadowPolicy(sample_rate=RATE)))
            log_size = agent.log_path.stat().st_size
            t0 = time.monotonic()
            res = agent.cli("install", str(bundle))
            assert "SHADOW" in res.stdout, res.stdout + res.stderr
            verdict = None
            while verdict is None and time.monotonic() - t0 < 120:
                text = agent.log_path.read_text()[log_size:]
                if re.search(rf"model m: (ACTIVATING|REJECTED) v{i + 2}", text):
                    verdict = time.monotonic() - t0
                time.sleep(0.05)
            assert verdict is not None and f"REJECTED v{i + 2}" not in agent.log_path.read_text()[log_size:]
            out.append(verdict)
            state = agent.client.admin("status")["state"]["models"]["m"]
            while state["phase"] != "COMMITTED":
                time.sleep(0.2)
                state = agent.client.admin("status")["state"]["models"]["m"]
    finally:
        stop.set()
        thread.join(5)
        agent.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and one decision")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-shadow-") as tmp:
        work = Path(tmp)
        print(f"building the medium model with TensorFlow in a subprocess into {work} ...", flush=True)
        subprocess.run([sys.executable, "-c", BUILD, str(work)], check=True, timeout=900)
        rounds, per_round = (10, 50) if args.quick else (30, 100)
        plain, shadowed, ratio = overhead(work, rounds, per_round)
        print(f"served p50 on the medium model: {plain:.1f} µs without shadow, {shadowed:.1f} µs with a candidate "
              f"shadowing {RATE:.0%} of requests")
        times = decision(work, 1 if args.quick else 3)
        print(f"install to shadow verdict at {REQUESTS_PER_S:g} req/s, {RATE:.0%} sampled, 200 samples: "
              + ", ".join(f"{t:.1f} s" for t in times))
    decision_s = float(np.median(times))
    figures: dict[str, Any] = {"SHADOW_OVERHEAD_RATIO": round(ratio, 4), "SHADOW_DECISION_S": round(decision_s, 2),
                               "SHADOW_PLAIN_P50_US": round(plain, 1)}
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    met = ratio <= GOALS["overhead"] and decision_s <= GOALS["decision_s"]
    print(f"goals: SHADOW_OVERHEAD_RATIO <= {GOALS['overhead']}, SHADOW_DECISION_S <= {GOALS['decision_s']:g}: "
          f"{'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "decision_s": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
