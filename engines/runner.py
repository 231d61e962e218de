"""A model ready for the camera loop: card + backend + pre/post-processing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.base import Backend, BackendOptions, open_backend
from engines.errors import ModelLoadError, ModelMismatch
from engines.fileio import sha256_file
from engines.modelcard import ModelCard, card_path_for, check_backend, load_card
from engines.postprocess import FrameTransform, Postprocessor, Result, make_postprocessor
from engines.preprocess import Preprocessor
from engines.sanity import Finding, frame_findings


def file_sha256(path: str | Path) -> str:
    """A model file's sha256; ModelLoadError when it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


class ModelRunner:
    """Everything needed to turn a frame into a `Result` with one model.

    The three stages are separate methods so the pipeline can time each one.
    Construction checks the backend against the card: a model whose inputs do
    not fit the pipeline never reaches a camera.
    """

    def __init__(self, card: ModelCard, backend: Backend, sha256: str = "", path: str = "") -> None:
        try:
            check_backend(card, backend)
            self.post: Postprocessor = make_postprocessor(card)
            have = {t.name for t in backend.outputs}
            missing = [n for n in self.post.output_names if n not in have]
            if missing:
                raise ModelMismatch(
                    f"model {card.name!r} has no output(s) {', '.join(map(repr, missing))} named in its card "
                    f"(it has: {', '.join(sorted(have))})"
                )
        except Exception:
            backend.close()
            raise
        self.card = card
        self.backend = backend
        self.sha256 = sha256
        self.path = path
        self.pre = Preprocessor(card.input)
        self._input_name = card.input.name

    @property
    def precision(self) -> str:
        return self.backend.precision

    def preprocess(self, frame: np.ndarray) -> tuple[np.ndarray, FrameTransform]:
        return self.pre(frame)

    def infer(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.infer({self._input_name: tensor})

    def postprocess(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        return self.post(outputs, transform)

    def sanity(self, outputs: Mapping[str, np.ndarray], result: Result | None = None) -> list[Finding]:
        """What `engines.sanity` finds wrong with one frame's outputs of this model (empty: none)."""
        spec = self.card.input
        return frame_findings(outputs, self.post, specs=self.backend.outputs, result=result,
                              input_size=(spec.width, spec.height))

    def run(self, frame: np.ndarray) -> Result:
        tensor, transform = self.preprocess(frame)
        return self.postprocess(self.infer(tensor), transform)

    def warm_up(self, frame: np.ndarray, runs: int = 3) -> Result:
        """Run a few frames so first-call allocations happen before it serves."""
        result = self.run(frame)
        for _ in range(runs - 1):
            result = self.run(frame)
        return result

    def info(self) -> dict[str, object]:
        return {
            "model": self.card.name, "sha256": self.sha256, "path": self.path,
            "backend": self.backend.name, "precision": self.precision,
        }

    def close(self) -> None:
        self.backend.close()


def open_model(
    model_path: str | Path,
    *,
    card: ModelCard | str | Path | None = None,
    backend: str = "onnxruntime",
    options: BackendOptions | None = None,
    sha256: str | None = None,
) -> ModelRunner:
    """Open a model file with its card (default: `<model>.json` beside it)."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if not isinstance(card, ModelCard):
        card = load_card(card if card is not None else card_path_for(path))
    digest = sha256 if sha256 is not None else file_sha256(path)
    be = open_backend(backend, path, options)
    return ModelRunner(card, be, sha256=digest, path=str(path))
