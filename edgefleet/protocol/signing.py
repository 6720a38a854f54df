"""Ed25519 signatures over canonical JSON, with key ids so keys can be rotated."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.errors import SignatureError
from edgefleet.protocol.canonical import canonical_json

PRIVATE_KEY_FILE = "edgefleet.key"
PUBLIC_KEY_FILE = "edgefleet.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """The id of a public key: the first 16 hex characters of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_payload(document: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: canonical JSON of the document without its `signature` field."""
    return canonical_json({k: v for k, v in document.items() if k != "signature"})


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs documents."""

    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        """Id of the matching public key."""
        return key_id(self.private_key.public_key())

    def sign(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Return a copy of `document` with `key_id` set and `signature` over everything else."""
        out = {k: v for k, v in document.items() if k != "signature"}
        out["key_id"] = self.key_id
        signature = self.private_key.sign(signed_payload(out))
        out["signature"] = base64.b64encode(signature).decode("ascii")
        return out

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Load a PEM (PKCS#8) private key; a directory means its edgefleet.key."""
        p, key = _read_pem(path, PRIVATE_KEY_FILE, lambda pem: serialization.load_pem_private_key(pem, password=None),
                           "signing key", "an unencrypted PEM private key")
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{p} is not an Ed25519 private key")
        return cls(key)

    def public_pem(self) -> bytes:
        """The public key as PEM."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write edgefleet.key (mode 0600) and edgefleet.pub into `directory`; never overwrite."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        private, public = d / PRIVATE_KEY_FILE, d / PUBLIC_KEY_FILE
        for p in (private, public):
            if p.exists():
                raise SignatureError(f"{p} already exists; refusing to overwrite a key")
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(self.public_pem())
        return private, public


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM public key; a directory means its edgefleet.pub."""
    p, key = _read_pem(path, PUBLIC_KEY_FILE, serialization.load_pem_public_key, "public key", "a PEM public key")
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{p} is not an Ed25519 public key")
    return key


def _read_pem(path: str | os.PathLike[str], file_name: str, load: Callable[[bytes], object], role: str,
              pem_form: str) -> tuple[Path, object]:
    """The file read (a directory means its `file_name`) and the key `load` finds in it, of any type."""
    p = Path(path)
    if p.is_dir():
        p = p / file_name
    try:
        key = load(p.read_bytes())
    except OSError as err:
        raise SignatureError(f"cannot read {role} {p}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{p} is not {pem_form}") from err
    return p, key


class Keyring:
    """The public keys a device trusts, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()):
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> Keyring:
        """A keyring of the PEM public keys in `paths`."""
        return cls(load_public_key(p) for p in paths)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        """Ids of the trusted keys."""
        return sorted(self._keys)

    def verify(self, document: Mapping[str, Any]) -> str:
        """Check the document's signature; return the key id or raise SignatureError saying why."""
        kid, signature = document.get("key_id"), document.get("signature")
        if signature is None or kid is None:
            raise SignatureError("document is not signed")
        if not isinstance(kid, str) or not isinstance(signature, str):
            raise SignatureError("key_id and signature must be strings")
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"signed with unknown key {kid}")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError) as err:
            raise SignatureError("signature is not valid base64") from err
        try:
            key.verify(raw, signed_payload(document))
        except InvalidSignature as err:
            raise SignatureError(f"signature does not match the document (key {kid})") from err
        return kid
