"""Optimization profiles: the (min, opt, max) shapes a TensorRT engine accepts per input.

A network whose inputs have a dynamic dimension (a dynamic-batch YOLO export:
`[-1, 3, 640, 640]`) builds only with an optimization profile naming every dynamic
input's range. The implicit INT8 calibrator then calibrates with the profile's OPT
shape ("MIN and MAX values will be overwritten by kOPT", set_calibration_profile at
10.3.0), so calibration batches must have exactly that shape; on a static network
they must have the network's own shape (`calibration_shape`).

This module is plain data, so the build child can take profiles as JSON
(`to_json`/`profile_from_json`), and a caller that wants a range (a batch of 1..8
for a runner shared by several cameras) passes `ProfileShapes(min=(1, 3, 640, 640),
opt=(4, 3, 640, 640), max=(8, 3, 640, 640))` for that input. `fixed_profile` is the
default jetagent uses for one camera: every dynamic dimension pinned to the model
card's input shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import JetagentError

Shape = tuple[int, ...]


class ProfileError(JetagentError):
    """Profile shapes that cannot describe the network's inputs. Nothing was built."""


@dataclass(frozen=True)
class ProfileShapes:
    """One input's shape range: every dimension min <= opt <= max, all of one rank."""

    min: Shape
    opt: Shape
    max: Shape

    @classmethod
    def fixed(cls, shape: Sequence[int]) -> ProfileShapes:
        """min = opt = max = `shape` (an engine for exactly one input shape)."""
        s = tuple(int(d) for d in shape)
        return cls(s, s, s)

    @classmethod
    def coerce(cls, value: ProfileShapes | Sequence[Sequence[int]], name: str = "input") -> ProfileShapes:
        """A ProfileShapes from itself or a (min, opt, max) triple; ProfileError otherwise."""
        if isinstance(value, ProfileShapes):
            result = value
        else:
            try:
                low, opt, high = (tuple(int(d) for d in s) for s in value)
            except (TypeError, ValueError):
                raise ProfileError(f"profile_shapes[{name!r}] must be (min, opt, max) shapes, got {value!r}") \
                    from None
            result = cls(low, opt, high)
        result.check(name)
        return result

    def check(self, name: str = "input") -> None:
        """Raise ProfileError unless one rank, positive dims and min <= opt <= max everywhere."""
        triple = (self.min, self.opt, self.max)
        if len({len(s) for s in triple}) != 1 or any(d <= 0 for s in triple for d in s) or not all(
                lo <= mid <= hi for lo, mid, hi in zip(*triple, strict=True)):
            raise ProfileError(f"profile_shapes[{name!r}] must be (min, opt, max) shapes of one rank with "
                               f"0 < min <= opt <= max, got {list(triple)}")

    def fits(self, network_shape: Sequence[int]) -> bool:
        """True when every fixed dimension of the network's shape (-1 = dynamic) is inside the range."""
        dims = tuple(int(d) for d in network_shape)
        return len(dims) == len(self.opt) and all(
            d < 0 or lo == d == hi for d, lo, hi in zip(dims, self.min, self.max, strict=True))

    def to_json(self) -> list[list[int]]:
        return [list(self.min), list(self.opt), list(self.max)]


def profile_from_json(data: Mapping[str, Any] | None) -> dict[str, ProfileShapes] | None:
    """{name: [[min], [opt], [max]]} (the build child's request) -> {name: ProfileShapes}."""
    if not data:
        return None
    return {str(name): ProfileShapes.coerce(value, str(name)) for name, value in data.items()}


def profile_to_json(shapes: Mapping[str, ProfileShapes] | None) -> dict[str, list[list[int]]] | None:
    return {name: p.to_json() for name, p in shapes.items()} if shapes else None


def dynamic_inputs(inputs: Mapping[str, Shape]) -> list[str]:
    """Names of the inputs with a dynamic (-1) dimension, sorted."""
    return sorted(name for name, shape in inputs.items() if any(d < 0 for d in shape))


def resolve_profile(inputs: Mapping[str, Shape],
                    shapes: Mapping[str, ProfileShapes] | None) -> dict[str, ProfileShapes] | None:
    """The profile a build adds for a network with these input shapes, or None when it needs none.

    Raises ProfileError when a dynamic input has no range, a name is not an input, or a
    range contradicts a fixed dimension of the network.
    """
    dynamic = dynamic_inputs(inputs)
    if not shapes:
        if dynamic:
            raise ProfileError(f"inputs {dynamic} have dynamic dimensions {[list(inputs[n]) for n in dynamic]}; "
                               "give profile_shapes (min, opt, max) for them")
        return None
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ProfileError(f"profile_shapes names unknown inputs {unknown}; inputs are {sorted(inputs)}")
    missing = [name for name in dynamic if name not in shapes]
    if missing:
        raise ProfileError(f"inputs {missing} have dynamic dimensions but no profile_shapes")
    for name, rng in shapes.items():
        if not rng.fits(inputs[name]):
            raise ProfileError(f"profile_shapes[{name!r}] {rng.to_json()} does not fit the network's "
                               f"input shape {list(inputs[name])} (fixed dimensions must stay fixed)")
    # Static inputs not named get their own shape: TensorRT wants every input in a profile.
    full = {name: ProfileShapes.fixed(shape) for name, shape in inputs.items() if name not in shapes}
    full.update(shapes)
    return full


def calibration_shape(network_shape: Sequence[int], rng: ProfileShapes | None) -> Shape:
    """The shape TensorRT reads calibration batches with: the network's own (static) or the OPT shape."""
    dims = tuple(int(d) for d in network_shape)
    if rng is not None and any(d < 0 for d in dims):
        return rng.opt
    return dims


def fixed_profile(network_inputs: Mapping[str, Shape], shapes: Mapping[str, Sequence[int]],
                  ) -> dict[str, ProfileShapes] | None:
    """Pin every dynamic input to the shape given for it (the model card's input, for one camera).

    None when no input is dynamic. ProfileError when a dynamic input has no shape given,
    or the given shape contradicts a fixed dimension.
    """
    dynamic = dynamic_inputs(network_inputs)
    if not dynamic:
        return None
    missing = [name for name in dynamic if name not in shapes]
    if missing:
        raise ProfileError(f"inputs {missing} have dynamic dimensions and no shape to pin them to "
                           "(the camera pipeline feeds only the model card's input)")
    return {name: ProfileShapes.fixed(shapes[name]) for name in dynamic}


def onnx_input_shapes(path: Any) -> dict[str, Shape] | None:
    """The graph inputs of an ONNX file (initializers excluded), -1 for dynamic dimensions, as
    `engines.onnxfacts` reads them. None when the onnx package is missing; ModelLoadError when
    the file is not ONNX."""
    try:
        import onnx  # noqa: F401  (onnxfacts needs it; without it the build names a dynamic input itself)
    except ImportError:
        return None
    from engines.onnxfacts import read_facts

    return {t.name: tuple(d if isinstance(d, int) and d > 0 else -1 for d in t.shape)
            for t in read_facts(Path(path)).inputs}
