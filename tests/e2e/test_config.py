"""Agent configuration: defaults, one test per validation rule, secrets from files, check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, load_config, parse_config
from edgefleet.credentials import read_secret
from edgefleet.errors import ConfigError
from edgefleet.protocol import SigningKey


def test_empty_file_means_all_defaults() -> None:
    config = parse_config("")
    assert config == AgentConfig(device_id=config.device_id)
    assert config.mqtt.url is None and config.api.socket == Path("/run/edge-agent/api.sock")
    assert config.health.max_latency_ratio == 1.5 and config.runtime.backend == "auto"


def test_values_are_read() -> None:
    config = parse_config(
        'device_id = "pi-7"\ngroups = ["line-1", "eu"]\nstate_dir = "/srv/agent"\n'
        '[mqtt]\nurl = "mqtts://broker.example:8883"\npassword_file = "mqtt-password"\n'
        '[runtime]\nbackend = "tflite"\nnum_threads = 2\n[api]\nport = 8501\nsocket = ""\n'
        '[health]\nprobation_s = 0\n'
    )
    assert config.device_id == "pi-7" and config.groups == ("line-1", "eu")
    assert config.state_dir == Path("/srv/agent") and config.mqtt.url == "mqtts://broker.example:8883"
    assert config.mqtt.password_file == Path("mqtt-password") and config.runtime.num_threads == 2
    assert config.api.port == 8501 and config.api.socket is None and config.health.probation_s == 0.0


@pytest.mark.parametrize("text, message", [
    ("colour = 1", "colour: unknown key"),
    ("[mqtt]\nhost = 'x'", "mqtt.host: unknown key"),
    ("[telemetry]\ninterval = 5", "telemetry.interval: unknown key"),
    ("mqtt = 5", "mqtt: expected a table [mqtt]"),
    ("groups = 'a'", "groups: expected a list"),
    ("groups = ['ok', 'a/b']", "groups: 'a/b' must be"),
    ("device_id = '../etc'", "device_id: '../etc' must be"),
    ("device_id = 7", "device_id: expected a string"),
    ("state_dir = 1", "state_dir: expected a path string"),
    ("log_level = 'loud'", "log_level: expected one of"),
    ("[mqtt]\nurl = 'http://broker'", "mqtt.url: expected mqtt://host[:port] or mqtts://host[:port]"),
    ("[mqtt]\nkeepalive_s = 0", "mqtt.keepalive_s: expected a value > 0"),
    ("[mqtt]\nkeepalive_s = 1.5", "mqtt.keepalive_s: expected an integer"),
    ("[mqtt]\nreconnect_min_s = 100", "mqtt.reconnect_min_s: must not exceed"),
    ("[security]\ntrusted_keys = 'a.pub'", "security.trusted_keys: expected a list"),
    ("[security]\nrequire_signature = 'yes'", "security.require_signature: expected true or false"),
    ("[security]\nmax_disk_fraction = 1.5", "security.max_disk_fraction: expected a value between 0 and 1"),
    ("[security]\nrequire_signature = false", "security.require_signature: false is accepted only with "
                                              "security.insecure = true"),
    ("[security]\ninsecure = 1", "security.insecure: expected true or false"),
    ("[runtime]\nbackend = 'gpu'", "runtime.backend: expected one of"),
    ("[runtime]\nnum_threads = 0", "runtime.num_threads: expected a value > 0"),
    ("[validation]\ntimeout_s = -1", "validation.timeout_s: expected a value > 0"),
    ("[health]\nmax_error_rate = 2", "health.max_error_rate: expected a value between 0 and 1"),
    ("[health]\nprobation_s = -5", "health.probation_s: expected a value >= 0"),
    ("[health]\nmax_latency_ratio = true", "health.max_latency_ratio: expected a number"),
    ("[store]\nkeep_blobs = -1", "store.keep_blobs: expected a value >= 0"),
    ("[api]\nport = 70000", "api.port: expected 1-65535"),
    ("[api]\nport = '8501'", "api.port: expected an integer"),
    ("x = ", "not valid TOML"),
])
def test_each_rule_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config(text)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_secret_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(Path("mqtt-password")) == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="cannot read secret file mqtt-password"):
        read_secret(Path("mqtt-password"))
    assert read_secret(tmp_path / "mqtt-password") == "s3cret"


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", *args], capture_output=True, text=True, timeout=60)


def test_check_config_command(tmp_path: Path) -> None:
    SigningKey.generate().write(tmp_path / "keys")
    good = tmp_path / "agent.toml"
    good.write_text(f'device_id = "d1"\n[health]\nprobation_s = 5\n'
                    f'[security]\ntrusted_keys = ["{tmp_path / "keys" / "edgefleet.pub"}"]\n')
    ok = _agent("--config", str(good), "check-config", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"probation_s": 5.0' in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[health]\nprobation = 5\n')
    res = _agent("--config", str(bad), "check-config")
    assert res.returncode == 2
    assert res.stderr.strip() == "edge-agent: error: health.probation: unknown key"


def test_several_broker_urls() -> None:
    config = parse_config('[mqtt]\nurls = ["mqtt://10.0.0.1", "mqtt://10.0.0.2:1884"]\n')
    assert config.mqtt.url == "mqtt://10.0.0.1"  # url reads as the first: "MQTT is on" for every reader
    assert config.mqtt.broker_urls == ("mqtt://10.0.0.1", "mqtt://10.0.0.2:1884")
    settings = config.mqtt.settings("d1")
    assert settings.urls == ("mqtt://10.0.0.1", "mqtt://10.0.0.2:1884")
    # the one-url form is unchanged, and the same url in both places is accepted
    assert parse_config('[mqtt]\nurl = "mqtt://h"\n').mqtt.settings("d1").urls == ("mqtt://h",)
    assert parse_config('[mqtt]\nurl = "mqtt://h"\nurls = ["mqtt://h", "mqtt://g"]\n').mqtt.broker_urls == (
        "mqtt://h", "mqtt://g")
    assert parse_config("").mqtt.broker_urls == ()


@pytest.mark.parametrize("text, message", [
    ('[mqtt]\nurls = "mqtt://h"', "mqtt.urls: expected a list"),
    ("[mqtt]\nurls = []", "mqtt.urls: expected at least one broker url"),
    ('[mqtt]\nurls = ["mqtt://h", "http://g"]', "mqtt.urls: expected mqtt://host[:port] or mqtts://host[:port], "
                                                "got 'http://g'"),
    ('[mqtt]\nurls = ["mqtt://h", "mqtts://g"]', "mqtt.urls: mixes mqtt:// and mqtts://"),
    ('[mqtt]\nurls = ["mqtt://h", "mqtt://h"]', "mqtt.urls: lists a url twice"),
    ('[mqtt]\nurl = "mqtt://x"\nurls = ["mqtt://h"]', "mqtt.url: set mqtt.url or mqtt.urls, not both"),
    ('device_id = "cam.7"', "device_id: 'cam.7' must be 1-64 letters, digits, '_' or '-', starting with a letter "
                            "or digit (no '.': some brokers refuse it in a topic)"),
    ('groups = ["site-a", "line.2"]', "groups: 'line.2' must be 1-64 letters, digits, '_' or '-'"),
    ('device_id = "-lead"', "device_id: '-lead' must be"),
])
def test_several_urls_and_names_rules(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert str(err.value).startswith(message), str(err.value)


def test_plain_tcp_check_covers_every_broker_url(tmp_path: Path) -> None:
    from edgefleet.agent.config import security_problems

    config = parse_config('[mqtt]\nurls = ["mqtt://127.0.0.1:1883", "mqtt://10.0.0.2"]\n[security]\ninsecure = true\n')
    assert security_problems(config) == []
    config = parse_config('[mqtt]\nurls = ["mqtt://127.0.0.1:1883", "mqtt://10.0.0.2"]\n')
    plain = [p for p in security_problems(config) if "plain TCP" in p]
    assert plain == ["mqtt.urls: mqtt://10.0.0.2 is plain TCP to another host, so anyone on the way can read and "
                     "alter the traffic; use mqtts:// or set security.insecure = true for a test setup"]


def test_the_default_device_id_is_a_name_every_broker_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "cam.7.lab.example")
    assert parse_config("").device_id == "cam-7-lab-example"


def test_check_config_refuses_a_name_with_a_dot_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "cam.7"\n[mqtt]\nurl = "mqtt://127.0.0.1"\n')
    res = _agent("--config", str(bad), "check-config")
    assert res.returncode == 2
    assert res.stderr.strip() == ("edge-agent: error: device_id: 'cam.7' must be 1-64 letters, digits, '_' or '-', "
                                  "starting with a letter or digit (no '.': some brokers refuse it in a topic)")
