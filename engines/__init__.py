"""Runtime layer: turn an ONNX file (or an engine built from it) into a running Backend.

Imports nothing heavy at package import time; see `engines.base.open_backend`.
"""
