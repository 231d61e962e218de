"""Commands on `{p}/dev/{id}/cmd`: a router of named handlers and the worker that runs it.

A command is `{"v":1,"cmd":NAME,"args":{...}}` sent with an MQTT 5 Response Topic and
Correlation Data. Every command that names a response topic gets exactly one reply
there, with the same correlation data: `{"v":1,"ok":true,"result":...}` or
`{"v":1,"ok":false,"error":"specific reason"}`. Garbage, a wrong schema, an oversized
payload, an unknown command or a handler that fails all get an error reply and a log
line; none of them reaches the camera loops.

The link's callback only enqueues (`CommandService.sink`); one worker thread runs the
handlers, so a slow handler never stalls paho's network thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.wire.core import Fields, Inbound, ProtocolError, encode
from agent.wire.device import command_error, command_ok, parse_command
from engines.errors import JetagentError

log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Any]
ReplyFn = Callable[[str, bytes, bytes | None], None]
MAX_REPLY_BYTES = 256 * 1024
SECRET_KEYS = ("password", "secret", "token", "passphrase")


class CommandError(JetagentError):
    """A handler's specific reason for refusing a command."""


class CommandRouter:
    """Name -> handler. `handle()` turns any payload into a reply and never raises."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, str]] = {}

    def register(self, name: str, handler: Handler, summary: str = "") -> None:
        if name in self._handlers:
            raise ValueError(f"command {name!r} is already registered")
        self._handlers[name] = (handler, summary)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def handle(self, payload: bytes) -> tuple[str, dict[str, Any]]:
        """(command name or "", reply body)."""
        try:
            name, args = parse_command(payload)
        except ProtocolError as exc:
            return "", command_error(str(exc))
        entry = self._handlers.get(name)
        if entry is None:
            return name, command_error(f"unknown command {name!r} (known: {', '.join(self.names())})")
        try:
            result = entry[0](args)
            json.dumps(result)  # a handler bug must show up as an error reply, not a lost one
        except JetagentError as exc:
            return name, command_error(f"{name}: {exc}")
        except Exception as exc:  # a handler bug: keep the traceback, answer anyway
            log.exception("command %s failed", name)
            return name, command_error(f"{name}: internal error: {type(exc).__name__}: {exc}")
        return name, command_ok(result)


class CommandService:
    """A bounded queue and one worker thread between the link and the router."""

    def __init__(self, router: CommandRouter, reply: ReplyFn, maxsize: int = 64) -> None:
        self.router = router
        self._reply = reply
        self._queue: queue.Queue[Inbound | None] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.handled = 0
        self.rejected = 0
        self.overflowed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._queue.put(None, timeout=1.0)  # wake the worker now
        except queue.Full:
            pass  # a stuck handler: the thread is a daemon and sees the flag when it returns
        if self._thread is not None:
            self._thread.join(timeout)

    def sink(self, msg: Inbound) -> None:
        """Called on paho's network thread: enqueue and return."""
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.overflowed += 1
            log.warning("command queue full (%d); dropped a command on %s", self._queue.maxsize, msg.topic)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._queue.get(timeout=5.0)  # stop() wakes it with a sentinel
            except queue.Empty:
                continue
            if msg is None:
                return
            try:
                self.process(msg)
            except Exception:  # never let one message end the worker
                log.exception("command worker failed on a message")

    def process(self, msg: Inbound) -> dict[str, Any]:
        t0 = time.perf_counter()
        name, reply = self.router.handle(msg.payload)
        self.handled += 1
        if not reply["ok"]:
            self.rejected += 1
            log.warning("command %s rejected: %s", name or "(unparsed)", reply["error"])
        else:
            log.info("command %s done in %.1f ms", name, (time.perf_counter() - t0) * 1e3)
        if not msg.response_topic:
            if reply["ok"] is False:
                log.warning("command had no response topic; the error above was not sent")
            return reply
        body = encode(reply)
        if len(body) > MAX_REPLY_BYTES:
            body = encode(command_error(f"{name}: result is {len(body)} bytes, over the {MAX_REPLY_BYTES}-byte limit"))
        try:
            self._reply(msg.response_topic, body, msg.correlation_data)
        except JetagentError as exc:
            log.warning("cannot send the reply to %r: %s", msg.response_topic, exc)
        return reply


# -- the agent's commands -------------------------------------------------------------------

class AgentControl(Protocol):
    """What the command handlers need from the daemon."""

    config: Any
    started_at: float

    def camera_names(self) -> list[str]: ...

    def restart_camera(self, name: str) -> dict[str, Any]: ...


def _no_args(name: str, args: Mapping[str, Any], allowed: tuple[str, ...] = ()) -> Fields:
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise ProtocolError(f"args: {extra[0]}: unknown argument for {name}")
    return Fields(args, "args")


def redacted(value: Any) -> Any:
    """A dataclass/dict tree as JSON-ready data, with secrets replaced."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): ("<redacted>" if v is not None and any(s in str(k).lower() for s in SECRET_KEYS)
                         else redacted(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def register_agent_commands(router: CommandRouter, agent: AgentControl, boot: int) -> None:
    def ping(args: Mapping[str, Any]) -> dict[str, Any]:
        _no_args("ping", args)
        return {"pong": True, "ts": round(time.time(), 3), "boot": boot, "agent_version": __version__,
                "uptime_s": round(time.time() - agent.started_at, 1)}

    def get_config(args: Mapping[str, Any]) -> Any:
        _no_args("get-config", args)
        return redacted(agent.config)

    def restart_pipeline(args: Mapping[str, Any]) -> dict[str, Any]:
        camera = _no_args("restart-pipeline", args, ("camera",)).ident("camera")
        names = agent.camera_names()
        if camera not in names:
            raise CommandError(f"no camera named {camera!r} (cameras: {', '.join(names)})")
        return agent.restart_camera(camera)

    router.register("ping", ping, "liveness and identity")
    router.register("get-config", get_config, "the effective config, secrets redacted")
    router.register("restart-pipeline", restart_pipeline, "reopen one camera's source; the model stays loaded")
