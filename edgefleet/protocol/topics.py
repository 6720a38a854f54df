"""Every MQTT topic, built from one prefix in one place (docs/protocol.md §1), and matched here too.

Nothing else in the code joins topic levels or takes a topic apart: a tool, a device or a test that
needs a topic or a subscription asks `Topics`, and routes what arrives with `Topics.parse` (or the
fast `Topics.chunk_id` on the download path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet.errors import ProtocolError
from edgefleet.protocol.schema import SHA256_RE, check_name, check_sha256

DEFAULT_PREFIX = "edgefleet"
_LEAVES = frozenset({"cmd", "status", "availability", "state", "events", "telemetry", "logs"})


def check_prefix(value: str) -> str | None:
    """A topic prefix (ours or Home Assistant's): one or more levels, none empty, no wildcard, no '$'."""
    levels = value.split("/")
    if not value or any(not lvl or lvl in {"+", "#"} or "$" in lvl for lvl in levels):
        return f"expected non-empty topic levels without '+', '#' or '$', got {value!r}"
    return None


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
    client: str | None = None
    """The MQTT client id of a `sync` topic."""
    component: str | None = None
    """The Home Assistant component of a `discovery` topic."""
    object_id: str | None = None
    """The Home Assistant object id of a `discovery` topic."""


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str = DEFAULT_PREFIX
    _chunk_head: str = field(init=False, repr=False, compare=False)
    _device_head: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = check_prefix(self.prefix)
        if problem:
            raise ProtocolError(f"prefix: {problem}")
        object.__setattr__(self, "_chunk_head", f"{self.prefix}/chunks/")
        object.__setattr__(self, "_device_head", f"{self.prefix}/devices/")

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

    def device_models(self, device: str) -> str:
        """Wildcard subscription to every deployment document for one device."""
        return f"{self.prefix}/devices/{_checked('device', device)}/models/+"

    def group_models(self, group: str) -> str:
        """Wildcard subscription to every deployment document for one group."""
        return f"{self.prefix}/groups/{_checked('group', group)}/models/+"

    def all_device_models(self, model: str) -> str:
        """Wildcard subscription to every device's own deployment document for one model."""
        return f"{self.prefix}/devices/+/models/{_checked('model', model)}"

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

    def logs(self, device: str) -> str:
        """A device's warning and error log lines, one record per message (not retained)."""
        return self._device(device, "logs")

    def logs_recent(self, device: str) -> str:
        """Retained document of a device's most recent log records (what `edgectl logs` prints first)."""
        return f"{self._device(device, 'logs')}/recent"

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

    def sync(self, client: str) -> str:
        """A host's private topic: a message it sends itself there comes back after the retained
        messages of its earlier subscriptions."""
        return f"{self.prefix}/sync/{_checked('client id', client)}"

    def probe(self, run: str, name: str) -> str:
        """A test message of `edgectl broker check` run `run`, in the hosts' own sync area (which the
        shipped operator ACL lets a host write and devices never read)."""
        return f"{self.sync(run)}/{_checked('probe', name)}"

    def probes(self, run: str) -> str:
        """Wildcard subscription to every test message of one `edgectl broker check` run."""
        return f"{self.sync(run)}/+"

    @staticmethod
    def shared(share: str, topic_filter: str) -> str:
        """An MQTT 5 shared subscription: the broker hands each message to one member of `share`."""
        return f"$share/{_checked('share name', share)}/{topic_filter}"

    def chunk_id(self, topic: str) -> str | None:
        """The SHA-256 of a chunk topic, None for any other topic (the download path: no Route built)."""
        if topic.startswith(self._chunk_head):
            sha = topic[len(self._chunk_head):]
            if SHA256_RE.match(sha):
                return sha
        return None

    def device_leaf(self, topic: str) -> tuple[str, str] | None:
        """(device, leaf) of a per-device topic (cmd, status, availability, state, events, telemetry, logs),
        None for any other topic (a collector's path: no Route built per message)."""
        if topic.startswith(self._device_head):
            device, _, leaf = topic[len(self._device_head):].partition("/")
            if leaf in _LEAVES and not check_name(device):
                return device, leaf
        return None

    @staticmethod
    def discovery(ha_prefix: str, component: str, device: str, object_id: str) -> str:
        """Retained Home Assistant MQTT discovery config of one entity of a device (outside the prefix:
        Home Assistant's own layout, `{ha_prefix}/{component}/{node_id}/{object_id}/config`)."""
        Topics(ha_prefix)  # the same rule as for our prefix
        for kind, value in (("component", component), ("object id", object_id)):
            if not _discovery_level(value):
                raise ProtocolError(f"discovery {kind} {value!r}: expected letters, digits, '_' or '-'")
        return f"{ha_prefix}/{component}/{_checked('device', device)}/{object_id}/config"

    @staticmethod
    def parse_discovery(ha_prefix: str, topic: str) -> Route:
        """Route a Home Assistant discovery topic built by `discovery`; ProtocolError for anything else."""
        head = ha_prefix + "/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        match parts:
            case [component, device, object_id, "config"] if _discovery_level(component) and \
                    not check_name(device) and _discovery_level(object_id):
                return Route("discovery", device=device, component=component, object_id=object_id)
        raise ProtocolError(f"topic {topic!r} is not a discovery topic under {ha_prefix!r}")

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
            case ["sync", client] if not check_name(client):
                return Route("sync", client=client)
            case ["groups", group, "models", model] if not check_name(group) and not check_name(model):
                return Route("group_model", group=group, model=model)
            case ["devices", device, "models", model] if not check_name(device) and not check_name(model):
                return Route("device_model", device=device, model=model)
            case ["devices", device, leaf] if leaf in _LEAVES and not check_name(device):
                return Route(leaf, device=device)
            case ["devices", device, "logs", "recent"] if not check_name(device):
                return Route("logs_recent", device=device)
        raise ProtocolError(f"topic {topic!r} is not part of the contract")


def _discovery_level(value: str) -> bool:
    """Home Assistant matches a discovery topic's component and object id as [a-zA-Z0-9_-]+."""
    return bool(value) and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)
