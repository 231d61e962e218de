from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.delivery.store import ChunkRejected, ModelStore, StoreError
from agent.wire.manifest import build_manifest
from engines.modelcard import parse_card
from onnx_models import color_card_json


def manifest_for(data: bytes, chunk: int = 4096):
    import json

    return build_manifest(data, parse_card(json.loads(color_card_json())), chunk_size=chunk)


def test_download_resumes_from_the_durable_bitmap(tmp_path: Path) -> None:
    data = os.urandom(10 * 4096 + 123)
    m = manifest_for(data)
    store = ModelStore(tmp_path)
    d = store.begin(m, b"{}")
    for i in (0, 1, 2, 5):
        d.write_chunk(i, data[i * 4096:(i + 1) * 4096])
    d.flush()
    d.write_chunk(7, data[7 * 4096:8 * 4096])  # written, never flushed: a power cut loses its claim
    d.close()  # the process dies here

    again = store.begin(m, b"{}")
    assert again.resumed_chunks == 4
    assert again.missing() == [3, 4, 6, 7, 8, 9, 10]
    assert not again.write_chunk(0, data[:4096])  # already held: not rewritten
    for i in again.missing():
        again.write_chunk(i, data[i * 4096:(i + 1) * 4096])
    path = again.finish()
    assert path.read_bytes() == data and store.has(m.sha256)
    assert store.partials() == [] and store.stored() == [m.sha256]
    assert (path.stat().st_mode & 0o222) == 0  # read-only once verified


def test_bad_chunk_is_rejected_and_nothing_written(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    m = manifest_for(data)
    d = ModelStore(tmp_path).begin(m, b"{}")
    with pytest.raises(ChunkRejected, match="chunk 1"):
        d.write_chunk(1, os.urandom(4096))
    with pytest.raises(ChunkRejected, match="outside"):
        d.write_chunk(9, b"")
    assert d.missing() == [0, 1, 2] and d.rejected == 1
    d.close()


def test_whole_file_mismatch_discards(tmp_path: Path) -> None:
    data = os.urandom(2 * 4096)
    m = dataclasses.replace(manifest_for(data), sha256="0" * 64)  # chunks right, whole hash wrong
    store = ModelStore(tmp_path)
    d = store.begin(m, b"{}")
    d.write_chunk(0, data[:4096])
    d.write_chunk(1, data[4096:])
    with pytest.raises(StoreError, match="whole-file sha256"):
        d.finish()
    assert store.partials() == [] and store.stored() == []


def test_size_limit_and_incomplete(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    m = manifest_for(data)
    with pytest.raises(StoreError, match="at most 4096 bytes"):
        ModelStore(tmp_path, max_model_bytes=4096).begin(m, b"{}")
    d = ModelStore(tmp_path).begin(m, b"{}")
    with pytest.raises(StoreError, match="3 chunks missing"):
        d.finish()
    d.close()


def test_gc_keeps_the_slots(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    shas = []
    for _ in range(3):
        data = os.urandom(5000)
        m = manifest_for(data)
        d = store.begin(m, b"{}")
        d.write_chunk(0, data[:4096])
        d.write_chunk(1, data[4096:])
        d.finish()
        shas.append(m.sha256)
    assert sorted(store.gc({shas[0], shas[2]})) == [shas[1]]
    assert store.stored() == sorted([shas[0], shas[2]])


def test_a_crash_inside_finish_restarts_the_download_cleanly(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    m = manifest_for(data)
    store = ModelStore(tmp_path)
    d = store.begin(m, b"{}")
    for i in range(3):
        d.write_chunk(i, data[i * 4096:(i + 1) * 4096])
    d.flush()
    d.close()
    # the power goes after finish() moved the data into staging
    staging = store.models / f".{m.sha256}.staging"
    staging.mkdir()
    os.replace(store.partial / m.sha256 / "data", staging / "model.onnx")
    again = ModelStore(tmp_path)  # the next start
    assert not staging.exists()
    d2 = again.begin(m, b"{}")
    assert d2.missing() == [0, 1, 2]  # a full bitmap without its data is not believed
    for i in range(3):
        d2.write_chunk(i, data[i * 4096:(i + 1) * 4096])
    assert d2.finish().read_bytes() == data
