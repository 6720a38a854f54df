"""The documents on the wire, as typed dataclasses (docs/protocol.md §3)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from edgefleet.errors import ProtocolError
from edgefleet.protocol.canonical import canonical_json, parse_json
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.schema import (
    check_id,
    check_name,
    check_sha256,
    check_target,
    checked,
    dump,
    fraction,
    non_negative,
    parse,
    positive,
)

DEPLOYMENT_SCHEMA = "edgefleet.deployment/1"
COMMAND_SCHEMA = "edgefleet.command/1"
WITHDRAWAL_SCHEMA = "edgefleet.withdrawal/1"
TIMESTAMP_SCHEMA = "edgefleet.timestamp/1"
INVENTORY_SCHEMA = "edgefleet.inventory/1"

DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "string")
Dtype = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "string"]


_VERSION_LABEL = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def check_version_labels(value: Any) -> str | None:
    """User version labels: short lowercase names, distinct, never the agent's own `stable` or `canary`."""
    if value is None:
        return None
    if len(value) > 16 or len(set(value)) != len(value):
        return "expected at most 16 distinct labels"
    for label in value:
        if not _VERSION_LABEL.fullmatch(label):
            return f"label {label!r}: expected 1-32 of a-z, 0-9, '_', '-', starting with a letter"
        if label in ("stable", "canary"):
            return f"label {label!r}: set by the agent itself (stable: committed, canary: on probation)"
    return None


def _schema(expected: str) -> Any:
    def check(value: Any) -> str | None:
        return None if value == expected else f"expected {expected!r} (this agent speaks only that schema)"
    return check


@dataclass(frozen=True, kw_only=True)
class ChunkRef:
    """One fixed-size piece of an artifact, addressed by the SHA-256 of its raw bytes."""

    sha256: str = checked(check_sha256)
    size: int = checked(positive)
    wire_size: int = checked(positive)
    compressed: bool = False


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A file delivered in chunks: its digest, size and chunk list."""

    sha256: str = checked(check_sha256)
    size: int = checked(positive)
    chunk_size: int = checked(positive)
    chunks: tuple[ChunkRef, ...] = ()
    encoding: Literal["zlib"] = "zlib"

    def __post_init__(self) -> None:
        total = sum(c.size for c in self.chunks)
        if self.chunks and total != self.size:
            raise ProtocolError(f"chunks: sizes add up to {total}, artifact size is {self.size}")
        if any(c.size > self.chunk_size for c in self.chunks):
            raise ProtocolError("chunks: a chunk is larger than chunk_size")

    @property
    def wire_size(self) -> int:
        """Bytes on the wire: the chunk payloads as published."""
        return sum(c.wire_size for c in self.chunks)


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """Affine quantization of a tensor: real = scale * (q - zero_point)."""

    scale: float = checked(positive)
    zero_point: int = 0


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """Name, dtype, shape (-1 for a dynamic dimension) and quantization of one model input or output."""

    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    quantization: Quantization | None = None


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """Input normalisation the agent applies for the caller: x' = (x - mean) / std, per channel or scalar."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.std is not None and any(s == 0 for s in self.std):
            raise ProtocolError("preprocessing.std: must not contain 0")


@dataclass(frozen=True, kw_only=True)
class Postprocessing:
    """Labels for the output classes and how many top results to return."""

    labels: tuple[str, ...] | None = None
    top_k: int = checked(positive, default=5)
    output: str | None = None
    """The output whose last dimension the labels name, as the agent names outputs (`scores`,
    `output_1`, or a full tensor name such as `StatefulPartitionedCall:1`). Absent (documents older than
    this field, and models whose choice is unambiguous): the first output, in the model's order, whose
    last dimension equals the number of labels."""


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """How close the device's outputs on the golden inputs must be: |a - b| <= atol + rtol * |b|."""

    atol: float = checked(non_negative, default=1e-4)
    rtol: float = checked(non_negative, default=1e-3)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model a deployment carries."""

    name: str = checked(check_name)
    version: int = checked(non_negative)
    artifact: Artifact
    golden: Artifact
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    tolerance: Tolerance = field(default_factory=Tolerance)
    tolerances: tuple[Tolerance, ...] | None = None
    """One tolerance per output, in the order of `outputs`, for models whose outputs need different ones
    (their quantization steps differ). Absent (documents older than this field, and models whose
    outputs share one tolerance): `tolerance` applies to every output."""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    metrics: dict[str, float | int | str | bool | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ProtocolError("inputs: a model needs at least one input")
        if not self.outputs:
            raise ProtocolError("outputs: a model needs at least one output")
        if self.tolerances is not None and len(self.tolerances) != len(self.outputs):
            raise ProtocolError(f"tolerances: {len(self.tolerances)} given for {len(self.outputs)} outputs "
                                "(one per output)")

    def output_tolerance(self, index: int) -> Tolerance:
        """The tolerance of output `index`: its own from `tolerances`, else the model's `tolerance`."""
        return self.tolerances[index] if self.tolerances is not None else self.tolerance


