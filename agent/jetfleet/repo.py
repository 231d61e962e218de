"""The operator's content-addressed model repository (`jetfleet push --repo DIR`).

    DIR/models/<sha256>.onnx        the model bytes, named by their hash
    DIR/manifests/<sha256>.json     its signed manifest envelope
    DIR/names/<name>                the newest sha256 pushed under a model name

`jetfleet serve --repo DIR` answers devices' chunk requests from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire.manifest import DEFAULT_CHUNK, AccuracyBound, Manifest, build_manifest, parse_manifest
from agent.wire.signing import load_private_key, sign
from engines.cardinit import card_for
from engines.errors import JetagentError, ModelLoadError
from engines.fileio import atomic_write_bytes
from engines.modelcard import ModelCard, card_path_for, parse_card
from engines.postprocess import inline_array, load_array


class RepoError(JetagentError):
    """A model that cannot be added to, or found in, the repository."""


def card_for_transport(card: ModelCard) -> dict[str, Any]:
    """The card as a manifest carries it: arrays named by file (SSD anchors) go inline,
    so a model and everything it needs travel as one signed message plus its chunks."""
    d = card.to_dict()
    post = dict(d["postprocess"])
    for key, value in post.items():
        if isinstance(value, str) and value.endswith(".npy"):
            post[key] = inline_array(load_array(value, card.base_dir, f"card {card.name}: postprocess: {key}"))
    d["postprocess"] = post
    return d


@dataclass(frozen=True)
class Entry:
    manifest: Manifest
    envelope: bytes
    model_path: Path


class ModelRepo:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.manifests = self.root / "manifests"
        self.names = self.root / "names"

    def add(self, model_path: str | Path, key_path: str | Path, *, card_path: str | Path | None = None,
            labels: list[str] | None = None, task: str | None = None, chunk_size: int = DEFAULT_CHUNK,
            accuracy: AccuracyBound | None = None) -> Entry:
        """Add a model with its card; sign the manifest with the fleet key. Idempotent per content."""
        mp = Path(model_path)
        try:
            data = mp.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model {mp}: {exc.strerror or exc}") from exc
        # the card given or beside it, or the one derived from the model when that is unambiguous
        explicit = card_path is not None and Path(card_path) != card_path_for(mp)
        card, _ = card_for(mp, Path(card_path) if explicit and card_path is not None else None)
        raw = card_for_transport(card)
        if labels is not None:
            raw["labels"] = labels
        if task is not None:
            raw["task"] = task
        # re-validated after the overrides
        card = parse_card(raw, base_dir=card.base_dir, where=f"card of {mp.name}")
        manifest = build_manifest(data, card, chunk_size=chunk_size, accuracy=accuracy)
        envelope = sign(manifest.to_dict(), load_private_key(key_path))
        sha = manifest.sha256
        for d in (self.models, self.manifests, self.names):
            d.mkdir(parents=True, exist_ok=True)
        target = self.models / f"{sha}.onnx"
        if not target.exists():
            atomic_write_bytes(target, data)
        atomic_write_bytes(self.manifests / f"{sha}.json", envelope)
        atomic_write_bytes(self.names / card.name, sha.encode())
        return Entry(manifest, envelope, target)

    def get(self, sha256: str) -> Entry:
        env_path = self.manifests / f"{sha256}.json"
        model = self.models / f"{sha256}.onnx"
        try:
            envelope = env_path.read_bytes()
        except FileNotFoundError:
            raise RepoError(f"model {sha256[:12]} is not in the repository {self.root}") from None
        manifest = parse_manifest(json.loads(json.loads(envelope)["manifest"]))
        if not model.is_file():
            raise RepoError(f"repository {self.root} has the manifest of {sha256[:12]} but not the model")
        return Entry(manifest, envelope, model)

    def resolve(self, ref: str) -> str:
        """A sha256 (or a unique prefix of 8+) or a model name -> sha256."""
        if (self.names / ref).is_file():
            return (self.names / ref).read_text().strip()
        if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
            hits = [p.stem for p in self.manifests.glob(f"{ref}*.json")]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise RepoError(f"{ref!r} matches {len(hits)} models; give more digits")
        raise RepoError(f"no model {ref!r} in the repository {self.root}")

    def shas(self) -> list[str]:
        return sorted(p.stem for p in self.manifests.glob("*.json")) if self.manifests.is_dir() else []


