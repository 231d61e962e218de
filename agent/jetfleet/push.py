"""`jetfleet push` and `jetfleet rollback`: put a model on devices, or take it off again.

push: validate the ONNX here (checker, then ONNX Runtime opens it and the card's input
must fit it), pick the chunk size from the broker's CONNACK and the device's 16 MiB
inbound limit, add it to the repository with a signed manifest, publish the manifest
(retained), then the desired state (retained) for each target with a fresh job id, and
follow the targets' deploy states until each is terminal.

rollback: the `rollback` command, then the device's deploy state until it settles.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agent.jetfleet.client import FleetClient
from agent.jetfleet.progress import DeployWatch, Display, Target, group_members, own_desired
from agent.jetfleet.repo import Entry, ModelRepo
from agent.wire import deploy as S
from agent.wire.chunks import INBOUND_MAX_PACKET, max_chunk_size
from agent.wire.core import Topics, encode, valid_id
from agent.wire.desired import desired_message
from agent.wire.manifest import MAX_CHUNK, MIN_CHUNK, AccuracyBound
from engines.errors import JetagentError
from engines.modelcard import ModelCard, card_path_for

log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024 * 1024
LARGE_MODEL = 16 * MIB  # from here on 1 MiB chunks (16+ of them fill a device's request window); below, 256 KiB


def validate_model(model: Path, card_path: Path) -> ModelCard:
    """The checks a device would fail the model on, done before anything is published: the
    ONNX checker, the card (or, with none beside the model, the card derived from it when that
    is unambiguous: said on stderr), ONNX Runtime opening it against the card, and one real
    inference on a generated frame through the card's preprocessing and post-processor
    (engines.modelcheck: stride, output shapes, NaN, double activation, labels vs classes)."""
    import onnx  # heavy: only when pushing
    from google.protobuf.message import DecodeError

    from engines.base import BackendOptions, open_backend
    from engines.cardinit import card_for
    try:
        from engines.modelcheck import check_model
        from engines.runner import ModelRunner
    except ImportError as exc:  # OpenCV: the check runs the card's own preprocessing
        raise JetagentError(f"jetfleet push checks the model on a generated frame through the card's "
                            f"preprocessing, which needs OpenCV ({exc}): pip install 'jetagent[cv]'") from None

    if not model.is_file():
        raise JetagentError(f"{model}: no such file")
    try:
        onnx.checker.check_model(onnx.load(str(model), load_external_data=False))
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise JetagentError(f"{model} is not a valid ONNX model: {str(exc).strip().splitlines()[0][:300]}") from None
    card, note = card_for(model, None if card_path == card_path_for(model) else card_path)
    if note:
        print(f"note       {note}", file=sys.stderr)
    runner = ModelRunner(card, open_backend("onnxruntime", model, BackendOptions(threads=1)), path=str(model))
    try:
        check_model(runner)
    finally:
        runner.close()
    return card


def chunk_limit(broker_max_packet: int, prefix: str) -> int:
    """The largest chunk whose frame fits both the broker's and the device's packet limit,
    on the longest reply topic a device can have."""
    topic = Topics(prefix).reply("x" * 64, "chunks")
    fits = max_chunk_size(min(broker_max_packet, INBOUND_MAX_PACKET), topic_len=len(topic.encode()) + 64)
    return min(fits, MAX_CHUNK)


def choose_chunk_size(model_size: int, broker_max_packet: int, prefix: str,
                      requested: int | None = None) -> tuple[int, str]:
    """(chunk size, why). 1 MiB once a model is 16 MiB or more: at least 16 chunks fill a
    device's request window (16 in flight), and fewer, larger messages move faster (with
    Mosquitto's default Nagle on its sockets, 256 KiB chunks moved 68-79 MB/s and 1 MiB ones
    150-200 MB/s here; scripts/bench_serve.py). Below that, 256 KiB, so a small model is
    still several chunks that pipeline and move the progress bar. Never more than the
    broker's CONNACK and the device's 16 MiB allow."""
    limit = chunk_limit(broker_max_packet, prefix)
    where = f"the broker's Maximum Packet Size is {broker_max_packet} bytes, a device's {INBOUND_MAX_PACKET}"
    if requested is not None:
        if requested < MIN_CHUNK or requested > limit:
            raise JetagentError(f"--chunk-size {requested}: must be {MIN_CHUNK}..{limit} bytes ({where})")
        return requested, "as asked (--chunk-size)"
    preferred = MIB if model_size >= LARGE_MODEL else 256 * KIB
    if preferred <= limit:
        why = ("a model of 16 MiB or more: 16+ chunks of 1 MiB fill the device's request window" if preferred == MIB
               else "a model under 16 MiB: smaller chunks keep several in flight")
        return preferred, why
    size = 1 << (limit.bit_length() - 1)
    if size < MIN_CHUNK:
        raise JetagentError(f"chunks cannot fit: {where}, which leaves {limit} bytes for a chunk "
                            f"(at least {MIN_CHUNK} needed)")
    return size, f"the largest power of two under the packet limit ({where})"


def new_job_id(kind: str = "push") -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def policy_from_args(probation: float | None, min_fps: float | None) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    if probation is not None:
        policy["probation_s"] = probation
    if min_fps is not None:
        policy["min_fps"] = min_fps
    return policy


@dataclass(frozen=True)
class PushSpec:
    model: Path
    repo: Path
    key: Path
    card: Path | None = None
    labels: list[str] | None = None
    task: str | None = None
    accuracy_min: float | None = None
    chunk_size: int | None = None


def add_to_repo(client: FleetClient, spec: PushSpec, out: TextIO) -> Entry:
    """Validate, choose the chunk size, add (signed), publish the manifest retained."""
    card_path = spec.card or card_path_for(spec.model)
    card = validate_model(spec.model, card_path)
    size = spec.model.stat().st_size
    chunk, why = choose_chunk_size(size, client.max_packet_size, client.topics.prefix, spec.chunk_size)
    accuracy = AccuracyBound(minimum=spec.accuracy_min) if spec.accuracy_min is not None else None
    entry = ModelRepo(spec.repo).add(spec.model, spec.key, card_path=card_path, labels=spec.labels, task=spec.task,
                                     chunk_size=chunk, accuracy=accuracy)
    m = entry.manifest
    print(f"model      {card.name} {m.sha256[:12]} ({m.size / 1e6:.1f} MB, input {card.input.name} "
          f"{card.input.width}x{card.input.height}) checked with ONNX Runtime", file=out)
    print(f"chunks     {m.n_chunks} x {_size(chunk)}: {why}", file=out)
    client.publish(client.topics.manifest(m.sha256), entry.envelope, retain=True)
    return entry


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n // KIB} KiB" if n % KIB == 0 else f"{n} bytes"


def push_targets(client: FleetClient, devices: list[str], group: str | None, expect: int,
                 out: TextIO, expect_wait: float = 30.0) -> list[str]:
    """The devices a push follows: the named ones, or the group's members without a
    device-level desired state of their own (that one wins on the device)."""
    for d in devices:
        if not valid_id(d):
            raise JetagentError(f"--device {d!r}: must be 1-64 of A-Z a-z 0-9 _ . -")
    if group is None:
        return list(dict.fromkeys(devices))
    if not valid_id(group):
        raise JetagentError(f"--group {group!r}: must be 1-64 of A-Z a-z 0-9 _ . -")
    members = group_members(client, group, expect=expect, wait_s=expect_wait if expect else 0.0)
    pinned = own_desired(client, members)
    for d, job in sorted(pinned.items()):
        print(f"note       {d} has its own desired state (job {job}), which wins over the group's; "
              "not following it", file=out)
    return [d for d in members if d not in pinned]


def exit_code(targets: list[Target]) -> int:
    return 0 if targets and all(t.state == S.ACTIVE for t in targets) else 1


def result_rows(targets: list[Target]) -> list[dict[str, Any]]:
    rows = []
    for t in targets:
        r = {k: v for k, v in t.row().items() if k in ("device_id", "job", "state", "precision", "reason", "seconds")}
        if not t.terminal:
            r["timed_out"] = True
        rows.append(r)
    return rows


def finish(targets: list[Target], as_json: bool, out: TextIO, *, waited: bool = True) -> int:
    if as_json:
        print(json.dumps(result_rows(targets), indent=2))
    if not waited:
        return 0
    late = [t.device_id for t in targets if not t.terminal]
    if late:
        print(f"timed out waiting for {', '.join(late)} (the desired state stays; devices carry on)", file=out)
    return exit_code(targets)


def push(client: FleetClient, spec: PushSpec, *, devices: list[str], group: str | None, expect: int = 0,
         expect_wait: float = 30.0, precision: str = "", policy: dict[str, Any] | None = None, wait: bool = True,
         timeout: float = 1800.0, as_json: bool = False) -> int:
    out = sys.stderr if as_json else sys.stdout
    targets = push_targets(client, devices, group, expect, out, expect_wait)
    entry = add_to_repo(client, spec, out)
    job = new_job_id("push")
    watch = DeployWatch(client.topics, {d: job for d in targets})
    watch.subscribe(client)  # before the desired state: no transition is missed
    body = encode(desired_message(job, entry.manifest.sha256, precision=precision, policy=policy))
    topics = [client.topics.group_desired(group)] if group else [client.topics.desired(d) for d in targets]
    for topic in topics:
        client.publish(topic, body, retain=True)
    print(f"desired    job {job} on {', '.join(topics)}", file=out)
    if group and not targets:
        print(f"note       no device of group {group} is on the broker yet; the retained desired state waits "
              "for them", file=out)
    if not wait:
        return finish(watch.snapshot(), as_json, out, waited=False)
    final = watch.follow(Display(out), timeout, f"job {job}")
    return finish(final, as_json, out)


def rollback(client: FleetClient, device: str, *, reason: str, timeout: float, as_json: bool) -> int:
    """Send `rollback`, then follow the job the device names in its reply (or, from an older
    agent, whatever it reports next): the job on probation going to rolled_back, or a
    rollback job to active (failed: nothing to roll back to)."""
    if not valid_id(device):
        raise JetagentError(f"--device {device!r}: must be 1-64 of A-Z a-z 0-9 _ . -")
    out = sys.stderr if as_json else sys.stdout
    watch = DeployWatch(client.topics, {device: None})
    watch.subscribe(client)
    time.sleep(0.3)  # the retained deploy state arrives: it is the baseline, not the answer
    watch.restart(device, None)
    reply = client.command(device, "rollback", {"reason": reason[:200]}, timeout=min(timeout, 10.0))
    if not reply["ok"]:
        print(f"{device} refused the rollback: {reply.get('error')}", file=sys.stderr)
        return 1
    result = reply.get("result")
    job = result.get("job") if isinstance(result, dict) else None
    if isinstance(job, str) and job:  # the device names the job whose outcome answers us
        watch.restart(device, job)
    final = watch.follow(Display(out), timeout, f"rollback of {device}")
    if as_json:
        print(json.dumps(result_rows(final), indent=2))
    t = final[0]
    # a rollback succeeded when the job on probation rolled back or the rollback job is active
    return 0 if t.state in (S.ACTIVE, S.ROLLED_BACK) else 1
