"""The agent as a process: install, serve, roll back, stop, and survive being killed at any point."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle import MANIFEST_FILE, MODEL_FILE
from edgefleet.errors import RequestError
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.waiting import wait_for
from tests.support.helpers import swap_file

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    procs: list[AgentProcess] = []

    def make(**sections: Any) -> AgentProcess:
        a = AgentProcess(tmp_path / f"agent{len(procs)}", **sections)
        procs.append(a)
        return a

    yield make
    for a in procs:
        a.kill()


def _version(a: AgentProcess) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def test_install_serve_commit_rollback_and_stop(agent: Any, make_bundle: Any) -> None:
    a = agent().start()
    assert a.client.health()["agent"]["models"] == {}
    res = a.cli("install", str(make_bundle("dense_f32", version=1, labels=["a", "b", "c", "d"])))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "m: PROBATION (v1)"
    answer = a.client.predict("m", X)
    assert answer["edgefleet"]["model_version"] == 1 and answer["edgefleet"]["top_k"][0][0]["label"] in "abcd"
    for _ in range(5):
        a.client.predict("m", X)
    wait_for(lambda: a.status()["state"]["models"]["m"]["phase"] == "COMMITTED", what="v1 committed")
    res = a.cli("install", str(make_bundle("dense_f32_v2", version=2)))
    assert res.returncode == 0 and _version(a) == 2
    res = a.cli("rollback", "--model", "m")
    assert res.returncode == 0, res.stderr
    assert "ROLLED_BACK (now v1)" in res.stdout and _version(a) == 1
    status = a.cli("status")
    assert "m: ROLLED_BACK  active v1" in status.stdout and "v2 rolled_back: rollback requested by the operator" in status.stdout
    started = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - started < 5
    assert not a.socket.exists()
    assert a.state_file()["running"] is False


def test_rejected_bundles_leave_the_old_model_serving(agent: Any, make_bundle: Any, zoo: Any) -> None:
    a = agent(validation={"timeout_s": 3}, health={"probation_s": 600}).start()
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    bad = make_bundle("dense_f32_v2", version=2)
    data = (bad / MODEL_FILE).read_bytes()
    swap_file(bad, MODEL_FILE, data[: len(data) // 3])
    res = a.cli("install", str(bad))
    assert res.returncode == 1 and "REJECTED" in res.stdout and "model does not load" in res.stdout
    hang = make_bundle("dense_f32_v2", version=3)
    swap_file(hang, MODEL_FILE, zoo("hang_f32").read_bytes())
    res = a.cli("install", str(hang))
    assert res.returncode == 1 and "validation timed out after 3s" in res.stdout
    assert _version(a) == 1 and a.proc is not None and a.proc.poll() is None
    assert "validation timed out" in a.status()["state"]["models"]["m"]["last_outcome"]["reason"]
    assert "REJECTED v3: validation timed out" in a.log()


def test_cli_errors(agent: Any, tmp_path: Path) -> None:
    a = agent()
    res = a.cli("install", str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.strip().endswith("not a bundle directory")
    res = a.cli("rollback")
    assert res.returncode == 2 and "name the model" in res.stderr
    res = a.cli("predict", "--model", "m", "--input-json", "[[1,2")
    assert res.returncode == 2 and "--input-json: not valid JSON" in res.stderr


def test_install_and_predict_without_a_daemon(agent: Any, make_bundle: Any, tmp_path: Path) -> None:
    a = agent()
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    np.save(tmp_path / "x.npy", np.array(X, dtype=np.float32))
    res = a.cli("predict", "--model", "m", "--input", str(tmp_path / "x.npy"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["edgefleet"]["model_version"] == 1
    # --json is the output's format, as everywhere else; the input as JSON is --input-json
    res = a.cli("predict", "--model", "m", "--input-json", json.dumps(X))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "model version 1" and res.stdout.splitlines()[1].startswith("  0: ")
    assert a.status()["running"] is False


def test_second_agent_on_the_same_state_refuses_to_start(agent: Any) -> None:
    a = agent().start()
    b = AgentProcess(a.root / "second", state_dir=str(a.state_dir))
    b.start(wait=False)
    assert b.wait_exit(20) == 1
    assert "another agent is already running" in b.log()


CRASH_POINTS = [
    "install:begun", "install:stored", "install:validated", "activate:served", "activate:saved",
    "write:state:tmp", "write:state:tmp#2", "write:state:tmp#3", "write:state:tmp#4", "write:state:tmp#5",
    "write:state:renamed", "write:state:renamed#2", "write:state:renamed#3", "write:state:renamed#5",
    "state:bak", "state:bak#3", "write:blob:tmp", "write:blob:renamed", "write:blob:tmp#2",
    "commit:before", "commit:saved", "rollback:before", "rollback:served", "rollback:saved",
]


def test_killed_at_any_point_the_agent_comes_back_serving(agent: Any, make_bundle: Any) -> None:
    """SIGKILL at each crash point of install → probation → commit → rollback, then restart and check."""
    import shutil

    from edgefleet.errors import RequestError

    v1, v2 = make_bundle("dense_f32", version=1), make_bundle("dense_f32_v2", version=2)
    template = agent(health={"probation_s": 0.5, "min_requests": 1})
    assert template.cli("install", str(v1)).returncode == 0
    template.start()
    wait_for(lambda: template.state_file()["models"]["m"]["phase"] == "COMMITTED", what="v1 committed")
    assert template.stop() == 0
    killed = 0
    for point in CRASH_POINTS:
        a = agent(health={"probation_s": 0.5, "min_requests": 1})
        shutil.copytree(template.state_dir, a.state_dir)
        a.start(wait=False, env={"EDGEFLEET_FAULT": point})
        try:
            a.wait_ready()
            a.client.admin("install", {"path": str(v2)})
            wait_for(lambda a=a: a.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED",
                     timeout=20, what="commit")
            a.client.admin("rollback", {"model": "m"})
        except (AssertionError, RequestError, OSError):
            pass  # the agent died on the way, as intended
        assert a.proc is not None
        a.proc.wait(20)
        assert a.proc.returncode == -signal.SIGKILL, f"{point}: agent was not killed ({a.proc.returncode})"
        killed += 1
        # restart: state parses, the served model is v1 or v2, the API answers
        state = json.loads((a.state_dir / "state.json").read_text())
        assert state["models"]["m"]["active"]["deployment"]["model"]["version"] in (1, 2), point
        a.client.close()
        a.start()
        served = _version(a)
        assert served in (1, 2), point
        assert a.client.admin("status")["state"]["models"]["m"]["active"]["version"] == served
        assert a.stop() == 0
    assert killed == len(CRASH_POINTS) >= 20


def test_install_passes_the_bundle_the_agent_cannot_read(agent: Any, make_bundle: Any, tmp_path: Path) -> None:
    """The agent runs sandboxed as its own user: the CLI passes open files (SCM_RIGHTS), not a path."""
    a = agent().start()
    bundle = make_bundle("dense_f32", version=1)
    private = tmp_path / "private"
    bundle.rename(private)
    private.chmod(0o700)
    try:
        res = a.cli("install", str(private))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _version(a) == 1
        from edgefleet.agent.api.client import ApiClient

        # a manifest that is not JSON is refused with a reason, and nothing changes
        junk = tmp_path / "junk"
        shutil.copytree(private, junk)
        (junk / MANIFEST_FILE).write_bytes(b"not json")
        client = ApiClient(socket_path=a.socket)
        with pytest.raises(RequestError) as info:
            client.install_bundle(junk)
        assert info.value.status == 400 and MANIFEST_FILE in str(info.value)
    finally:
        private.chmod(0o755)
    assert _version(a) == 1


def test_a_hanging_validation_dies_with_a_killed_agent(agent: Any, make_bundle: Any, zoo: Any) -> None:
    import threading

    import psutil

    a = agent(validation={"timeout_s": 120}).start()
    hang = make_bundle("dense_f32", version=1)
    swap_file(hang, MODEL_FILE, zoo("hang_f32").read_bytes())
    threading.Thread(target=lambda: a.cli("install", str(hang)), daemon=True).start()
    assert a.proc is not None
    me = psutil.Process(a.proc.pid)
    # the fork server (and multiprocessing's resource tracker) and the validation child spinning on the model
    def spinning() -> bool:
        return any(c.cpu_percent(0.2) > 20 for c in me.children(recursive=True))

    wait_for(spinning, timeout=30, what="a validation child spinning on the model")
    children = me.children(recursive=True)
    a.proc.kill()
    a.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {alive}"
