"""SIGKILL at random points over many update cycles, on one state directory, with a check after every restart.

One real agent process is started, given work (install the next version through the admin API,
traffic so probation can judge it, sometimes a rollback) and killed with SIGKILL: either by itself at
an EDGEFLEET_FAULT crash point drawn at random, or by a timer at a random moment (or, if neither
happened, at the end of its work). It is then started again on the same state directory, which is the
check: state.json parses, the active model is one of the versions installed and its blob matches its
digest, the API answers with that version, and a model served before the kill is still served.
Used by tests/e2e/test_faults.py (a short run) and bench/reliability.py (a hundred kills and more).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.bundle import MANIFEST_FILE
from edgefleet.errors import RequestError
from edgefleet.protocol import canonical_json, parse_json
from edgefleet.testing.reliability import AgentWith, X

CRASH_POINTS = [
    "install:begun", "install:stored", "install:validated", "activate:served", "activate:saved",
    "write:state:tmp", "write:state:tmp#2", "write:state:tmp#3", "write:state:tmp#4", "write:state:tmp#6",
    "write:state:renamed", "write:state:renamed#2", "write:state:renamed#4", "state:bak", "state:bak#2",
    "state:bak#5", "write:blob:tmp", "write:blob:tmp#2", "write:blob:renamed", "write:blob:renamed#2",
    "commit:before", "commit:saved", "rollback:before", "rollback:served", "rollback:saved",
]
"""The agent's crash points on the install -> probation -> commit -> rollback path (agent/faults.py)."""


