"""Home Assistant MQTT discovery: the retained config messages that make a board appear in Home
Assistant as a device with sensors, read from the telemetry document the agent publishes anyway.

Nothing here talks to the broker: `device_entities` and `model_entities` return (topic, payload)
pairs, and agent/fleet/link.py publishes them (retained) on connect and when a new model name appears.
Every sensor's state is the telemetry topic; a Jinja value template picks its figure, so Home
Assistant needs no extra traffic. Availability combines the plain availability topic (a clean stop)
with the JSON status, which carries the MQTT will (a crash).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from edgefleet.protocol.topics import Topics

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def object_key(name: str) -> str:
    """A model name as a discovery object id (letters, digits, '_', '-'): '.' becomes '_2e_'."""
    return _UNSAFE.sub(lambda m: f"_{ord(m[0]):02x}_", name)


def expire_after(interval_s: float) -> int:
    """Seconds without telemetry after which Home Assistant shows the figures as unavailable: three
    missed samples (telemetry is QoS 0, one lost sample must not blank the dashboard)."""
    return max(30, int(3 * interval_s + 0.999))


class Discovery:
    """The discovery messages of one device."""

    def __init__(self, topics: Topics, device_id: str, agent_version: str, *, ha_prefix: str = "homeassistant",
                 telemetry_interval_s: float = 10.0) -> None:
        self.topics = topics
        self.device_id = device_id
        self.ha_prefix = ha_prefix
        self._common: dict[str, Any] = {
            "state_topic": topics.telemetry(device_id),
            "availability": [
                {"topic": topics.availability(device_id), "payload_available": "online",
                 "payload_not_available": "offline"},
                {"topic": topics.status(device_id), "value_template": "{{ value_json.status }}",
                 "payload_available": "online", "payload_not_available": "offline"},
            ],
            "availability_mode": "all",
            "expire_after": expire_after(telemetry_interval_s),
            "device": {"identifiers": [f"edgefleet_{device_id}"], "name": device_id, "manufacturer": "edgefleet",
                       "model": "edge-agent", "sw_version": agent_version},
            "origin": {"name": "edgefleet", "sw_version": agent_version},
        }

    def _entity(self, component: str, key: str, config: dict[str, Any]) -> tuple[str, bytes]:
        payload = {**config, "unique_id": f"edgefleet_{self.device_id}_{key}", **self._common}
        topic = Topics.discovery(self.ha_prefix, component, self.device_id, key)
        return topic, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()

    def device_entities(self) -> list[tuple[str, bytes]]:
        """The board's own figures: CPU, memory, disk, load, temperature, uptime, update channel, insecure."""
        def field(name: str) -> str:
            return f"{{{{ value_json.{name} | default(none) }}}}"

        sensors: list[tuple[str, dict[str, Any]]] = [
            ("cpu", {"name": "Agent CPU", "value_template": field("cpu_percent"), "unit_of_measurement": "%",
                     "state_class": "measurement", "suggested_display_precision": 1, "icon": "mdi:cpu-64-bit"}),
            ("system_cpu", {"name": "System CPU", "value_template": field("system_cpu_percent"),
                            "unit_of_measurement": "%", "state_class": "measurement",
                            "suggested_display_precision": 1, "icon": "mdi:cpu-64-bit"}),
            ("rss", {"name": "Agent memory", "value_template": field("rss_bytes"), "unit_of_measurement": "B",
                     "device_class": "data_size", "state_class": "measurement",
                     "suggested_display_precision": 0}),
            ("memory_available", {"name": "Memory available", "value_template": field("mem_available_bytes"),
                                  "unit_of_measurement": "B", "device_class": "data_size",
                                  "state_class": "measurement", "suggested_display_precision": 0}),
            ("disk_free", {"name": "Disk free", "value_template": field("disk_free_bytes"),
                           "unit_of_measurement": "B", "device_class": "data_size", "state_class": "measurement",
                           "suggested_display_precision": 0}),
            ("load1", {"name": "Load (1 min)", "value_template": field("load1"), "state_class": "measurement",
                       "suggested_display_precision": 2, "icon": "mdi:gauge"}),
            ("temperature", {"name": "SoC temperature", "value_template": field("temperature_c"),
                             "unit_of_measurement": "°C", "device_class": "temperature",
                             "state_class": "measurement"}),
            ("uptime", {"name": "Agent uptime", "value_template": field("uptime_s"), "unit_of_measurement": "s",
                        "device_class": "duration", "state_class": "measurement", "entity_category": "diagnostic",
                        "suggested_display_precision": 0}),
            ("channel_age", {"name": "Update channel age",
                             "value_template": "{{ value_json.channel.age_s if value_json.channel is defined "
                                               "else none }}",
                             "unit_of_measurement": "s", "device_class": "duration", "state_class": "measurement",
                             "entity_category": "diagnostic"}),
        ]
        binary: list[tuple[str, dict[str, Any]]] = [
            # "problem" sensors: ON is the bad state
            ("channel_stale", {"name": "Update channel stale", "device_class": "problem",
                               "entity_category": "diagnostic",
                               "value_template": "{{ ('OFF' if value_json.channel.fresh else 'ON') if "
                                                 "value_json.channel is defined else none }}"}),
            ("insecure", {"name": "Insecure mode", "device_class": "problem", "entity_category": "diagnostic",
                          "value_template": "{{ 'ON' if value_json.insecure | default(false) else 'OFF' }}"}),
        ]
        return [self._entity("sensor", k, c) for k, c in sensors] + \
            [self._entity("binary_sensor", k, c) for k, c in binary]

    def model_entities(self, model: str) -> list[tuple[str, bytes]]:
        """One model's figures: p50/p95 latency, requests, errors, phase, version."""
        # the name is a checked model name (letters, digits, '_', '.', '-'): safe inside the quotes
        pick = f"{{% set m = value_json.models | selectattr('name', 'eq', '{model}') | first | default({{}}) %}}"

        def field(name: str) -> str:
            return pick + f"{{{{ m.{name} | default(none) }}}}"

        key = f"model_{object_key(model)}"
        sensors: list[tuple[str, dict[str, Any]]] = [
            ("p95", {"name": f"{model} latency p95", "value_template": field("p95_ms"), "unit_of_measurement": "ms",
                     "device_class": "duration", "state_class": "measurement", "suggested_display_precision": 2}),
            ("p50", {"name": f"{model} latency p50", "value_template": field("p50_ms"), "unit_of_measurement": "ms",
                     "device_class": "duration", "state_class": "measurement", "suggested_display_precision": 2}),
            ("requests", {"name": f"{model} requests", "value_template": field("count"),
                          "state_class": "total_increasing", "icon": "mdi:counter"}),
            ("errors", {"name": f"{model} errors", "value_template": field("errors"),
                        "state_class": "total_increasing", "icon": "mdi:alert-circle-outline"}),
            # a plain text sensor: an enum needs `options`, which MQTT sensors accept only since
            # Home Assistant 2024.9 (the phases are listed in docs/integrations.md)
            ("phase", {"name": f"{model} phase", "value_template": field("phase"), "icon": "mdi:state-machine"}),
            ("version", {"name": f"{model} version", "value_template": field("version"),
                         "entity_category": "diagnostic", "icon": "mdi:tag"}),
        ]
        return [self._entity("sensor", f"{key}_{k}", c) for k, c in sensors]

    def messages(self, models: Iterable[str]) -> list[tuple[str, bytes]]:
        """Every discovery message for the device and `models`."""
        out = self.device_entities()
        for model in sorted(set(models)):
            out += self.model_entities(model)
        return out
