"""The operator-signed inventory: which devices form each group, as host tools must believe it.

A device's retained status lists the groups it says it belongs to, and any MQTT client that may
publish that status can claim any group. Host tools therefore take group membership (the devices a
`push --group --wait` waits for and counts, the canaries a `push --canary` picks) only from the
inventory: an `Inventory` document signed with an operator key, retained on ``P/inventory``.

`InventoryTracker` is the Transport handler that reads it. A document is believed only when

- its signature verifies with one of the keys the operator trusts (``--trust``, plus the public half
  of ``--key``);
- its `version` is not lower than the highest this host has already seen. Hosts remember the newest
  verified inventory per broker and prefix in a small cache file (`InventoryCache`), so someone who
  may publish on the broker but lacks the key cannot bring back an older signed inventory (one that
  still listed a retired device, say): the host keeps using the newer one it knows.

Anything else is ignored with one warning line. An expired inventory is not used for membership
(the operator renews it: ``edgectl inventory renew``) but still counts for versions.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edgefleet.converter.fleet.connect import broker_urls
from edgefleet.errors import ProtocolError, SignatureError, UsageError
from edgefleet.protocol import Keyring, SigningKey, Topics, canonical_json, load_public_key, parse_json
from edgefleet.protocol.documents import INVENTORY_SCHEMA, Inventory
from edgefleet.transport import Message

log = logging.getLogger(__name__)

ENV_TRUST = "EDGEFLEET_TRUST"
ENV_STATE_DIR = "EDGEFLEET_STATE_DIR"
DEFAULT_EXPIRY_S = 90 * 24 * 3600
HOW_TO_PUBLISH = "publish one with 'edgectl inventory set GROUP DEVICE... --key KEY'"


def warn(text: str) -> None:
    """One warning line on stderr, in the style of edgectl's error lines."""
    print(f"edgectl: warning: {' '.join(text.split())}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- which keys the host trusts


def add_trust_args(parser: argparse.ArgumentParser) -> None:
    """The --trust option: operator public keys that sign inventories."""
    default = [p for p in os.environ.get(ENV_TRUST, "").split(os.pathsep) if p]
    parser.add_argument("--trust", action="append", default=None, metavar="PUB",
                        help="public key (file, or keygen directory) whose signed inventory to believe; repeat for "
                             f"several (default: ${ENV_TRUST}, {os.pathsep}-separated; the public half of --key is "
                             "always trusted)")
    parser.set_defaults(trust_default=default)


def keyring_from_args(args: argparse.Namespace, key: SigningKey | None = None) -> Keyring:
    """The operator keys this command believes: --trust (or $EDGEFLEET_TRUST) and the public half of `key`."""
    paths = args.trust if getattr(args, "trust", None) else getattr(args, "trust_default", [])
    keys = []
    for p in paths:
        if not Path(p).exists():
            raise UsageError(f"--trust {p}: no such file or directory")
        try:
            keys.append(load_public_key(p))
        except SignatureError as err:
            raise UsageError(f"--trust {p}: {err}") from err
    if key is not None:
        keys.append(key.private_key.public_key())
    return Keyring(keys)


# ---------------------------------------------------------------------- the newest inventory this host saw


def state_dir() -> Path:
    """Where host tools keep what they remember between runs ($EDGEFLEET_STATE_DIR, else XDG state)."""
    explicit = os.environ.get(ENV_STATE_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet"


class InventoryCache:
    """The newest verified inventory document seen for one broker and prefix, kept in a file.

    The file holds the signed document itself, so it is checked again on every read: a cache edited
    by hand, or signed by a key no longer trusted, is ignored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_broker(cls, url: str, prefix: str) -> InventoryCache:
        """The cache file of this broker url and topic prefix (other brokers keep their own)."""
        digest = hashlib.sha256(f"{url}\n{prefix}".encode()).hexdigest()[:16]
        return cls(state_dir() / f"inventory-{digest}.json")

    def load(self, keyring: Keyring) -> tuple[Inventory, dict[str, Any]] | None:
        """The cached inventory, verified; None when absent or no longer verifiable."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        try:
            raw = parse_json(data)
            keyring.verify(raw)
            return Inventory.from_dict(raw), raw
        except (ProtocolError, UnicodeError, ValueError) as err:
            log.info("ignoring the cached inventory %s: %s", self.path, err)
            return None

    def save(self, raw: Mapping[str, Any]) -> None:
        """Replace the cached document (atomically); a cache that cannot be written only costs a warning."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(canonical_json(dict(raw)))
            os.replace(tmp, self.path)
        except OSError as err:
            warn(f"cannot remember the inventory in {self.path}: {err.strerror or err}")


# ---------------------------------------------------------------------- reading it from the broker


@dataclass(frozen=True)
class Verified:
    """An inventory whose signature verified, with the id of the key that signed it."""

    inventory: Inventory
    raw: dict[str, Any]
    key_id: str
    source: str  # "broker" or "cache"

    def expired(self, now: float) -> bool:
        """True once its validity is over."""
        return now > self.inventory.expires_at

    def groups_of(self, device: str) -> tuple[str, ...]:
        """The groups the inventory puts `device` in."""
        return tuple(sorted(g for g, members in self.inventory.groups.items() if device in members))


def check_inventory(payload: bytes, keyring: Keyring) -> tuple[Inventory, dict[str, Any], str]:
    """Parse and verify one inventory payload; ProtocolError (a SignatureError for signatures) saying why."""
    try:
        raw = parse_json(payload)
    except ProtocolError as err:
        raise ProtocolError(f"not a JSON document ({err})") from err
    if not isinstance(raw, dict) or raw.get("schema") != INVENTORY_SCHEMA:
        raise ProtocolError(f"not an inventory (schema {INVENTORY_SCHEMA} expected)")
    try:
        kid = keyring.verify(raw)
    except UnicodeError as err:  # a lone surrogate cannot be written as canonical UTF-8: it was never signed
        raise SignatureError("the document cannot be encoded as canonical JSON, so no signature covers it") from err
    return Inventory.from_dict(raw), raw, kid


class InventoryTracker:
    """A Transport handler for ``P/inventory``: the newest verified inventory, warnings for every other.

    `handle` returns True for the inventory topic (so a combined handler can stop there). Thread-safe.
    """

    def __init__(self, topics: Topics, keyring: Keyring, cache: InventoryCache | None = None, *,
                 clock: Callable[[], float] = time.time, on_warning: Callable[[str], None] = warn) -> None:
        self.topics = topics
        self.keyring = keyring
        self.cache = cache
        self._clock = clock
        self._warn = on_warning
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.received = False  # an inventory payload (verified or not) was on the broker
        self._latest: Verified | None = None
        if cache is not None and keyring:
            cached = cache.load(keyring)
            if cached is not None:
                inventory, raw = cached
                self._latest = Verified(inventory, raw, str(raw.get("key_id")), "cache")

    @property
    def topic(self) -> str:
        """The retained inventory topic."""
        return self.topics.inventory()

    def _once(self, text: str) -> None:
        with self._lock:
            if text in self._warned:
                return
            self._warned.add(text)
        self._warn(text)

    def handle(self, message: Message) -> bool:
        """Take a message on the inventory topic (False for any other topic)."""
        if message.topic != self.topic:
            return False
        if not message.payload:
            return True  # a cleared retained inventory takes nothing back from what this host knows
        with self._lock:
            self.received = True
        if not self.keyring:
            self._once("an inventory is on the broker but no operator key is trusted, so it is not used "
                       "(give --trust PUB or --key)")
            return True
        try:
            inventory, raw, kid = check_inventory(message.payload, self.keyring)
        except (ProtocolError, ValueError) as err:
            self._once(f"ignoring the inventory on the broker: {err}")
            return True
        with self._lock:
            latest = self._latest
            if latest is not None and inventory.version < latest.inventory.version:
                problem = (f"ignoring the inventory on the broker: version {inventory.version} is lower than "
                           f"version {latest.inventory.version} already seen (an old inventory published again?)")
            elif latest is not None and inventory.version == latest.inventory.version:
                if canonical_json(raw) != canonical_json(latest.raw):
                    problem = (f"ignoring the inventory on the broker: it differs from version "
                               f"{inventory.version} already seen under the same version number")
                else:
                    problem = ""
                    self._latest = Verified(inventory, raw, kid, "broker")
            else:
                problem = ""
                self._latest = Verified(inventory, raw, kid, "broker")
                if self.cache is not None:
                    self.cache.save(raw)
        if problem:
            self._once(problem)
        return True

    def accept(self, raw: dict[str, Any]) -> None:
        """Take an inventory this host just issued (verified with the keyring) as the newest."""
        inventory = Inventory.from_dict(raw)
        kid = self.keyring.verify(raw)
        with self._lock:
            self._latest = Verified(inventory, raw, kid, "broker")
        if self.cache is not None:
            self.cache.save(raw)

    @property
    def latest(self) -> Verified | None:
        """The newest verified inventory known (from the broker or the cache), expired or not."""
        with self._lock:
            return self._latest

    def current(self) -> Verified | None:
        """The newest verified inventory that has not expired (warning once when it has)."""
        latest = self.latest
        if latest is None:
            return None
        if latest.expired(self._clock()):
            self._once(f"the inventory (version {latest.inventory.version}) expired at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(latest.inventory.expires_at))}; "
                       "renew it with 'edgectl inventory renew --key KEY'")
            return None
        return latest

    def editable(self, purpose: str) -> Verified | None:
        """The inventory a change starts from (None: there is none yet); UsageError when the broker holds
        one this host cannot verify, whose groups a change would otherwise silently drop."""
        latest = self.latest
        if latest is None and self.received:
            raise UsageError(f"{purpose}: the inventory on the broker does not verify with the trusted keys "
                             "(see the warning above), so it cannot be changed; give --trust for the key that signed "
                             "it, or replace it whole with 'edgectl inventory push FILE --key KEY'")
        return latest

    def members(self, group: str, purpose: str) -> tuple[str, ...]:
        """The members of `group` from the verified inventory; UsageError (exit 2) saying what to do otherwise."""
        current = self.current()
        if current is None:
            if not self.keyring:
                why = "no operator key is trusted to verify an inventory (give --trust PUB or --key)"
            elif self.latest is not None:
                why = f"the inventory (version {self.latest.inventory.version}) has expired; renew it with " \
                      "'edgectl inventory renew --key KEY'"
            elif self.received:
                why = f"the inventory on the broker does not verify (see the warning above); {HOW_TO_PUBLISH}"
            else:
                why = f"there is no inventory on the broker; {HOW_TO_PUBLISH}"
            raise UsageError(f"{purpose} takes group membership from the signed inventory, and {why}; "
                             "nothing was published")
        members = current.inventory.members(group)
        if not members:
            raise UsageError(f"{purpose}: group {group} has no members in the inventory (version "
                             f"{current.inventory.version}); add them with 'edgectl inventory set {group} DEVICE... "
                             "--key KEY'; nothing was published")
        return tuple(dict.fromkeys(members))


def read_inventory_file(path: Path) -> dict[str, list[str]]:
    """Groups from a TOML file: a [groups] table of NAME = [DEVICE, ...]; UsageError naming what is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid TOML ({err})") from err
    unknown = sorted(set(data) - {"groups"})
    if unknown:
        raise UsageError(f"{path}: {unknown[0]}: unknown key (expected only a [groups] table)")
    groups = data.get("groups")
    if not isinstance(groups, dict):
        raise UsageError(f"{path}: groups: expected a table of NAME = [DEVICE, ...]")
    out = {}
    for g, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise UsageError(f"{path}: groups.{g}: expected a list of device ids")
        out[g] = members
    return out


def tracker_from_args(args: argparse.Namespace, topics: Topics, key: SigningKey | None = None) -> InventoryTracker:
    """The inventory reader of a command: its broker's cache, the keys of --trust plus the public half of `key`."""
    cache = InventoryCache.for_broker(broker_urls(args)[0], topics.prefix)
    return InventoryTracker(topics, keyring_from_args(args, key), cache)


# ---------------------------------------------------------------------- issuing one


def issue(key: SigningKey, groups: Mapping[str, Iterable[str]], version: int, *,
          expires_in: int = DEFAULT_EXPIRY_S, now: int | None = None) -> dict[str, Any]:
    """A signed inventory document (groups and members sorted, duplicates dropped)."""
    issued = int(time.time()) if now is None else now
    doc = {
        "schema": INVENTORY_SCHEMA, "version": version, "issued_at": issued, "expires_at": issued + expires_in,
        "groups": {g: sorted(set(members)) for g, members in sorted(groups.items()) if members},
    }
    Inventory.from_dict(doc)  # refuse to sign what a host would not read
    return key.sign(doc)
