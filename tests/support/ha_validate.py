"""Runs inside Home Assistant's own environment (tests/support/homeassistant_env.py), never in the project's.

Reads from stdin {"messages": [[topic, payload], ...], "telemetry": [payload, ...], "status": [...],
"availability": [...]} and writes {"problems": [...], "rendered": {topic: [value per telemetry
payload]}, "available": {topic: [bool per (availability, status) pair]}} using Home Assistant's
discovery topic pattern, the MQTT platforms' discovery schemas, the sensor unit and state-class
tables and its template engine, as Home Assistant applies them when a discovery message arrives.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile

from homeassistant.components.mqtt import binary_sensor, sensor
from homeassistant.components.mqtt.discovery import TOPIC_MATCHER
from homeassistant.components.sensor.const import DEVICE_CLASS_STATE_CLASSES, DEVICE_CLASS_UNITS
from homeassistant.core import HomeAssistant
from homeassistant.helpers.template import Template

PREFIX = "homeassistant/"
SCHEMAS = {"sensor": sensor.DISCOVERY_SCHEMA, "binary_sensor": binary_sensor.DISCOVERY_SCHEMA}


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


async def main() -> None:
    request = json.load(sys.stdin)
    problems: list[str] = []
    rendered: dict[str, list[str]] = {}
    available: dict[str, list[bool]] = {}
    unique_ids: set[str] = set()
    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)
        for topic, raw in request["messages"]:
            match = TOPIC_MATCHER.match(topic[len(PREFIX):]) if topic.startswith(PREFIX) else None
            if match is None:
                problems.append(f"{topic}: not a discovery topic Home Assistant reads")
                continue
            component = match.group("component")
            if component not in SCHEMAS:
                problems.append(f"{topic}: component {component} not checked here")
                continue
            payload = json.loads(raw)
            try:
                config = SCHEMAS[component](dict(payload))
            except Exception as err:  # voluptuous.Invalid and friends: report, go on with the next
                problems.append(f"{topic}: rejected by the {component} schema: {err}")
                continue
            dropped = set(payload) - set(config)
            if dropped:
                problems.append(f"{topic}: keys Home Assistant ignores: {sorted(dropped)}")
            uid = config.get("unique_id")
            if not uid or uid in unique_ids:
                problems.append(f"{topic}: unique_id missing or repeated: {uid!r}")
            unique_ids.add(uid)
            device_class = config.get("device_class")
            unit = config.get("unit_of_measurement")
            state_class = config.get("state_class")
            if component == "sensor" and device_class is not None:
                if unit not in DEVICE_CLASS_UNITS.get(device_class, {unit}):
                    problems.append(f"{topic}: unit {unit!r} is not one of device class {device_class}'s")
                if state_class is not None and state_class not in DEVICE_CLASS_STATE_CLASSES.get(device_class, set()):
                    problems.append(f"{topic}: state class {state_class} does not fit device class {device_class}")
            values = []
            for doc in request["telemetry"]:
                value = str(Template(config["value_template"].template, hass)
                            .async_render_with_possible_json_value(doc, "<unrenderable>"))
                values.append(value)
                numeric = component == "sensor" and (unit is not None or state_class is not None)
                if numeric and value != "None" and not _number(value):
                    problems.append(f"{topic}: renders {value!r}, not a number")
                if component == "binary_sensor" and value not in ("ON", "OFF", "None"):
                    problems.append(f"{topic}: renders {value!r}, not ON/OFF")
            rendered[topic] = values
            verdicts = []
            for plain, status in zip(request["availability"], request["status"], strict=True):
                states = []
                for entry in config["availability"]:
                    payload_in = status if entry["topic"].endswith("/status") else plain
                    tpl = entry.get("value_template")
                    seen = str(Template(tpl.template, hass).async_render_with_possible_json_value(payload_in, "")) \
                        if tpl is not None else payload_in
                    if seen not in (entry["payload_available"], entry["payload_not_available"]):
                        problems.append(f"{topic}: availability {entry['topic']} reads {seen!r}")
                    states.append(seen == entry["payload_available"])
                mode = config.get("availability_mode", "latest")
                verdicts.append(all(states) if mode == "all" else any(states) if mode == "any" else states[-1])
            available[topic] = verdicts
        await hass.async_stop(force=True)
    json.dump({"problems": problems, "rendered": rendered, "available": available}, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
