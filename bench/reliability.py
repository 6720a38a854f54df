"""Reliability figures: SIGKILLs over many update cycles, hostile models, broker faults and a soak.

Everything runs against real `edge-agent run` processes (and a real Mosquitto for the broker faults):
- kill loop (edgefleet.testing.killing): one agent on one state directory is killed with SIGKILL at random
  EDGEFLEET_FAULT crash points and random moments, cycle after cycle of install, probation, commit and
  rollback; after every restart state.json must parse, the active model must be a version that was
  installed with an intact blob, and the API must answer with it. Baseline: the time of a clean
  start on the same state directory, beside the time to come back from a kill.
- hostile models (edgefleet.testing.hostile): bit flips (header and vtables first), truncations, every edited
  flatbuffer (absurd shapes, buffers and offsets out of range, unknown ops), huge arenas, a memory hog
  and a hang, each installed through the admin API of an agent serving a committed v1. Baseline: the
  install of a good model, beside the cost of refusing a hostile one.
- broker and disk faults (edgefleet.testing.faults, the scenarios tests/e2e/test_faults.py runs): the
  broker killed during a download and during probation, frozen with SIGSTOP, a full disk; a few rounds each.
- soak (edgefleet.testing.soak): 50 requests/s from five clients over two updates and a rollback. Baseline:
  p99 latency outside the switch windows, beside the p99 inside them.
- trust attacks (tests/*/test_trust_*.py): client-id takeover, forged inventories and group claims,
  replays and re-posted manifests after a signed rollback, forged copies, floods of unsigned documents,
  withheld chunks, a frozen channel, a hanging warm-up, fail-open configurations, oversized and
  cross-origin API requests; `TRUST_ATTACKS=<scenarios> TRUST_BREACHES=<not refused>` (goal: 0 breaches).

Profiles: short (default: 110 kills, about 270 hostile files, 40 s soak; a few minutes), long (300
kills, the 10-minute soak), --quick (for bench/run_all.py --quick: fewer kills and files, 20 s soak;
below the goals). The last line is
``KILLS=<n> CORRUPT_STATES=<n> LOST_MODELS=<n> SOAK_REQUESTS=<n> FAILED_REQUESTS=<n> HOSTILE_MODELS=<n> AGENT_CRASHES=<n>``.
Goal: at least 100 kills and 200 hostile models with zero corrupt states, lost models, failed requests
and agent crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PROFILES = {
    "quick": {"kills": 30, "flips": 30, "cuts": 20, "soak_s": 20.0, "fault_rounds": 1},
    "short": {"kills": 110, "flips": 100, "cuts": 60, "soak_s": 40.0, "fault_rounds": 2},
    "long": {"kills": 300, "flips": 300, "cuts": 150, "soak_s": 600.0, "fault_rounds": 5},
}


def say(text: str) -> None:
    """Progress on stdout, flushed (run_all echoes it as it comes)."""
    print(text, flush=True)


def kill_part(work: Path, kills: int, seed: int) -> dict[str, Any]:
    """The kill loop, plus a clean restart of the same state directory as the baseline."""
    from edgefleet.testing.killing import KillLoop
    from edgefleet.testing.reliability import build_bundle

    bundles = [build_bundle(work / "a", "dense_f32", version=1), build_bundle(work / "b", "dense_f32_v2", version=1)]
    loop = KillLoop(work / "loop", bundles, seed=seed)
    report = loop.run(kills, progress=say)
    agent = loop.agent
    clean = []
    for _ in range(3):  # baseline: clean starts (after a SIGTERM) of the state directory the kills left
        t0 = time.monotonic()
        agent.start()
        clean.append(time.monotonic() - t0)
        agent.stop()
    per_cycle = report.seconds / max(1, report.cycles)
    say(f"kills: {report.summary()}")
    for problem in report.problems:
        say(f"kills: PROBLEM {problem}")
    say(f"kills: one kill cycle (start after a kill, check, work, SIGKILL) takes {per_cycle:.2f} s; a clean start "
        f"takes {min(clean):.2f} s (ratio {per_cycle / min(clean):.2f})")
    crashes = sum(1 for p in report.problems if "not by SIGKILL" in p)
    return {"kills": report.kills, "cycles": report.cycles, "by": dict(report.by),
            "corrupt_states": report.corrupt_states, "lost_models": report.lost_models,
            "api_failures": report.api_failures, "problems": report.problems, "crashes": crashes,
            "versions_seen": len(report.versions_seen), "seconds": report.seconds, "clean_start_s": min(clean)}


def hostile_part(work: Path, flips: int, cuts: int) -> dict[str, Any]:
    """Every hostile file through a real agent's admin API; a good install first as the baseline."""
    from edgefleet.protocol import SigningKey
    from edgefleet.testing.hostile import Hostile, bit_flips, flatbuffer_edits, huge_arenas, truncations
    from edgefleet.testing.reliability import AgentWith, build_bundle, run_hostile_through_agent, zoo_model
    from edgefleet.testing.waiting import wait_for

    key = SigningKey.generate()
    key.write(work / "keys")
    v1 = build_bundle(work / "v1", "dense_f32", version=1, key=key)
    agent = AgentWith(work / "agent", validation={"timeout_s": 3, "memory_mb": 512, "latency_runs": 5},
                      health={"probation_s": 0.5, "min_requests": 1},
                      security={"trusted_keys": [str(work / "keys" / "edgefleet.pub")]})
    assert agent.cli("install", str(v1)).returncode == 0
    agent.start()
    try:
        wait_for(lambda: agent.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED", timeout=60,
                 what="v1 committed")
        good = []
        for i in range(3):  # baseline: installing good models (and rolling each back)
            bundle = build_bundle(work / f"good-{i}", "dense_f32_v2", version=2 + i, key=key)
            t0 = time.monotonic()
            answer = agent.client.admin("install", {"path": str(bundle)})
            good.append(time.monotonic() - t0)
            assert answer["phase"] == "PROBATION", answer
            agent.client.admin("rollback", {"model": "m"})
        base = zoo_model("dense_f32").read_bytes()
        files = [*bit_flips(base, flips), *truncations(base, cuts), *flatbuffer_edits(base), *huge_arenas(base),
                 Hostile("arena", "memhog_f32", zoo_model("memhog_f32").read_bytes()),
                 Hostile("arena", "hang_f32", zoo_model("hang_f32").read_bytes())]
        say(f"hostile: {len(files)} files ({flips} bit flips, {cuts} truncations, "
            f"{len(files) - flips - cuts - 2} edited flatbuffers and arenas, a memory hog, a hang)")
        report = run_hostile_through_agent(agent, v1, files, key, work, first_version=1000)
        alive = agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.kill()
    per_file = report.seconds / max(1, report.ran)
    say(f"hostile: {report.summary()}")
    say(f"hostile: refusing one takes {per_file:.3f} s on average; installing a good model takes "
        f"{min(good):.3f} s (ratio {per_file / min(good):.2f})")
    lost = report.kinds.get("lost the previous model", 0)
    return {"ran": report.ran, "rejected": report.rejected, "accepted": report.accepted, "kinds": dict(report.kinds),
            "agent_crashes": report.agent_crashes + (0 if alive else 1), "lost_models": lost,
            "seconds": report.seconds, "good_install_s": min(good)}