@dataclass
class KillReport:
    """What a kill loop did and found."""

    cycles: int = 0
    kills: int = 0
    by: Counter[str] = field(default_factory=Counter)
    """Kills by how they happened: crash point, timer, or at the end of the work."""
    corrupt_states: int = 0
    lost_models: int = 0
    api_failures: int = 0
    problems: list[str] = field(default_factory=list)
    versions_seen: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for logs and the bench."""
        how = ", ".join(f"{k} {n}" for k, n in self.by.most_common())
        return (f"{self.cycles} cycles, {self.kills} SIGKILLs ({how}) in {self.seconds:.0f} s: corrupt states "
                f"{self.corrupt_states}, lost models {self.lost_models}, API failures {self.api_failures}")


def _bundle(src: Path, dest: Path, version: int) -> Path:
    """A copy of bundle `src` as `version` with a fresh deployment id (unsigned: the agent trusts no keys)."""
    shutil.copytree(src, dest)
    raw = parse_json((src / MANIFEST_FILE).read_bytes())
    raw.pop("signature", None)
    raw.pop("key_id", None)
    raw["model"]["version"] = version
    raw["deployment_id"] = f"kill-{version}-{time.monotonic_ns()}"
    (dest / MANIFEST_FILE).write_bytes(canonical_json(raw))
    return dest


class KillLoop:
    """The agent, the bundles, and what is known about every installed version."""

    def __init__(self, root: Path, bundles: list[Path], seed: int = 0):
        self.root = root
        self.bundles = bundles
        self.rng = random.Random(seed)
        self.agent = AgentWith(root / "agent", health={"probation_s": 0.3, "min_requests": 1},
                               validation={"timeout_s": 30, "latency_runs": 5})
        self.report = KillReport()
        self.digests: dict[int, str] = {}
        """Model version -> artifact SHA-256 of every version handed to the agent."""
        self.version = 1
        self.served: int | None = None

    # --- one cycle -----------------------------------------------------------------------------

    def run(self, cycles: int, progress: Callable[[str], None] | None = None) -> KillReport:
        """`cycles` kill cycles, then a last restart and check."""
        started = time.monotonic()
        first = _bundle(self.bundles[0], self.root / "bundle-1", 1)
        self.digests[1] = parse_json((first / MANIFEST_FILE).read_bytes())["model"]["artifact"]["sha256"]
        res = self.agent.cli("install", str(first))
        if res.returncode != 0:
            raise AssertionError(f"cannot install v1: {res.stdout}{res.stderr}")
        for cycle in range(cycles):
            self.cycle(cycle)
            self.report.seconds = time.monotonic() - started
            if progress is not None and (cycle + 1) % 10 == 0:
                progress(f"kill loop: {self.report.summary()}")
        self.start_and_check({})
        self.agent.kill()
        self.report.seconds = time.monotonic() - started
        return self.report

    def cycle(self, cycle: int) -> None:
        """Start (and check), work, die."""
        self.report.cycles += 1
        point = self.rng.choice(CRASH_POINTS) if self.rng.random() < 0.5 else None
        env = {"EDGEFLEET_FAULT": point} if point else {}
        if not self.start_and_check(env):
            self._died("crash point at start")
            return
        timer = None
        if point is None:
            timer = threading.Timer(self.rng.uniform(0.0, 1.5), self._sigkill)
            timer.start()
        self.work(cycle)
        if timer is not None:
            timer.cancel()
        proc = self.agent.proc
        assert proc is not None
        if proc.poll() is None:
            self._sigkill()
            proc.wait(30)
            self._died("end of work")
        else:
            proc.wait(30)
            self._died("crash point" if point else "timer")

    def _sigkill(self) -> None:
        proc = self.agent.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    def _died(self, how: str) -> None:
        proc = self.agent.proc
        assert proc is not None
        code = proc.wait(30)
        if code != -signal.SIGKILL:
            self.report.problems.append(f"agent exited with {code} ({how}), not by SIGKILL:\n{self.agent.log()[-2000:]}")
        self.report.kills += 1
        self.report.by[how] += 1
        self.agent.client.close()

    def work(self, cycle: int) -> None:
        """Install the next version, drive probation with traffic, sometimes roll back; stop at the first error."""
        self.version += 1
        bundle = _bundle(self.bundles[self.version % len(self.bundles)], self.root / f"bundle-{self.version}",
                         self.version)
        self.digests[self.version] = parse_json((bundle / MANIFEST_FILE).read_bytes())["model"]["artifact"]["sha256"]
        client = self.agent.client
        try:
            client.admin("install", {"path": str(bundle)})
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                client.predict("m", X)
                phase = client.admin("status")["state"]["models"]["m"]["phase"]
                if phase != "PROBATION":
                    break
                time.sleep(0.05)
            if self.rng.random() < 0.3:
                client.admin("rollback", {"model": "m"})
        except (RequestError, OSError):
            pass  # killed meanwhile, as intended
        finally:
            shutil.rmtree(bundle, ignore_errors=True)

    # --- the check after every restart ---------------------------------------------------------

    def start_and_check(self, env: dict[str, str]) -> bool:
        """Start the agent; False if it died before answering (a crash point at start), else check it."""
        state_path = self.agent.state_dir / "state.json"
        before = None
        if state_path.exists():
            try:
                before = json.loads(state_path.read_bytes())
            except ValueError as err:
                self.report.corrupt_states += 1
                self.report.problems.append(f"state.json does not parse after a kill: {err}")
        self.agent.start(wait=False, env=env)
        try:
            self.agent.wait_ready(60)
        except AssertionError:
            if self.agent.proc is not None and self.agent.proc.poll() == -signal.SIGKILL:
                return False
            raise
        self.check(before)
        return True

    def check(self, before: dict[str, Any] | None) -> None:
        """The restarted agent serves a known version whose blob is intact, and nothing served was lost."""
        active = (before or {}).get("models", {}).get("m", {}).get("active")
        if before is not None and active is None and self.served is not None:
            self.report.lost_models += 1
            self.report.problems.append(f"v{self.served} was served, state.json has no active model")
        try:
            answer = self.agent.client.predict("m", X)
        except RequestError as err:
            if self.served is not None:
                self.report.lost_models += 1
                self.report.problems.append(f"v{self.served} was served; after the restart: {err}")
            else:
                self.report.api_failures += 1
            return
        version = int(answer["edgefleet"]["model_version"])
        self.report.versions_seen[version] += 1
        if version not in self.digests:
            self.report.lost_models += 1
            self.report.problems.append(f"serves v{version}, which was never installed")
            return
        try:
            status = self.agent.client.admin("status")["state"]["models"]["m"]
        except RequestError:
            # a crash point armed for this cycle may fire in the daemon's loop (a commit, a rollback) while
            # the check asks: that is this cycle's kill, not a failure of the check
            if self.agent.proc is not None and _exit_code(self.agent.proc) == -signal.SIGKILL:
                return
            raise
        if status["active"]["version"] != version:
            self.report.corrupt_states += 1
            self.report.problems.append(f"serves v{version}, state says v{status['active']['version']}")
        blob = self.agent.state_dir / "blobs" / self.digests[version]
        if not blob.is_file() or hashlib.sha256(blob.read_bytes()).hexdigest() != self.digests[version]:
            self.report.corrupt_states += 1
            self.report.problems.append(f"the blob of the active v{version} is missing or corrupt")
        self.served = version


def _exit_code(proc: Any, wait_s: float = 2.0) -> int | None:
    """The process's exit code, waiting up to `wait_s` for it to end (None: still running)."""
    import subprocess

    try:
        return int(proc.wait(timeout=wait_s))
    except subprocess.TimeoutExpired:
        return None
