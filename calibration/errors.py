"""Errors the calibration layer raises. All are expected failures (`JetagentError`):
the CLI prints them on one line and the deployment reports them to the fleet."""

from __future__ import annotations

from engines.errors import JetagentError


class CalibrationError(JetagentError):
    """A calibration set is missing, corrupt, too small, or made for another input spec."""


class QuantizationError(JetagentError):
    """ONNX Runtime's quantizer failed, or produced a model the target cannot use."""


class DeployError(JetagentError):
    """No engine could be prepared for a model, not even the FP32 fallback."""