def fault_part(work: Path, rounds: int) -> dict[str, Any]:
    """The broker and disk fault scenarios (the ones tests/e2e/test_faults.py runs), `rounds` times each."""
    from edgefleet.testing.faults import SCENARIOS
    from edgefleet.testing.reliability import running_fleet

    passed, failures, crashes = 0, [], 0
    for r in range(rounds):
        for i, scenario in enumerate(SCENARIOS):
            root = work / f"{r}{i}"  # short: the agent's API socket path must fit AF_UNIX's 108 bytes
            root.mkdir(parents=True)
            t0 = time.monotonic()
            try:
                with running_fleet(root) as fleet:
                    scenario(fleet, root)
                    crashes += sum(1 for a in fleet.agents if a.proc is not None and a.proc.poll() is not None)
                passed += 1
                say(f"faults: {scenario.__name__}: ok in {time.monotonic() - t0:.1f} s")
            except Exception as err:  # reported and counted; the other scenarios still run
                failures.append(f"{scenario.__name__}: {type(err).__name__}: {str(err)[:300]}")
                say(f"faults: {scenario.__name__}: FAILED {failures[-1]}")
                traceback.print_exc(file=sys.stderr)
    return {"run": rounds * len(SCENARIOS), "passed": passed, "failures": failures, "agent_crashes": crashes}


