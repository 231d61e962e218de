"""Wire formats of model delivery (v1), shared by the device and `jetfleet`: chunk frames,
block requests, server errors.

    {p}/models/{sha}/manifest   retained signed envelope (agent.wire.signing)
    {p}/models/{sha}/get        block request, JSON, with ResponseTopic + CorrelationData:
                                {"v": 1, "device_id": "cam-01", "chunks": [0, 1, 2, 3]}
    {p}/dev/{id}/reply/chunks   the answers: one message per chunk, a binary frame
                                b"JC" 0x01 | sha256 (32 raw bytes) | index (uint32 BE) | bytes,
                                or a JSON error {"v": 1, "error": "...", "model": sha}
    {p}/dev/{id}/desired        retained desired state (device), also {p}/group/{g}/desired:
                                {"v": 1, "job": "...", "model": sha, "cameras": [...],
                                 "precision": "int8", "policy": {...}, "issued": ts}
    {p}/dev/{id}/deploy         retained deployment state, see agent.wire.deploy

A chunk frame names its model and index itself, so a reply needs no lookup of the
request it answers, and a forged frame is caught by the chunk's hash, not trusted
for its header.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from agent.wire.core import Fields, ProtocolError, decode

MAGIC = b"JC\x01"
_HEADER = struct.Struct(">32sI")
HEADER_BYTES = len(MAGIC) + _HEADER.size
MAX_CHUNKS_PER_REQUEST = 64
# Room for the PUBLISH header, topic and properties in a chunk message.
FRAME_OVERHEAD = 1024
# The largest packet a device accepts (its CONNECT's Maximum Packet Size): the broker
# silently drops bigger messages for it (bounded memory on a 4 GB device). Chunks fit under it.
INBOUND_MAX_PACKET = 16 * 1024 * 1024


def chunk_frame(sha256: str, index: int, data: bytes) -> bytes:
    return MAGIC + _HEADER.pack(bytes.fromhex(sha256), index) + data


def parse_chunk_frame(payload: bytes) -> tuple[str, int, memoryview]:
    """(sha256, index, data). The data is a view into `payload` (no copy of the chunk).
    Raises ProtocolError for anything that is not a chunk frame."""
    if len(payload) < HEADER_BYTES or not payload.startswith(MAGIC):
        raise ProtocolError("not a chunk frame")
    raw_sha, index = _HEADER.unpack_from(payload, len(MAGIC))
    return raw_sha.hex(), index, memoryview(payload)[HEADER_BYTES:]


def is_json(payload: bytes) -> bool:
    return payload[:1] == b"{"


def get_request(device_id: str, chunks: list[int]) -> dict[str, Any]:
    return {"v": 1, "device_id": device_id, "chunks": list(chunks)}


def parse_get_request(payload: bytes, n_chunks: int) -> tuple[str, list[int]]:
    msg = decode(payload, "block request")
    f = Fields(msg, "block request")
    return f.ident("device_id"), f.int_list("chunks", max_items=MAX_CHUNKS_PER_REQUEST, maximum=max(0, n_chunks - 1))


def server_error(sha256: str, error: str) -> dict[str, Any]:
    return {"v": 1, "model": sha256, "error": error}


def parse_server_error(payload: bytes) -> str:
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable error reply"
    if isinstance(msg, dict) and isinstance(msg.get("error"), str):
        return msg["error"][:300]
    return "malformed error reply"


def max_chunk_size(max_packet_size: int, topic_len: int = 128) -> int:
    """The largest chunk whose frame fits in one packet the broker (and device) take."""
    return max_packet_size - FRAME_OVERHEAD - HEADER_BYTES - topic_len
