"""Ed25519 keys and signed envelopes for model manifests.

The envelope carries the manifest as the exact JSON text that was signed, so
verification never depends on re-serialising JSON the same way twice:

    {"v": 1, "alg": "ed25519", "key_id": "<16 hex>", "manifest": "<JSON text>", "signature": "<base64>"}

`key_id` is the first 16 hex digits of sha256(raw public key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engines.errors import JetagentError
from engines.fileio import atomic_write_bytes


class SignatureError(JetagentError):
    """A manifest that is unsigned, signed by an unknown key, or whose signature fails."""


class KeyFileError(JetagentError):
    """A key file that is missing or not an Ed25519 key."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(directory: str | Path, name: str = "fleet") -> tuple[Path, Path]:
    """Write DIR/NAME.key (PEM PKCS8, mode 0600) and DIR/NAME.pub (PEM). Refuses to overwrite."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv, mode=0o600)
    atomic_write_bytes(pub_path, pub, mode=0o644)
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device accepts signatures from, by key id."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def from_files(cls, paths: list[str] | tuple[str, ...] | list[Path]) -> TrustStore:
        keys = {}
        for p in paths:
            k = load_public_key(p)
            keys[key_id(k)] = k
        return cls(keys)


def sign(manifest: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Sign a manifest; returns the envelope as JSON bytes."""
    kid = key_id(key.public_key())
    text = json.dumps({**manifest, "key_id": kid}, sort_keys=True, separators=(",", ":"))
    sig = key.sign(text.encode())
    envelope = {"v": 1, "alg": "ed25519", "key_id": kid, "manifest": text,
                "signature": base64.b64encode(sig).decode()}
    return json.dumps(envelope, sort_keys=True).encode()


def verify(envelope_bytes: bytes, trust: TrustStore) -> dict[str, Any]:
    """Check an envelope against the trusted keys; return the manifest it carries."""
    try:
        env = json.loads(envelope_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"manifest envelope is not valid JSON ({exc})") from None
    if not isinstance(env, dict):
        raise SignatureError("manifest envelope must be a JSON object")
    if "signature" not in env or "manifest" not in env:
        raise SignatureError("manifest is not signed (no signature in the envelope)")
    if env.get("alg") != "ed25519":
        raise SignatureError(f"unsupported signature algorithm {env.get('alg')!r}; only ed25519 is accepted")
    kid, text, sig_b64 = env.get("key_id"), env.get("manifest"), env.get("signature")
    if not isinstance(kid, str) or not isinstance(text, str) or not isinstance(sig_b64, str):
        raise SignatureError("manifest envelope: key_id, manifest and signature must be strings")
    public = trust.keys.get(kid)
    if public is None:
        raise SignatureError(f"manifest signed by unknown key {kid}; this device trusts "
                             f"{', '.join(sorted(trust.keys)) or 'no keys'}")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
        public.verify(sig, text.encode())
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"manifest signature does not verify with key {kid} (tampered?)") from None
    manifest = json.loads(text)
    if not isinstance(manifest, dict) or manifest.get("key_id") != kid:
        raise SignatureError("signed manifest names a different key than its envelope")
    return manifest


def fingerprint_file(path: str | Path) -> str:
    return key_id(load_public_key(path))
