"""A broker that refuses a device's chunk subscriptions: the download fails with the broker's refusal
as its reason, within the stall time, instead of waiting in DOWNLOADING forever.

A real NATS server whose device user may not subscribe to chunk topics (a permission, as an ACL
would), a real agent process, and `edgectl push --wait`, which must end with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.testing.nats import Nats
from tests.support.engines import Edgectl, Site

DEVICE_PASSWORD = "dev-1-password"
# The operator (anonymous here) may do anything; dev-1 may not subscribe to chunks. NATS maps the MQTT
# topic edgefleet/chunks/{sha256} to the subject edgefleet.chunks.{sha256}.
AUTH = f"""
authorization {{
  users = [
    {{user: "operator", password: "operator-password"}}
    {{user: "dev-1", password: "{DEVICE_PASSWORD}", permissions: {{subscribe: {{deny: ["edgefleet.chunks.>"]}}}}}}
  ]
}}
no_auth_user: "operator"
"""


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, key_dir: Path, edgectl: Edgectl) -> Iterator[Site]:
    with Nats(tmp_path_factory.mktemp("nats-acl"), extra=AUTH) as nats:
        s = Site(nats.url, "3.1.1", tmp_path / "agents", key_dir, edgectl, name="nats with a chunk ACL")
        yield s
        s.close()


def test_refused_chunk_subscriptions_fail_the_download_with_the_reason(
        site: Site, make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    password = tmp_path / "dev-1.password"
    password.write_text(DEVICE_PASSWORD)
    a = site.agent("dev-1", mqtt={"username": "dev-1", "password_file": str(password)},
                   security={"download_stall_s": 3})
    site.wait_online("dev-1")
    code, out, err = site.ctl("push", make_bundle("dense_f32", version=1), "--device", "dev-1", "--key",
                              site.key_dir, "--wait", "--timeout", "60")
    text = " ".join((out + err).split())
    assert code == 1, text
    assert "download stalled: no chunk arrived for 3 s" in text, text
    assert "the broker refused" in text and "chunk subscription(s)" in text, text
    assert "1 allowed at a time now" in text, text
    model = a.status()["state"]["models"].get("m", {})
    assert model.get("active") is None, "nothing may be installed"
