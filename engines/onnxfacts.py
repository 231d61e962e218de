"""What an ONNX file says about itself: inputs and outputs with their symbolic dims, the
exporter, Ultralytics' metadata (task, imgsz, names, stride, end2end), the op that makes each
output (a trailing Softmax means the model already outputs probabilities) and an embedded
TensorRT NMS plugin. Read without the weights' external data, and without a runtime.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import ModelLoadError

Dim = int | str | None
NMS_PLUGINS = ("EfficientNMS_TRT", "EfficientNMS_ONNX_TRT", "BatchedNMSDynamic_TRT", "BatchedNMS_TRT")


@dataclass(frozen=True)
class TensorFacts:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # numpy name
    producer: str = ""  # op type of the node that makes this output ("" for inputs)

    def dim(self, axis: int) -> int | None:
        d = self.shape[axis]
        return d if isinstance(d, int) and d > 0 else None


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    producer: str
    producer_version: str
    metadata: Mapping[str, str]
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    ops: frozenset[str] = frozenset()
    nms_plugin: Mapping[str, Any] | None = None  # {"op": ..., attribute: value}
    ultralytics: Mapping[str, Any] = field(default_factory=dict)  # parsed metadata, where present

    @property
    def exporter(self) -> str:
        """ultralytics | yolov5 | tf2onnx | paddle | pytorch | "" (not recognised)."""
        if str(self.metadata.get("author", "")).startswith("Ultralytics"):
            return "ultralytics"
        if "stride" in self.metadata and "names" in self.metadata:
            return "yolov5"  # the yolov5 repository writes only these two
        p = self.producer.lower()
        if p.startswith("tf2onnx") or p.startswith("keras2onnx"):
            return "tf2onnx"
        if p.startswith("paddle"):
            return "paddle"
        if p == "pytorch":
            return "pytorch"
        return ""

    @property
    def stride(self) -> int | None:
        v = self.ultralytics.get("stride")
        return v if isinstance(v, int) and v > 0 else None

    @property
    def imgsz(self) -> tuple[int, int] | None:
        """(height, width) from Ultralytics' `imgsz`."""
        v = self.ultralytics.get("imgsz")
        if isinstance(v, int) and v > 0:
            return v, v
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v):
            return int(v[0]), int(v[1])
        return None

    @property
    def names(self) -> list[str] | None:
        v = self.ultralytics.get("names")
        if isinstance(v, dict) and v and all(isinstance(k, int) for k in v):
            return [str(v.get(i, i)) for i in range(max(v) + 1)]
        if isinstance(v, (list, tuple)):
            return [str(x) for x in v]
        return None

    @property
    def task(self) -> str | None:
        v = self.ultralytics.get("task")
        return str(v) if isinstance(v, str) else None

    @property
    def end2end(self) -> bool | None:
        """True when Ultralytics says NMS is inside the model (`end2end`, or export args nms=True)."""
        if isinstance(self.ultralytics.get("end2end"), bool):
            return bool(self.ultralytics["end2end"])
        args = self.ultralytics.get("args")
        if isinstance(args, dict) and isinstance(args.get("nms"), bool):
            return bool(args["nms"])
        return None


def near_multiple(v: int, stride: int) -> int:
    """The multiple of `stride` nearest `v` (at least `stride`)."""
    return max(stride, round(v / stride) * stride)


def _literal(text: str) -> Any:
    """Ultralytics writes str(python value): "32", "[640, 640]", "{0: 'person'}", "True"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _dims(value_info: Any) -> tuple[Dim, ...]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    out: list[Dim] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return tuple(out)


def _dtype(value_info: Any) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem).name)
    except (KeyError, ValueError, TypeError):
        return str(elem)


def read_facts(path: str | Path) -> ModelFacts:
    """Read an ONNX file's facts. Raises ModelLoadError when it is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (OSError, DecodeError, ValueError) as exc:
        raise ModelLoadError(f"{p} is not a readable ONNX model: {str(exc).strip().splitlines()[0][:200]}") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producers = {out: node.op_type for node in graph.node for out in node.output}
    meta = {p.key: p.value for p in model.metadata_props}
    parsed = {k: _literal(meta[k]) for k in ("stride", "imgsz", "names", "task", "end2end", "args", "batch")
              if k in meta}
    plugin = None
    for node in graph.node:
        if node.op_type in NMS_PLUGINS:
            plugin = {"op": node.op_type, **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}}
            break
    inputs = tuple(TensorFacts(v.name, _dims(v), _dtype(v)) for v in graph.input if v.name not in initializers)
    outputs = tuple(TensorFacts(v.name, _dims(v), _dtype(v), producers.get(v.name, "")) for v in graph.output)
    return ModelFacts(path=p, producer=model.producer_name, producer_version=model.producer_version, metadata=meta,
                      inputs=inputs, outputs=outputs, ops=frozenset(n.op_type for n in graph.node), nms_plugin=plugin,
                      ultralytics=parsed)


def read_facts_quietly(path: str | Path) -> ModelFacts | None:
    """The ONNX facts of a model file, or None (not ONNX: a TensorRT plan, or unreadable)."""
    p = Path(path)
    if p.suffix.lower() != ".onnx" or not p.is_file():
        return None
    try:
        return read_facts(p)
    except ModelLoadError:
        return None
