"""The on-disk model store: content-addressed blobs and one atomically replaced `state.json`.

Layout under the state directory (docs/architecture.md, "On-disk state"):
``state.json`` (what is active, previous, pending, per model), ``blobs/{sha256}`` complete artifacts,
``partial/`` downloads in progress, ``lock`` held by the running daemon.

`state.json` is written to a temporary file, fsynced, renamed over the old one, and the directory is
fsynced: power loss leaves either the old or the new state, never a mix. The previous state is kept as
``state.json.bak`` and read if the main file is unreadable.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from edgefleet.agent import faults
from edgefleet.agent.config import AgentConfig
from edgefleet.errors import ProtocolError, StoreError
from edgefleet.protocol.canonical import canonical_json, parse_json
from edgefleet.protocol.documents import Deployment, Outcome, Signed, Slot
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.schema import SHA256_RE, check_name, dump, parse

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class Installed:
    """A model version on disk: its signed document and what validation measured."""

    deployment: dict[str, Any]
    """The signed deployment document as it arrived (what its signature covers)."""
    installed_at: float
    validation: dict[str, float | int | str | bool | None] = field(default_factory=dict)

    @classmethod
    def of(cls, signed: Signed[Deployment], *, installed_at: float,
           validation: dict[str, float | int | str | bool | None] | None = None) -> Installed:
        """The record of a document already parsed: `signed` is kept, not parsed again."""
        installed = cls(deployment=signed.raw, installed_at=installed_at, validation=validation or {})
        installed.__dict__["signed"] = signed  # what cached_property would store
        return installed

    @cached_property
    def signed(self) -> Signed[Deployment]:
        """The document parsed, once per record: probation reads it on every tick. A record read from
        state.json is parsed on first use, so a document a later agent no longer reads costs that
        model (rolled back at start), not the whole state."""
        return Signed.parse(Deployment, self.deployment)

    @property
    def doc(self) -> Deployment:
        """The parsed deployment document."""
        return self.signed.doc

    @property
    def sha256(self) -> str:
        """SHA-256 of the model artifact."""
        return str(self.deployment["model"]["artifact"]["sha256"])

    @property
    def golden_sha256(self) -> str:
        """SHA-256 of the golden vectors."""
        return str(self.deployment["model"]["golden"]["sha256"])

    @property
    def version(self) -> int:
        """Model version."""
        return int(self.deployment["model"]["version"])

    @property
    def deployment_id(self) -> str:
        """Deployment id."""
        return str(self.deployment["deployment_id"])

    def slot(self) -> Slot:
        """The public view of this version in the state document."""
        return Slot(version=self.version, deployment_id=self.deployment_id, sha256=self.sha256)


@dataclass(frozen=True, kw_only=True)
class Probation:
    """A model being watched after activation."""

    started_at: float | None = None
    """Wall-clock start; None until the daemon serves it (an offline install)."""
    baseline_p95_ms: float | None = None
    """The previous model's p95 latency that the new one is compared with."""
    boot_failures: int = 0
    """Times the agent died while this model was on probation."""


@dataclass(frozen=True, kw_only=True)
class Activation:
    """A deployment whose activation was started, and how often the agent died before it switched over."""

    deployment_id: str
    deaths: int = 0
    """Starts that found the agent had died (or was killed by the watchdog) while activating it."""


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """Everything the agent keeps about one model name."""

    phase: Phase = Phase.IDLE
    active: Installed | None = None
    previous: Installed | None = None
    pending: dict[str, Any] | None = None
    """The signed document of the deployment under way (as it arrived), until it ends."""
    probation: Probation | None = None
    last_outcome: Outcome | None = None
    attempts: tuple[float, ...] = ()
    """Wall-clock times of recent update attempts, to cap them per hour."""
    floor: int = -1
    """Version floor: a version at or below it failed here (rolled back, or refused by validation or
    activation) and is never installed again, unless a signed document issued after `floor_at`
    allows the downgrade explicitly."""
    floor_at: int = 0
    """`issued_at` (Unix seconds, the signer's clock) of the newest signed document that set the floor."""
    sources: dict[str, int] = field(default_factory=dict)
    """Per source: `issued_at` of the newest document taken up, so an older one re-posted is refused."""
    withdrawn: dict[str, int] = field(default_factory=dict)
    """Per source (``device:{id}``, ``group:{name}``): `issued_at` of the newest signed withdrawal, so a
    withdrawn document re-posted on its topic is not taken up again."""
    activation: Activation | None = None
    """The last activation started and not yet switched over (absent in older state files)."""

    @property
    def pending_id(self) -> str | None:
        """The deployment id of the pending document, None when nothing is pending."""
        dep_id = self.pending.get("deployment_id") if self.pending is not None else None
        return dep_id if isinstance(dep_id, str) else None


