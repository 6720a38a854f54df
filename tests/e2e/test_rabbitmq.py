"""What an operator sees on RabbitMQ 3.10 (unsupported: no retained message reaches a wildcard
subscription): a real agent connects and reports its status, which the broker keeps, yet `push --wait`
to its group finds nobody to follow and stops before publishing anything, with one line that points
to `edgectl broker check` (which names the cause: tests/integration/test_broker_check.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.protocol import Topics
from edgefleet.testing.broker import Inbox, client
from edgefleet.testing.rabbitmq import RabbitMq, missing
from edgefleet.testing.waiting import wait_for
from tests.support.engines import Edgectl, Site

T = Topics("edgefleet")
PASSWORD = "dev-1-secret"


def retained(url: str, topic_filter: str) -> list[str]:
    """The topics of the retained messages a fresh subscription to `topic_filter` is sent."""
    inbox = Inbox()
    t = client(url, inbox, protocol="3.1.1")
    try:
        t.subscribe(topic_filter, wait=5)
        return [m.topic for m in inbox.quiet(0.5) if m.retain and m.payload]
    finally:
        t.stop()


@pytest.fixture
def rabbitmq(tmp_path: Path) -> Iterator[RabbitMq]:
    """A private RabbitMQ node where dev-1 may log in (RabbitMQ takes an agent's user name as a login)."""
    why = missing()
    if why:
        pytest.fail(why, pytrace=False)
    with RabbitMq(tmp_path / "rabbitmq", users={"dev-1": PASSWORD}) as r:
        yield r


def test_push_wait_to_a_group_finds_nobody_and_publishes_nothing(
        rabbitmq: RabbitMq, tmp_path: Path, key_dir: Path, edgectl: Edgectl,
        make_bundle: Callable[..., Path]) -> None:
    password_file = tmp_path / "dev-1.password"
    password_file.write_text(PASSWORD)
    site = Site(rabbitmq.url, "auto", tmp_path / "agents", key_dir, edgectl, name="rabbitmq")
    try:
        dev = site.agent("dev-1", mqtt={"password_file": str(password_file)})
        wait_for(lambda: dev.client.health()["agent"]["mqtt"]["connected"], timeout=20, interval=0.2,
                 what="dev-1 connected to RabbitMQ")
        status = T.status("dev-1")
        wait_for(lambda: retained(site.url, status) == [status], timeout=10, interval=0.2,
                 what="dev-1's retained status on its exact topic")
        assert retained(site.url, T.all_devices("status")) == []  # what edgectl subscribes to

        site.ok("inventory", "set", "lab", "dev-1", "--key", key_dir)
        code, out, err = site.ctl("push", make_bundle("dense_f32", version=1), "--group", "lab", "--key", key_dir,
                                  "--wait", "--timeout", 10)
        assert (code, out) == (2, ""), err
        assert err.count("\n") == 1
        assert err.startswith("edgectl: error: push --wait: none of the 1 member(s) of group lab ever reported a "
                              "status on this broker, so there is nothing to wait for; nothing was published.")
        assert "see 'edgectl broker check'" in err
        assert retained(site.url, T.group_model("lab", "m")) == []  # nothing was published indeed
        assert dev.status()["state"]["models"] == {}
    finally:
        site.close()