_S = TypeVar("_S", bound="_Signed")


class _Signed:
    """What every signed order shares: a validity window, its JSON value and a strict parser."""

    issued_at: int
    expires_at: int

    def __post_init__(self) -> None:
        if self.expires_at <= self.issued_at:
            raise ProtocolError("expires_at: must be after issued_at")

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this document."""
        return dump(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls: type[_S], value: Any) -> _S:
        """Strictly parse the document (unknown, missing and mistyped fields refused by name)."""
        return parse(cls, value)


_D = TypeVar("_D", bound=_Signed)


@dataclass(frozen=True, eq=False)
class Signed(Generic[_D]):
    """A signed document parsed once, where it arrives (topic, bundle, state.json): its parsed form and
    the JSON value its signature covers. The value is kept as it came: dumping the parsed form would add
    the defaults the signer never wrote, and the signature would no longer match."""

    doc: _D
    raw: dict[str, Any]
    """The JSON value as received. Never changed: it is what the signature covers."""

    @classmethod
    def parse(cls, kind: type[_D], raw: Any) -> Signed[_D]:
        """Strictly parse `raw` as a `kind` document (ProtocolError naming the field that is wrong)."""
        return cls(kind.from_dict(raw), raw)


@dataclass(frozen=True, kw_only=True)
class ShadowPolicy:
    """Shadow probation (docs/protocol.md §3.1): before the switch, the candidate runs beside the active
    model on a sampled share of live requests and must agree with it. Absent fields take the agent's
    `[shadow]` defaults; thresholds given here can only tighten them."""

    sample_rate: float | None = checked(fraction, default=None)
    """Share of live requests copied to the candidate (0-1)."""
    min_samples: int | None = checked(positive, default=None)
    """Compared requests needed before the candidate may be activated."""
    min_agreement: float | None = checked(fraction, default=None)
    """Share of compared requests on which the candidate must agree with the active model."""
    atol: float | None = checked(non_negative, default=None)
    """Absolute tolerance per output value (outputs that are not class scores); absent: the model's golden
    tolerance per output."""
    rtol: float | None = checked(non_negative, default=None)
    """Relative tolerance per output value, as `atol`."""
    max_latency_ratio: float | None = checked(positive, default=None)
    """The candidate's median invoke time over the active model's, at most."""
    window_s: float | None = checked(positive, default=None)
    """Longest time to collect `min_samples`; not enough traffic by then rejects the candidate."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Rollout policy signed with the deployment; limits here can only tighten the agent's config."""

    probation_s: float | None = checked(non_negative, default=None)
    max_error_rate: float | None = checked(fraction, default=None)
    max_latency_ratio: float | None = checked(positive, default=None)
    max_latency_ms: float | None = checked(positive, default=None)
    hang_timeout_s: float | None = checked(positive, default=None)
    allow_downgrade: bool = False
    version_labels: tuple[str, ...] | None = checked(check_version_labels, default=None)
    """Names the local API accepts for this version (`/v1/models/{m}/labels/{label}`), beside the agent's
    own `stable` and `canary`; absent: none."""
    shadow: ShadowPolicy | None = None
    """Ask for shadow probation (an empty object: with the agent's defaults); absent: none."""


