"""The wire contract shared by the agent and the host tools: documents, signing, chunking, topics."""

from edgefleet.protocol.canonical import canonical_json, parse_json
from edgefleet.protocol.chunks import DEFAULT_CHUNK_SIZE, decode_chunk, encode_chunk, join, split
from edgefleet.protocol.documents import (
    COMMAND_SCHEMA,
    DEPLOYMENT_SCHEMA,
    DTYPES,
    Artifact,
    ChunkRef,
    Command,
    Deployment,
    DeviceState,
    Event,
    ModelSpec,
    ModelState,
    ModelTelemetry,
    Outcome,
    Policy,
    Postprocessing,
    Preprocessing,
    Quantization,
    Signed,
    Slot,
    Status,
    Telemetry,
    TensorSpec,
    Tolerance,
)
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.schema import check_name, check_portable_name, dump, parse
from edgefleet.protocol.signing import Keyring, SigningKey, key_id, load_public_key, signed_payload
from edgefleet.protocol.topics import DEFAULT_PREFIX, Route, Topics

__all__ = [
    "COMMAND_SCHEMA", "DEFAULT_CHUNK_SIZE", "DEFAULT_PREFIX", "DEPLOYMENT_SCHEMA", "DTYPES",
    "Artifact", "ChunkRef", "Command", "Deployment", "DeviceState", "Event", "Keyring", "ModelSpec",
    "ModelState", "ModelTelemetry", "Outcome", "Phase", "Policy", "Postprocessing", "Preprocessing", "Quantization",
    "Route", "Signed", "SigningKey", "Slot", "Status", "Telemetry", "TensorSpec", "Tolerance", "Topics",
    "canonical_json", "check_name", "check_portable_name", "decode_chunk", "dump", "encode_chunk", "join", "key_id",
    "load_public_key", "parse", "parse_json", "signed_payload", "split",
]
