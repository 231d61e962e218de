"""The engine cache: same inputs build nothing; any one changed input is a miss."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from calibration.engine_cache import (
    EngineCache,
    Fingerprint,
    cpu_identity,
    gpu_identity,
    has_vnni,
    l4t_release,
    sidecar_for,
)

GPU = gpu_identity("Orin", "8.7", "R36.4.3")
BASE = Fingerprint(model_sha256="a" * 64, backend="tensorrt", backend_version="10.3.0.30", device=GPU,
                   precision="int8", calibration_sha256="c" * 64,
                   options={"int8_route": "explicit-qdq", "workspace_bytes": 1 << 30, "dla_core": None})

CHANGES: dict[str, dict[str, Any]] = {
    "model": {"model_sha256": "b" * 64},
    "backend": {"backend": "onnxruntime"},
    "backend version": {"backend_version": "10.3.0.31"},
    "gpu name": {"device": gpu_identity("Xavier", "8.7", "R36.4.3")},
    "compute capability": {"device": gpu_identity("Orin", "7.2", "R36.4.3")},
    "l4t release": {"device": gpu_identity("Orin", "8.7", "R35.4.1")},
    "cpu isa": {"device": {"kind": "cpu", "machine": "x86_64", "model": "", "isa": ["avx2"]}},
    "precision": {"precision": "fp16"},
    "calibration set": {"calibration_sha256": "d" * 64},
    "build option: workspace": {"options": {**BASE.options, "workspace_bytes": 2 << 30}},
    "build option: dla core": {"options": {**BASE.options, "dla_core": 0}},
    "build option: route": {"options": {**BASE.options, "int8_route": "implicit-calibrator"}},
}


class Builder:
    """A producer that writes a small artifact and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> dict[str, Any]:
        self.calls += 1
        path.write_bytes(b"plan-%d" % self.calls)
        path.with_name(path.name + ".json").write_text("{}")  # the builder's own report beside the plan
        return {"precision_built": "int8", "call": self.calls}


def test_same_inputs_hit_across_a_restart(tmp_path: Path) -> None:
    build = Builder()
    first = EngineCache(tmp_path / "engines").get_or_build(BASE, "engine.plan", build)
    assert not first.hit and build.calls == 1
    again = EngineCache(tmp_path / "engines").get_or_build(BASE, "engine.plan", build)  # a new process
    assert again.hit and build.calls == 1
    assert again.artifact == first.artifact and again.artifact.read_bytes() == b"plan-1"
    assert again.metadata == {"precision_built": "int8", "call": 1}
    sidecar = json.loads(sidecar_for(again.artifact).read_text())
    assert sidecar["fingerprint"] == BASE.to_dict() and sidecar["key"] == BASE.key
    assert (again.directory / "engine.plan.json").is_file(), "the producer's own files travel with the entry"
    assert again.artifact.read_bytes().startswith(b"plan"), "nothing was written into the artifact"


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_changing_any_one_input_is_a_miss(change: str, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    build = Builder()
    cache.get_or_build(BASE, "engine.plan", build)
    changed = dataclasses.replace(BASE, **CHANGES[change])
    assert changed.key != BASE.key
    assert cache.lookup(changed, "engine.plan") is None
    entry = cache.get_or_build(changed, "engine.plan", build)
    assert not entry.hit and build.calls == 2
    assert cache.get_or_build(BASE, "engine.plan", build).hit  # the first entry is still there


def test_damaged_foreign_or_missing_entries_are_rebuilt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    build = Builder()
    entry = cache.get_or_build(BASE, "engine.plan", build)
    entry.artifact.write_bytes(b"plan-1 truncated")
    assert cache.lookup(BASE, "engine.plan") is None
    entry = cache.get_or_build(BASE, "engine.plan", build)
    assert build.calls == 2 and cache.lookup(BASE, "engine.plan") is not None
    record = json.loads(sidecar_for(entry.artifact).read_text())
    record["fingerprint"]["precision"] = "fp16"
    sidecar_for(entry.artifact).write_text(json.dumps(record))
    assert cache.lookup(BASE, "engine.plan") is None
    sidecar_for(entry.artifact).write_text("{not json")
    assert cache.lookup(BASE, "engine.plan") is None
    cache.get_or_build(BASE, "engine.plan", build)
    entry.artifact.unlink()
    assert cache.lookup(BASE, "engine.plan") is None


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")

    def crash(path: Path) -> dict[str, Any]:
        path.write_bytes(b"half a plan")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        cache.get_or_build(BASE, "engine.plan", crash)
    assert list((tmp_path / "engines").iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"wrote no engine\.plan"):
        cache.get_or_build(BASE, "engine.plan", lambda path: {})
    assert cache.lookup(BASE, "engine.plan") is None


def test_timing_cache_is_keyed_by_backend_version_and_device_only(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    here = cache.timing_cache_path("tensorrt", "10.3.0.30", GPU)
    assert here == cache.timing_cache_path("tensorrt", "10.3.0.30", dict(GPU))
    assert here != cache.timing_cache_path("tensorrt", "10.3.0.31", GPU)
    assert here != cache.timing_cache_path("tensorrt", "10.3.0.30", gpu_identity("Orin", "8.7", "R36.3.0"))
    assert here.parent == tmp_path / "engines" / "timing"


def test_records_belong_to_their_fingerprint(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    cache.store_record(BASE, "decision.json", {"candidate": "int8-x"})
    assert cache.load_record(BASE, "decision.json") == {"candidate": "int8-x"}
    assert cache.load_record(dataclasses.replace(BASE, precision="fp32"), "decision.json") is None
    (cache.entry_dir(BASE) / "decision.json").write_text("garbage")
    assert cache.load_record(BASE, "decision.json") is None


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    entries = [cache.get_or_build(dataclasses.replace(BASE, model_sha256=str(i) * 64), "m.onnx", Builder())
               for i in range(4)]
    for age, entry in enumerate(entries):
        stamp = 1_000_000 + age * 10
        os.utime(entry.directory, (stamp, stamp))
    removed = cache.prune(keep=2, protect={entries[0].directory.name})
    assert sorted(removed) == [entries[1].directory]
    assert entries[0].directory.is_dir() and entries[3].directory.is_dir()


X86 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 ht
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_cpu_identity_reads_the_isa_that_kernels_dispatch_on() -> None:
    x86 = cpu_identity(X86, "x86_64")
    assert x86["model"] == "AMD EPYC 9B14" and "avx512_vnni" in x86["isa"] and "ht" not in x86["isa"]
    assert has_vnni(x86)
    arm = cpu_identity(ARM, "aarch64")
    assert arm["isa"] == ["asimd", "asimddp", "asimdhp"] and has_vnni(arm)
    assert not has_vnni(cpu_identity(X86.replace(" avx512_vnni", ""), "x86_64"))
    assert cpu_identity(X86, "x86_64") == x86  # stable: part of cache keys


def test_l4t_release(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                       "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n")
    assert l4t_release(release) == "R36.4.3"
    assert l4t_release(tmp_path / "absent") is None