@dataclass(frozen=True, kw_only=True)
class Deployment(_Signed):
    """A signed order to run `model` (docs/protocol.md §3.1)."""

    schema: str = checked(_schema(DEPLOYMENT_SCHEMA))
    deployment_id: str = checked(check_id)
    issued_at: int = checked(non_negative)
    expires_at: int = checked(non_negative)
    model: ModelSpec
    policy: Policy = field(default_factory=Policy)
    target: str | None = checked(check_target, default=None)
    """``device:{id}`` or ``group:{name}``: the only topic this document may arrive on. Covered by the
    signature, so a document cannot be re-posted to another device or group. A document without a
    target is accepted only from a local install (or by an agent running with ``insecure = true``)."""
    key_id: str | None = None
    signature: str | None = None

    def to_json(self) -> bytes:
        """Canonical JSON bytes of this document."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Deployment:
        """Strictly parse a deployment document from JSON."""
        return cls.from_dict(parse_json(data))

    def unsigned(self) -> Deployment:
        """The same document without key id and signature."""
        return replace(self, key_id=None, signature=None)


def new_deployment_id(name: str, version: int) -> str:
    """A fresh deployment id: readable prefix, unique suffix."""
    return f"{name}-v{version}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, kw_only=True)
class Command(_Signed):
    """A signed order to one device: roll a model back, or report state now."""

    schema: str = checked(_schema(COMMAND_SCHEMA))
    command_id: str = checked(check_id)
    device_id: str = checked(check_name)
    action: Literal["rollback", "report"]
    issued_at: int = checked(non_negative)
    expires_at: int = checked(non_negative)
    model: str | None = checked(check_name, default=None)
    key_id: str | None = None
    signature: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.action == "rollback" and self.model is None:
            raise ProtocolError("model: a rollback command names the model")


@dataclass(frozen=True, kw_only=True)
class Withdrawal(_Signed):
    """A signed order that takes a retained deployment document back, published in its place.

    The device forgets the document of that source (device or group) for `model`; a download it had
    started stops. What already runs keeps running. An empty retained payload, which anyone allowed
    to publish on the topic can send, changes nothing on a device.
    """

    schema: str = checked(_schema(WITHDRAWAL_SCHEMA))
    model: str = checked(check_name)
    target: str = checked(check_target)
    issued_at: int = checked(non_negative)
    expires_at: int = checked(non_negative)
    key_id: str | None = None
    signature: str | None = None



@dataclass(frozen=True, kw_only=True)
class Timestamp(_Signed):
    """The signed heartbeat of the update channel, retained on ``P/timestamp``.

    The operator re-issues it often (``edgectl timestamp --every``) with a short validity. A device
    whose newest valid timestamp has expired knows that its channel is frozen or withheld rather than
    quiet, and says so in its status, telemetry and metrics.
    """

    schema: str = checked(_schema(TIMESTAMP_SCHEMA))
    issued_at: int = checked(non_negative)
    expires_at: int = checked(non_negative)
    key_id: str | None = None
    signature: str | None = None



@dataclass(frozen=True, kw_only=True)
class Inventory(_Signed):
    """The operator-signed fleet inventory, retained on ``P/inventory``: which devices form each group.

    Host tools take group membership (canary choice, `push --wait` accounting) from here, never from
    what a device's status says about itself. `version` only grows: a host keeps the highest it saw.
    """

    schema: str = checked(_schema(INVENTORY_SCHEMA))
    version: int = checked(non_negative)
    issued_at: int = checked(non_negative)
    expires_at: int = checked(non_negative)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    key_id: str | None = None
    signature: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for group, devices in self.groups.items():
            if check_name(group):
                raise ProtocolError(f"groups: {group!r}: {check_name(group)}")
            for device in devices:
                if check_name(device):
                    raise ProtocolError(f"groups.{group}: {device!r}: {check_name(device)}")

    def members(self, group: str) -> tuple[str, ...]:
        """The devices of a group (empty for an unknown group)."""
        return self.groups.get(group, ())


@dataclass(frozen=True, kw_only=True)
class Slot:
    """A model version held by a device (active, previous or pending)."""

    version: int
    deployment_id: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How the last deployment of a model ended, and why."""

    deployment_id: str
    version: int
    result: Literal["committed", "rejected", "rolled_back"]
    reason: str | None = None
    ts: float = 0.0
    figures: dict[str, float | int | str | bool | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ShadowProgress:
    """How far the shadow probation of the pending model is (phase SHADOW)."""

    samples: int
    """Requests compared so far."""
    min_samples: int
    """Requests needed for a verdict."""
    agreement: float | None = None
    """Share of compared requests on which the candidate agreed with the active model."""
    latency_ratio: float | None = None
    """The candidate's median invoke time over the active model's."""
    elapsed_s: float = 0.0
    window_s: float = 0.0
    dropped: int = 0
    """Sampled requests left out because the candidate was still busy (its queue was full)."""

    @property
    def text(self) -> str:
        """`120/200 98.3%`: samples so far of those needed, and the agreement so far."""
        agreement = f" {self.agreement:.1%}" if self.agreement is not None else ""
        return f"{self.samples}/{self.min_samples}{agreement}"


@dataclass(frozen=True, kw_only=True)
class ModelState:
    """One model's lifecycle state as a device reports it."""

    phase: Phase = Phase.IDLE
    active: Slot | None = None
    previous: Slot | None = None
    pending: Slot | None = None
    last_outcome: Outcome | None = None
    progress: float | None = None
    shadow: ShadowProgress | None = None
    """During SHADOW: the samples and agreement so far."""


@dataclass(frozen=True, kw_only=True)
class ChannelState:
    """The freshness of a device's update channel, from the newest valid signed Timestamp it holds."""

    issued_at: int
    expires_at: int
    fresh: bool
    """False once that timestamp expired: updates may be withheld or the channel frozen."""
    age_s: float


@dataclass(frozen=True, kw_only=True)
class DeviceState:
    """The retained state document of a device: every model it knows."""

    device_id: str
    ts: float
    agent_version: str
    models: dict[str, ModelState] = field(default_factory=dict)
    channel: ChannelState | None = None
    """Absent until the device received a valid signed timestamp."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this document."""
        return dump(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, value: Any) -> DeviceState:
        """Strictly parse a state document."""
        return parse(cls, value)


def _without_false_insecure(doc: dict[str, Any]) -> dict[str, Any]:
    """Absent means false: a secure agent's status and telemetry stay exactly what hosts that predate
    the field can read (their strict reader refuses fields it does not know)."""
    if doc.get("insecure") is False:
        del doc["insecure"]
    return doc


@dataclass(frozen=True, kw_only=True)
class Status:
    """The retained presence document (also the MQTT will)."""

    status: Literal["online", "offline"]
    device_id: str
    agent_version: str
    ts: float = 0.0
    groups: tuple[str, ...] = ()
    insecure: bool = False
    """The agent runs with ``security.insecure = true``: it accepts unsigned documents."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this document."""
        return _without_false_insecure(dump(self))

    @classmethod
    def from_dict(cls, value: Any) -> Status:
        """Strictly parse a status document."""
        return parse(cls, value)


@dataclass(frozen=True, kw_only=True)
class Event:
    """One lifecycle step of one deployment on one device; failures carry a reason."""

    ts: float
    device_id: str
    model: str
    step: Phase
    ok: bool
    deployment_id: str | None = None
    version: int | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    kind: Literal["DRIFT"] | None = None
    """Absent for lifecycle steps. `DRIFT`: a drift score crossed `drift.threshold` (ok false) or fell back
    below it (ok true); `step` is then the model's phase and the event carries no deployment_id."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this event."""
        return dump(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, value: Any) -> Event:
        """Strictly parse an event."""
        return parse(cls, value)


@dataclass(frozen=True, kw_only=True)
class ModelTelemetry:
    """Per-model figures over one telemetry window."""

    name: str
    version: int | None
    phase: Phase
    count: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    drift: ModelDrift | None = None
    """Absent for models whose bundle carries no drift reference (or with `drift.enabled = false`)."""


@dataclass(frozen=True, kw_only=True)
class ModelDrift:
    """A model's drift scores over its window of sampled live traffic (PSI against its bundle's reference)."""

    inputs: dict[str, float | None] = field(default_factory=dict)
    """Per input (named as the local API names it): the score, null until the window holds `min_samples`."""
    outputs: float | None = None
    """The largest score over the outputs."""
    samples: int = 0
    """Sampled instances in the window."""
    drifting: tuple[str, ...] = ()
    """What is past the threshold now (input names, and `outputs`), by the event hysteresis."""


@dataclass(frozen=True, kw_only=True)
class Telemetry:
    """The periodic telemetry document (docs/protocol.md §3.6)."""

    ts: float
    device_id: str
    agent_version: str
    uptime_s: float
    cpu_percent: float
    rss_bytes: int
    system_cpu_percent: float
    mem_available_bytes: int
    load1: float
    disk_free_bytes: int
    temperature_c: float | None = None
    models: tuple[ModelTelemetry, ...] = ()
    channel: ChannelState | None = None
    """The update channel's freshness (absent until a signed timestamp arrived)."""
    insecure: bool = False
    """The agent runs with ``security.insecure = true``: it accepts unsigned documents."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this document."""
        return _without_false_insecure(dump(self))

    @classmethod
    def from_dict(cls, value: Any) -> Telemetry:
        """Strictly parse a telemetry document."""
        return parse(cls, value)
