"""Every MQTT topic, built from one prefix in one place (docs/protocol.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.errors import ProtocolError
from edgefleet.protocol.schema import check_name, check_sha256

DEFAULT_PREFIX = "edgefleet"


def _checked(kind: str, value: str) -> str:
    problem = check_name(value)
    if problem:
        raise ProtocolError(f"{kind} {value!r}: {problem}")
    return value


@dataclass(frozen=True)
class Route:
    """A parsed topic: its kind and the names it carries."""

    kind: str
    device: str | None = None
    group: str | None = None
    model: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not self.prefix or any(not lvl or lvl in {"+", "#"} or "$" in lvl for lvl in levels):
            raise ProtocolError(f"prefix {self.prefix!r}: expected non-empty topic levels without '+', '#' or '$'")

    def chunk(self, sha256: str) -> str:
        """Retained chunk payload, by the SHA-256 of its raw bytes."""
        if check_sha256(sha256):
            raise ProtocolError(f"chunk id {sha256!r} is not a SHA-256 hex digest")
        return f"{self.prefix}/chunks/{sha256}"

    def group_model(self, group: str, model: str) -> str:
        """Retained deployment document for every device of a group."""
        return f"{self.prefix}/groups/{_checked('group', group)}/models/{_checked('model', model)}"

    def device_model(self, device: str, model: str) -> str:
        """Retained deployment document for one device."""
        return f"{self.prefix}/devices/{_checked('device', device)}/models/{_checked('model', model)}"

    def _device(self, device: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{_checked('device', device)}/{leaf}"

    def cmd(self, device: str) -> str:
        """Signed commands to one device."""
        return self._device(device, "cmd")

    def status(self, device: str) -> str:
        """Retained online/offline presence of a device."""
        return self._device(device, "status")

    def availability(self, device: str) -> str:
        """Retained plain `online`/`offline` of a device, for tools that read no JSON."""
        return self._device(device, "availability")

    def state(self, device: str) -> str:
        """Retained lifecycle state of a device."""
        return self._device(device, "state")

    def events(self, device: str) -> str:
        """Lifecycle events of a device."""
        return self._device(device, "events")

    def telemetry(self, device: str) -> str:
        """Periodic metrics of a device."""
        return self._device(device, "telemetry")

    def timestamp(self) -> str:
        """Retained signed heartbeat of the update channel."""
        return f"{self.prefix}/timestamp"

    def inventory(self) -> str:
        """Retained operator-signed inventory (group membership)."""
        return f"{self.prefix}/inventory"

    def all_devices(self, leaf: str) -> str:
        """Wildcard subscription to one leaf (status, state, events, telemetry) of every device."""
        return f"{self.prefix}/devices/+/{leaf}"

    def all_deployments(self) -> list[str]:
        """Wildcard subscriptions to every retained deployment document."""
        return [f"{self.prefix}/groups/+/models/+", f"{self.prefix}/devices/+/models/+"]

    def all_chunks(self) -> str:
        """Wildcard subscription to every retained chunk."""
        return f"{self.prefix}/chunks/+"

    @staticmethod
    def discovery(ha_prefix: str, component: str, device: str, object_id: str) -> str:
        """Retained Home Assistant MQTT discovery config of one entity of a device (outside the prefix:
        Home Assistant's own layout, `{ha_prefix}/{component}/{node_id}/{object_id}/config`)."""
        Topics(ha_prefix)  # the same rule as for our prefix
        for kind, value in (("component", component), ("object id", object_id)):
            if not value or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
                raise ProtocolError(f"discovery {kind} {value!r}: expected letters, digits, '_' or '-'")
        return f"{ha_prefix}/{component}/{_checked('device', device)}/{object_id}/config"

    def parse(self, topic: str) -> Route:
        """Route an incoming topic; raise ProtocolError for anything outside the contract."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head):].split("/")
        match parts:
            case ["timestamp"]:
                return Route("timestamp")
            case ["inventory"]:
                return Route("inventory")
            case ["chunks", sha] if not check_sha256(sha):
                return Route("chunk", sha256=sha)
            case ["groups", group, "models", model] if not check_name(group) and not check_name(model):
                return Route("group_model", group=group, model=model)
            case ["devices", device, "models", model] if not check_name(device) and not check_name(model):
                return Route("device_model", device=device, model=model)
            case ["devices", device, leaf] if not check_name(device) and leaf in {
                "cmd", "status", "availability", "state", "events", "telemetry"
            }:
                return Route(leaf, device=device)
        raise ProtocolError(f"topic {topic!r} is not part of the contract")