def soak_part(work: Path, seconds: float) -> dict[str, Any]:
    """The soak on a real agent serving a committed v1."""
    from edgefleet.testing.soak import SWITCH_TAIL_S, soak_fresh_agent

    report, alive = soak_fresh_agent(work, seconds=seconds, progress=say)
    for line in report.summary().splitlines():
        say(line)
    steady_p99 = report.quantile(99, False)
    say(f"soak: p99 during the switches {report.quantile(99, True):.2f} ms vs {steady_p99:.2f} ms outside them "
        f"(ratio {report.quantile(99, True) / steady_p99:.2f}; windows from each admin call to {SWITCH_TAIL_S:g} s "
        "after it returned)")
    return {"requests": report.requests, "failed": report.failed, "errors": dict(report.errors),
            "p50_ms": report.quantile(50), "p99_ms": report.quantile(99), "p99_switch_ms": report.quantile(99, True),
            "p99_steady_ms": steady_p99, "switches": report.switches, "versions": dict(report.versions),
            "rss_start": report.rss_start, "rss_end": report.rss_end, "agent_crashes": 0 if alive else 1,
            "seconds": report.seconds}


def trust_part(work: Path) -> dict[str, Any]:
    """Issue 12's attacks: the tests/*/test_trust_*.py modules, run as they are by pytest.

    Each test case performs one attack scenario (several attempts each) against real agents, a real
    Mosquitto with the shipped config and the real API; a breach is a case whose attack was not refused.
    """
    import subprocess
    import xml.etree.ElementTree as ET

    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*/test_trust_*.py"))
    report = work / "trust.xml"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *modules], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    cases = ET.parse(report).getroot().iter("testcase")
    tried, breaches = 0, []
    for case in cases:
        if case.find("skipped") is not None:
            continue
        tried += 1
        if case.find("failure") is not None or case.find("error") is not None:
            breaches.append(f"{case.get('classname')}::{case.get('name')}")
    say(f"trust: {tried} attack scenarios from {len(modules)} modules in {time.monotonic() - t0:.0f} s, "
        f"{len(breaches)} not refused" + (f": {breaches}" if breaches else ""))
    return {"tried": tried, "breaches": breaches, "modules": modules}


def main() -> int:
    """Run the parts and print the figures; the last line is the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["short", "long"], default="short",
                        help="short: 110 kills, ~270 hostile files, 40 s soak; long: 300 kills, 10-minute soak")
    parser.add_argument("--quick", action="store_true", help="a smaller run (below the goals), for run_all --quick")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill loop's choices")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args()
    profile = PROFILES["quick" if args.quick else args.profile]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from edgefleet.testing.reliability import CACHE_ENV

    os.environ.setdefault(CACHE_ENV, str(ROOT / ".cache"))  # the model zoo the test suite builds there
    work = Path(tempfile.mkdtemp(prefix="edgefleet-reliability-"))
    started = time.monotonic()
    figures: dict[str, Any] = {"profile": "quick" if args.quick else args.profile}
    try:
        say(f"profile {figures['profile']}: {profile}")
        figures["hostile"] = hostile_part(work / "hostile", profile["flips"], profile["cuts"])
        figures["kills"] = kill_part(work / "kills", profile["kills"], args.seed)
        figures["faults"] = fault_part(work / "faults", profile["fault_rounds"])
        figures["soak"] = soak_part(work / "soak", profile["soak_s"])
        figures["trust"] = trust_part(work / "trust")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k, h, f, s = figures["kills"], figures["hostile"], figures["faults"], figures["soak"]
    crashes = k["crashes"] + h["agent_crashes"] + f["agent_crashes"] + s["agent_crashes"]
    lost = k["lost_models"] + h["lost_models"]
    figures["seconds"] = time.monotonic() - started
    say(f"broker and disk faults: {f['passed']} of {f['run']} scenarios passed"
        + (f"; failures: {f['failures']}" if f["failures"] else ""))
    say(f"total {figures['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    say(f"FAULT_SCENARIOS={f['passed']}/{f['run']}")
    say(f"TRUST_ATTACKS={figures['trust']['tried']} TRUST_BREACHES={len(figures['trust']['breaches'])}")
    say(f"KILLS={k['kills']} CORRUPT_STATES={k['corrupt_states']} LOST_MODELS={lost} SOAK_REQUESTS={s['requests']} "
        f"FAILED_REQUESTS={s['failed']} HOSTILE_MODELS={h['ran']} AGENT_CRASHES={crashes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
