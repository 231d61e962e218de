from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from agent.wire.core import ProtocolError
from agent.wire.manifest import AccuracyBound, build_manifest, parse_manifest
from agent.wire.signing import KeyFileError, SignatureError, TrustStore, generate_keys, load_private_key, sign, verify
from engines.modelcard import load_card


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


def test_keys_are_private_and_never_overwritten(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert (priv.stat().st_mode & 0o777) == 0o600
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keys(priv.parent)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_private_key(pub)


def test_sign_verify_and_every_rejection(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    trust = TrustStore.from_files([pub])
    manifest = {"v": 1, "kind": "x", "model": {"sha256": "a" * 64}}
    env = sign(manifest, load_private_key(priv))
    got = verify(env, trust)
    assert got["model"] == manifest["model"] and len(got["key_id"]) == 16

    e = json.loads(env)
    unsigned = {k: v for k, v in e.items() if k != "signature"}
    with pytest.raises(SignatureError, match="not signed"):
        verify(json.dumps(unsigned).encode(), trust)

    _, other_pub = generate_keys(tmp_path / "other")
    with pytest.raises(SignatureError, match="unknown key"):
        verify(env, TrustStore.from_files([other_pub]))

    tampered = dict(e, manifest=e["manifest"].replace("a" * 64, "b" * 64))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(json.dumps(tampered).encode(), trust)

    bad_sig = dict(e, signature=base64.b64encode(os.urandom(64)).decode())
    with pytest.raises(SignatureError, match="does not verify"):
        verify(json.dumps(bad_sig).encode(), trust)

    with pytest.raises(SignatureError, match="not valid JSON"):
        verify(b"\xff\xfe", trust)
    with pytest.raises(SignatureError, match="algorithm"):
        verify(json.dumps(dict(e, alg="rsa")).encode(), trust)


def test_manifest_round_trip_and_checks(demo_model: Path) -> None:
    card = load_card(demo_model.with_suffix(".json"))
    data = demo_model.read_bytes()
    m = build_manifest(data, card, chunk_size=1 << 20, accuracy=AccuracyBound(0.9))
    assert m.n_chunks == -(-len(data) // (1 << 20)) and m.size == len(data)
    again = parse_manifest(json.loads(json.dumps(m.to_dict())))
    assert again.chunks == m.chunks and again.accuracy.minimum == 0.9 and again.sha256 == m.sha256

    d = m.to_dict()
    d["chunks"]["sha256"] = d["chunks"]["sha256"][:-1]
    with pytest.raises(ProtocolError, match="chunks: sha256"):
        parse_manifest(d)
    d = m.to_dict()
    d["min_agent_version"] = "99.0"
    with pytest.raises(ProtocolError, match=r"needs agent 99\.0"):
        parse_manifest(d)
    d = m.to_dict()
    d["card"]["input"]["width"] = -1
    with pytest.raises(ProtocolError, match="width"):
        parse_manifest(d)
    with pytest.raises(ProtocolError, match="chunk size"):
        build_manifest(data, card, chunk_size=100)
