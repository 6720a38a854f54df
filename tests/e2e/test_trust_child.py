"""Issue 12, attack 6 and the child part of 9: activation cannot hang the agent; a smaller validation child.

- A model that passes its golden inputs but loops forever on zeros (the serving path's warm-up input)
  is refused at VALIDATING, in the child, by a real agent that stays healthy and keeps serving v1.
- An agent killed while ACTIVATING `max_boot_failures` times rejects that deployment at the next start
  and serves v1, instead of starting the same activation again and again.
- Inside the validation child (the same entry point, running a probe instead of the model checks):
  no credentials or secrets in the environment, a private TMPDIR, no network (not the test's own
  Mosquitto, not a Unix socket) and, where the kernel allows namespaces, no view of the state or
  credentials directories; where it does not (as under the shipped systemd unit), the rest still holds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle import GOLDEN_FILE, MODEL_FILE, load_golden
from edgefleet.errors import RequestError
from edgefleet.protocol import SigningKey
from edgefleet.runtime import load_model
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.reliability import AgentWith, X, build_bundle, fast_tmp
from edgefleet.testing.waiting import wait_for
from tests.support.trust_models import model as trust_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Path, SigningKey, Path]]:
    root = fast_tmp("edgefleet-trust-child-")
    key = SigningKey.generate()
    (root / "keys").mkdir()
    (root / "keys" / "edgefleet.pub").write_bytes(key.public_pem())
    yield root, key, build_bundle(root / "v1", "dense_f32", version=1, key=key)
    shutil.rmtree(root, ignore_errors=True)


def _agent(keys: Path, where: Path, **sections: dict[str, Any]) -> AgentWith:
    config: dict[str, dict[str, Any]] = {
        "health": {"probation_s": 0.5, "min_requests": 1, "max_boot_failures": 2},
        "validation": {"timeout_s": 5, "latency_runs": 5},
        "security": {"trusted_keys": [str(keys / "edgefleet.pub")]},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return AgentWith(where, **config)  # type: ignore[arg-type]


def _model(agent: AgentWith) -> dict[str, Any]:
    return agent.state_file()["models"]["m"]  # type: ignore[no-any-return]


def _committed_v1(agent: AgentWith, v1: Path) -> None:
    res = agent.cli("install", str(v1))
    assert res.returncode == 0, res.stdout + res.stderr
    agent.start()
    wait_for(lambda: agent.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED",
             timeout=30, what="v1 committed")


def test_a_model_that_hangs_on_zeros_is_rejected_at_validating(world: tuple[Path, SigningKey, Path],
                                                               tmp_path: Path) -> None:
    root, key, v1 = world
    v2 = build_bundle(tmp_path / "v2", trust_model("hang_on_zeros_f32").read_bytes(), version=2, key=key)
    # the model is genuine about its golden inputs: it answers them, at once, as the bundle says
    golden_inputs, golden_outputs = load_golden((v2 / GOLDEN_FILE).read_bytes(), 1, 1)
    loaded = load_model(v2 / MODEL_FILE)
    for s in range(len(golden_inputs[0])):
        np.testing.assert_allclose(loaded.run([golden_inputs[0][s]])[0], golden_outputs[0][s], atol=1e-5)

    agent = _agent(root / "keys", tmp_path / "agent")
    try:
        _committed_v1(agent, v1)
        expected = agent.client.predict("m", X)
        started = time.monotonic()
        res = agent.cli("install", str(v2))
        took = time.monotonic() - started
        assert res.returncode == 1, res.stdout + res.stderr
        assert "validation timed out after 5s during the warm-up on zeros" in res.stdout, res.stdout
        assert took < 20
        rec = _model(agent)
        assert rec["phase"] == "REJECTED" and rec["active"]["deployment"]["model"]["version"] == 1
        assert rec["last_outcome"]["result"] == "rejected" and rec["last_outcome"]["figures"]["stage"] == \
            "warm-up on zeros"
        # the agent never tried to activate it: its loop stayed free, it is healthy and serves v1 as before
        assert "ACTIVATING v2" not in agent.log()
        health = agent.client.health()
        assert health["http_status"] == 200 and health["status"] == "ok", health
        assert health["agent"]["status"] == "ok" and health["agent"]["reason"] is None, health
        assert agent.client.predict("m", X) == expected
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.kill()


def test_deaths_while_activating_reject_the_deployment(world: tuple[Path, SigningKey, Path], tmp_path: Path) -> None:
    root, key, v1 = world
    v2 = build_bundle(tmp_path / "v2", "dense_f32_v2", version=2, key=key)
    agent = _agent(root / "keys", tmp_path / "agent")
    crash = {"EDGEFLEET_FAULT": "activate:served"}  # SIGKILL after the serving path loaded v2, before the switch
    try:
        _committed_v1(agent, v1)
        agent.stop()
        for death in (1, 2):
            agent.start(env=crash)
            try:
                agent.client.admin("install", {"path": str(v2)})
            except (RequestError, OSError):
                pass  # killed in the middle, as intended
            assert agent.proc is not None and agent.proc.wait(30) == -signal.SIGKILL
            agent.client.close()
            rec = _model(agent)
            assert rec["phase"] == "ACTIVATING" and rec["activation"]["deaths"] == death - 1, rec
        # the next start counts the second death and refuses the deployment: v1 serves, no third attempt
        agent.start(env=crash)
        rec = agent.client.admin("status")["state"]["models"]["m"]
        assert rec["phase"] == "REJECTED" and rec["active"]["version"] == 1, rec
        assert "died 2 time(s) while activating" in rec["last_outcome"]["reason"], rec
        assert agent.client.predict("m", X)["edgefleet"]["model_version"] == 1
        assert _model(agent)["activation"]["deaths"] == 2
        # offered again (a retained document would do this at every start), it is not activated again
        res = agent.cli("install", str(v2), env=crash)
        assert res.returncode == 1, res.stdout + res.stderr
        time.sleep(0.5)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-2000:]
        assert _model(agent)["phase"] == "REJECTED" and agent.client.predict("m", X)["edgefleet"]["model_version"] == 1
        assert agent.log().count("ACTIVATING v2") == 2
        assert agent.stop() == 0
    finally:
        agent.kill()


def test_a_hang_while_activating_makes_healthz_unhealthy(world: tuple[Path, SigningKey, Path],
                                                        tmp_path: Path) -> None:
    """Should the serving path's load ever hang in the agent (here: a loop stalled at the crash point),
    /healthz stops saying ok once the loop has been silent for hang_timeout_s."""
    root, key, v1 = world
    v2 = build_bundle(tmp_path / "v2", "dense_f32_v2", version=2, key=key)
    agent = _agent(root / "keys", tmp_path / "agent", health={"hang_timeout_s": 1.0})
    try:
        _committed_v1(agent, v1)
        agent.stop()
        agent.start(env={"EDGEFLEET_FAULT": "stall:activate"})
        assert agent.client.health()["status"] == "ok"
        from edgefleet.agent.api.client import ApiClient

        admin = ApiClient(socket_path=agent.socket, timeout=1.0)
        try:
            admin.admin("install", {"path": str(v2)})
        except (RequestError, OSError):
            pass  # the reply never comes: the loop is stuck
        health = wait_for(lambda: (h := agent.client.health())["status"] == "unhealthy" and h, timeout=10,
                          what="unhealthy")
        assert health["http_status"] == 503
        assert "loop has not run" in health["agent"]["reason"] and "m ACTIVATING" in health["agent"]["reason"]
        assert agent.client.predict("m", X)["edgefleet"]["model_version"] == 1  # the API threads still answer with v1
    finally:
        agent.kill()


# --- inside the child -------------------------------------------------------------------------------

SECRET = "mqtt-password-value-7f3a"


def _userns_allowed() -> bool:
    return subprocess.run(["unshare", "--user", "--net", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture
def probe_world(tmp_path: Path, broker: Mosquitto, world: tuple[Path, SigningKey, Path]) -> Iterator[dict[str, Any]]:
    state = tmp_path / "state"
    (state / "blobs").mkdir(parents=True)
    (state / "state.json").write_text("{}")
    blob = state / "blobs" / "model"
    shutil.copy(world[2] / MODEL_FILE, blob)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(SECRET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "api.sock"))
    listener.listen(4)
    # the probe is meaningful: from outside the child, all of these are reachable
    with socket.create_connection(("127.0.0.1", broker.port), timeout=3):
        pass
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(tmp_path / "api.sock"))
    assert (creds / "mqtt-password").read_text() == SECRET
    args = {
        "payload": {"model_path": str(blob), "credential_file": str(creds / "mqtt-password"),
                    "state_file": str(state / "state.json"), "state_dir": str(state), "port": broker.port,
                    "unix_socket": str(tmp_path / "api.sock")},
        "files": {"model_path": str(blob)},
        "hide": [str(state), str(creds)],
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), CREDENTIALS_DIRECTORY=str(creds), EDGEFLEET_MQTT_PASSWORD=SECRET,
               NOTIFY_SOCKET=str(tmp_path / "notify.sock"), TMPDIR=str(tmp_path))
    yield {"args": args, "env": env, "state": state, "blob": blob, "tmp": tmp_path}
    listener.close()


def _run_probe(world: dict[str, Any], prefix: list[str]) -> dict[str, Any]:
    res = subprocess.run([*prefix, sys.executable, "-m", "tests.support.trust_probe", json.dumps(world["args"])],
                         capture_output=True, text=True, env=world["env"], cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _common_checks(found: dict[str, Any], world: dict[str, Any]) -> None:
    allowed = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TMPDIR", "TMP", "TEMP", "HOME"}
    assert set(found["env"]) <= allowed, found["env"]
    assert SECRET not in found["env_values"] and str(world["tmp"] / "credentials") not in found["env_values"]
    # a private, empty TMPDIR of its own, removed after the child
    tmpdir = Path(found["tmpdir"])
    assert tmpdir.parent == world["tmp"] and tmpdir.name.startswith("edge-agent-validate-"), tmpdir
    assert found["tmpdir_entries"] == 0 and found["tmpdir_mode"] == "0o700"
    assert found["tmp_write"] == "done: written"
    assert not tmpdir.exists()
    # the model it was given is readable through its descriptor
    assert found["model_read"] == f"done: {world['blob'].stat().st_size} bytes"
    # no network: not the test's Mosquitto, not a Unix socket (such as the agent's API)
    assert found["tcp"].startswith("refused"), found["tcp"]
    assert found["unix"].startswith("refused"), found["unix"]
    assert found["sandbox_env"] is True and found["sandbox_network"] is True


def test_the_child_has_no_secrets_no_network_and_no_state(probe_world: dict[str, Any]) -> None:
    found = _run_probe(probe_world, [])
    _common_checks(found, probe_world)
    assert found["sandbox_seccomp"] is True  # x86-64 and AArch64 test machines
    assert found["sandbox_namespaces"] is _userns_allowed(), found
    if found["sandbox_namespaces"]:
        # the state and credentials directories are covered: nothing to read, nothing to write
        assert found["credential_read"].startswith("refused"), found["credential_read"]
        assert found["state_read"].startswith("refused"), found["state_read"]
        assert found["state_write"].startswith("refused"), found["state_write"]
        assert not (probe_world["state"] / "planted").exists()


def test_without_user_namespaces_the_child_falls_back_quietly(probe_world: dict[str, Any]) -> None:
    """As under the shipped unit (RestrictNamespaces=yes): namespaces are refused, and validation still
    works, with the environment, TMPDIR and seccomp layers in force and the refusal in the figures."""
    deny = ["unshare", "--user", "--map-root-user", "sh", "-c",
            'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
    if subprocess.run([*deny, "true"], capture_output=True).returncode != 0:
        pytest.fail("cannot make a user namespace that forbids nested ones on this machine")
    found = _run_probe(probe_world, deny)
    _common_checks(found, probe_world)
    assert found["sandbox_namespaces"] is False and "namespaces" in found["sandbox_refused"], found
    assert found["sandbox_seccomp"] is True


def test_validation_figures_say_which_sandbox_applied(world: tuple[Path, SigningKey, Path], tmp_path: Path) -> None:
    root, key, v1 = world
    agent = _agent(root / "keys", tmp_path / "agent")
    try:
        _committed_v1(agent, v1)
        figures = _model(agent)["active"]["validation"]
        assert figures["sandbox_env"] is True and figures["sandbox_network"] is True
        assert figures["sandbox_namespaces"] is _userns_allowed()
    finally:
        agent.kill()
