"""Model manifests: what a device needs to fetch, verify and run a model.

A manifest names the model by sha256 and size, splits it into fixed-size chunks
with one sha256 each (so every chunk is verified as it lands and a download
resumes chunk by chunk), and carries the model card (input spec,
post-processor, labels), the INT8 accuracy bound and compatibility limits.
It travels signed (agent.wire.signing) as a retained message.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.wire.core import Fields, ProtocolError, valid_sha256
from engines.modelcard import ModelCard, ModelCardError, parse_card

KIND = "jetagent.model-manifest"
DEFAULT_CHUNK = 256 * 1024
MIN_CHUNK = 4 * 1024
MAX_CHUNKS = 1 << 16
MAX_CHUNK = 16 * 1024 * 1024 - 4096


@dataclass(frozen=True)
class AccuracyBound:
    """The least agreement with FP32 an INT8 (or FP16) candidate must show to serve.

    metric: "auto" (by task: detection F1 at IoU 0.5, classification top-1
    agreement, else output cosine similarity) or one of those names.
    """

    minimum: float = 0.95
    metric: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.minimum, "metric": self.metric}


@dataclass(frozen=True)
class Manifest:
    sha256: str
    size: int
    name: str
    chunk_size: int
    chunks: tuple[str, ...]
    card: dict[str, Any]
    accuracy: AccuracyBound = field(default_factory=AccuracyBound)
    min_agent_version: str = "0.1.0"
    created: float = 0.0
    key_id: str = ""

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def model_card(self, base_dir: Path) -> ModelCard:
        return parse_card(self.card, base_dir=base_dir, where=f"manifest {self.sha256[:12]}: card")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1, "kind": KIND,
            "model": {"sha256": self.sha256, "size": self.size, "name": self.name},
            "chunks": {"size": self.chunk_size, "sha256": list(self.chunks)},
            "card": self.card, "accuracy": self.accuracy.to_dict(),
            "min_agent_version": self.min_agent_version, "created": self.created,
        }


def build_manifest(model: bytes, card: ModelCard, *, chunk_size: int = DEFAULT_CHUNK,
                   accuracy: AccuracyBound | None = None, min_agent_version: str = "0.1.0") -> Manifest:
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ProtocolError(f"chunk size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK} bytes")
    n = max(1, -(-len(model) // chunk_size))
    if n > MAX_CHUNKS:
        raise ProtocolError(f"{len(model)} bytes in {chunk_size}-byte chunks is {n} chunks; the limit is "
                            f"{MAX_CHUNKS}: use a larger chunk size")
    chunks = tuple(hashlib.sha256(model[i * chunk_size:(i + 1) * chunk_size]).hexdigest() for i in range(n))
    return Manifest(
        sha256=hashlib.sha256(model).hexdigest(), size=len(model), name=card.name, chunk_size=chunk_size,
        chunks=chunks, card=card.to_dict(), accuracy=accuracy or AccuracyBound(),
        min_agent_version=min_agent_version, created=round(time.time(), 3),
    )


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def parse_manifest(raw: dict[str, Any], *, agent_version: str = __version__) -> Manifest:
    """Validate a (signature-checked) manifest dict. Raises ProtocolError naming the field."""
    f = Fields(raw, "manifest")
    if raw.get("v") != 1 or raw.get("kind") != KIND:
        raise ProtocolError(f"manifest: not a v1 {KIND} (v={raw.get('v')!r}, kind={raw.get('kind')!r})")
    model = Fields(f.obj("model", required=True), "manifest: model")
    chunks = Fields(f.obj("chunks", required=True), "manifest: chunks")
    sha = model.sha256("sha256")
    size = model.integer("size", minimum=1)
    # A chunk frame must fit the 16 MiB a device accepts in one packet (agent.wire.chunks.INBOUND_MAX_PACKET).
    chunk_size = chunks.integer("size", minimum=MIN_CHUNK, maximum=MAX_CHUNK)
    hashes = raw["chunks"].get("sha256")
    want = -(-size // chunk_size)
    if not isinstance(hashes, list) or len(hashes) != want or not all(
            isinstance(h, str) and valid_sha256(h) for h in hashes):
        raise ProtocolError(f"manifest: chunks: sha256: must be {want} sha256 hex digests for {size} bytes "
                            f"in {chunk_size}-byte chunks")
    acc = Fields(f.obj("accuracy"), "manifest: accuracy")
    accuracy = AccuracyBound(minimum=acc.number("min", 0.95), metric=acc.text("metric", "auto"))
    if not 0.0 <= accuracy.minimum <= 1.0:
        raise ProtocolError("manifest: accuracy: min: must be between 0 and 1")
    min_version = f.text("min_agent_version", "0.1.0")
    if _version_tuple(min_version) > _version_tuple(agent_version):
        raise ProtocolError(f"manifest: needs agent {min_version} or later; this is {agent_version}")
    card = f.obj("card", required=True)
    try:
        parse_card(card, where="manifest: card")
    except ModelCardError as exc:
        raise ProtocolError(str(exc)) from None
    return Manifest(
        sha256=sha, size=size, name=model.text("name"), chunk_size=chunk_size, chunks=tuple(hashes),
        card=card, accuracy=accuracy, min_agent_version=min_version,
        created=f.number("created", 0.0), key_id=f.text("key_id", "", required=False),
    )