@dataclass(frozen=True, kw_only=True)
class AgentState:
    """The content of state.json."""

    format: Literal[1] = 1
    running: bool = False
    """True while a daemon runs; found True at start, it means the last run died."""
    models: dict[str, ModelRecord] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    """Command ids already applied, with their expiry, to refuse replays."""

    def record(self, name: str) -> ModelRecord:
        """The record of a model, empty if the model is unknown."""
        return self.models.get(name, ModelRecord())

    def with_record(self, name: str, record: ModelRecord) -> AgentState:
        """A copy with one model's record replaced."""
        return replace(self, models={**self.models, name: record})


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        kind = "state" if path.name == STATE_FILE else "blob"
        faults.point(f"write:{kind}:tmp")
        os.replace(tmp, path)
        faults.point(f"write:{kind}:renamed")
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Store:
    """Blobs and state of one state directory."""

    def __init__(self, root: str | os.PathLike[str], *, keep_blobs: int = 4):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.keep_blobs = keep_blobs
        self._lock_fd: int | None = None
        try:
            for d in (self.root, self.blobs, self.partial):
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as err:
            raise StoreError(f"cannot create state directory {self.root}: {err.strerror}") from err

    @classmethod
    def from_config(cls, config: AgentConfig) -> Store:
        """The store of an agent configuration."""
        return cls(config.state_dir, keep_blobs=config.store.keep_blobs)

    # --- the daemon's lock ---------------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the state directory's exclusive lock (held while a daemon runs); False if someone holds it."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        """Path of state.json."""
        return self.root / STATE_FILE

    def load(self) -> AgentState:
        """Read state.json (or its backup if it is unreadable); a fresh state if neither exists."""
        problems = []
        for path in (self.state_path, self.state_path.with_suffix(".json.bak")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                value = parse_json(data, limit=64 << 20)
                if isinstance(value, dict):
                    # state.json of agents that remembered rejected deployment ids; the per-model
                    # version floor replaces that list
                    value.pop("rejected", None)
                return parse(AgentState, value)
            except ProtocolError as err:
                problems.append(f"{path.name}: {err}")
                log.error("state file %s is unreadable: %s", path, err)
        if problems:
            raise StoreError("no readable state: " + "; ".join(problems))
        return AgentState()

    def save(self, state: AgentState) -> None:
        """Write state.json atomically, keeping the previous one as state.json.bak."""
        data = canonical_json(dump(state))
        try:
            if self.state_path.exists():
                bak = self.state_path.with_suffix(".json.bak")
                tmp_link = bak.with_name(bak.name + ".new")
                try:
                    os.unlink(tmp_link)
                except FileNotFoundError:
                    pass
                os.link(self.state_path, tmp_link)
                os.replace(tmp_link, bak)
                faults.point("state:bak")
            write_atomically(self.state_path, data)
        except OSError as err:
            raise StoreError(f"cannot write {self.state_path}: {err.strerror}") from err

    # --- blobs ---------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where a complete artifact with this digest lives."""
        if not SHA256_RE.match(sha256):
            raise StoreError(f"not a SHA-256 digest: {sha256!r}")
        return self.blobs / sha256

    def has_blob(self, sha256: str) -> bool:
        """True if the artifact is stored."""
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes, sha256: str) -> Path:
        """Store an artifact after checking its digest; atomic, so a blob on disk is always complete."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"blob {sha256[:12]}: content does not match its digest")
        path = self.blob_path(sha256)
        if path.is_file():
            return path
        try:
            write_atomically(path, data, mode=0o640)
        except OSError as err:
            raise StoreError(f"cannot store blob {sha256[:12]}: {err.strerror}") from err
        return path

    def read_blob(self, sha256: str) -> bytes:
        """An artifact's bytes, checked against its digest."""
        try:
            data = self.blob_path(sha256).read_bytes()
        except OSError as err:
            raise StoreError(f"blob {sha256[:12]} is missing: {err.strerror}") from err
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"blob {sha256[:12]} is corrupt")
        return data

    def referenced(self, state: AgentState) -> set[str]:
        """Digests that state.json still needs."""
        keep: set[str] = set()
        for record in state.models.values():
            for inst in (record.active, record.previous):
                if inst is not None:
                    keep.update((inst.sha256, inst.golden_sha256))
            if record.pending is not None:
                try:
                    keep.add(record.pending["model"]["artifact"]["sha256"])
                    keep.add(record.pending["model"]["golden"]["sha256"])
                except (KeyError, TypeError):
                    pass
        return keep

    def prune(self, state: AgentState) -> list[str]:
        """Delete blobs no model needs beyond the `keep_blobs` most recent; return the deleted digests."""
        keep = self.referenced(state)
        extra = sorted(
            (p for p in self.blobs.iterdir() if p.is_file() and p.name not in keep and SHA256_RE.match(p.name)),
            key=lambda p: p.stat().st_mtime, reverse=True,
        )
        removed = []
        for p in extra[self.keep_blobs:]:
            try:
                p.unlink()
                removed.append(p.name)
            except OSError as err:
                log.warning("cannot prune blob %s: %s", p.name, err.strerror)
        for p in self.blobs.iterdir():
            if p.name.startswith("."):  # temporary files left by a crash mid-write
                p.unlink(missing_ok=True)
        return removed

    def blobs_on_disk(self) -> Iterable[Path]:
        """Every complete blob file."""
        return (p for p in self.blobs.iterdir() if p.is_file() and SHA256_RE.match(p.name))

    def clear_partial(self) -> None:
        """Remove every partial download."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True, exist_ok=True)


def safe_model_name(name: str) -> str:
    """`name` if it is safe as a file and topic component; StoreError otherwise."""
    problem = check_name(name)
    if problem:
        raise StoreError(f"model name {name!r}: {problem}")
    return name


def state_summary(state: AgentState) -> dict[str, Any]:
    """A compact JSON-able view of the state for `status`."""
    return json.loads(canonical_json(dump(state)))  # type: ignore[no-any-return]
