"""Errors a user can cause, shared by every layer.

`JetagentError` marks an *expected* failure: a bad config, a missing model, a
model that does not fit the camera pipeline, a runtime that is not installed.
The command-line tools print its message on one line and exit non-zero; the
daemon reports it to the fleet. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class JetagentError(Exception):
    """An expected, user-facing failure with a specific message."""


class BackendUnavailable(JetagentError):
    """The requested runtime (ONNX Runtime, TensorRT, ...) cannot be used here."""


class ModelLoadError(JetagentError):
    """A model file is missing, unreadable, or not a model the runtime accepts."""


class ModelMismatch(JetagentError):
    """A model's inputs or outputs do not fit the pipeline or its model card."""


class InferenceError(JetagentError):
    """The runtime failed while running a model on a frame."""
