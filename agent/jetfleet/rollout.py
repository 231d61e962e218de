"""`jetfleet rollout` over MQTT: canaries, watch, then promote to the group or halt.

The decisions and the persisted state live in agent/jetfleet/rollout_state.py; this module talks
to the broker: it selects the canaries, publishes their desired states, follows their
deploy states and health, and carries out the decision. Each step is saved before the
next one is taken, so a run that was killed goes on from where it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.jetfleet.client import FleetClient, FleetError
from agent.jetfleet.progress import DeployWatch, Display, Target, group_members, own_desired
from agent.jetfleet.push import PushSpec, add_to_repo, policy_from_args, result_rows
from agent.jetfleet.repo import ModelRepo
from agent.jetfleet.rollout_state import Plan, RolloutStore, decide, default_state_dir, judge, new_state, pick_canaries
from agent.jetfleet.view import FleetView, device_row
from agent.wire.core import encode, valid_id
from agent.wire.desired import desired_message
from engines.errors import JetagentError
from engines.fileio import sha256_file

log = logging.getLogger(__name__)


class Rollout:
    def __init__(self, client: FleetClient, plan: Plan, store: RolloutStore, state: dict[str, Any], *,
                 out: TextIO, as_json: bool, wait: bool) -> None:
        self.client, self.plan, self.store, self.state = client, plan, store, state
        self.topics = client.topics
        self.out, self.as_json, self.wait = out, as_json, wait
        self.display = Display(out)
        self.view = FleetView(self.topics)

    def save(self) -> None:
        self.store.save(self.state)

    def run(self) -> int:
        if self.state["phase"] == "canary":
            self._canary()
        if self.state["phase"] == "promoting":
            self._promote()
        if self.state["phase"] == "halting":
            self._halt()
        elif self.state["phase"] == "promoted" and "devices" not in self.state["outcome"] and self.wait:
            self._follow_group()  # interrupted while following the group: follow it again
        return self.finish()

    # -- canaries --------------------------------------------------------------------------
    def _health(self, device: str) -> dict[str, Any]:
        rec = self.view.record(device)
        if rec is None or rec.state is None:
            return {"device_state": None}
        row = device_row(rec, time.time())
        errors = (rec.state.get("summary") or {}).get("errors")
        return {"device_state": rec.state.get("state"), "fps": row["fps"], "boot": rec.state.get("boot"),
                "errors": errors if isinstance(errors, int) and not isinstance(errors, bool) else None}

    def _canary(self) -> None:
        st, plan = self.state, self.plan
        canaries: list[str] = st["canaries"]
        for c in canaries:
            self.client.subscribe(self.topics.state(c), self.view.on_message)
            self.client.subscribe(self.topics.health(c), self.view.on_message)
        watch = DeployWatch(self.topics, {c: st["canary_job"] for c in canaries})
        watch.subscribe(self.client)
        body = encode(desired_message(st["canary_job"], plan.sha256, precision=plan.precision, policy=plan.policy))
        for c in canaries:
            if not st["canary"][c]["published"]:
                self.client.publish(self.topics.desired(c), body, retain=True)
                st["canary"][c]["published"] = True
                self.save()
        while True:
            snap, now = watch.snapshot(), time.time()
            changed = False
            for t in snap:
                changed |= judge(st["canary"][t.device_id], t.state, t.reason, self._health(t.device_id), plan, now,
                                 st["canary_started"])
            verdict, why = decide(st, plan)
            if verdict is not None:
                st["phase"], st["decision"] = ("promoting" if verdict == "promote" else "halting"), why
                changed = True
            if changed:
                self.save()
            self.display.show([self._canary_row(t, now) for t in snap], self._header())
            if verdict is not None:
                print(f"decision   {verdict}: {why}", file=self.out)
                return
            watch.changed.clear()
            watch.changed.wait(0.5)

    def _canary_row(self, t: Target, now: float) -> Target:
        rec = self.state["canary"][t.device_id]
        row = Target(**t.__dict__)
        if rec["verdict"] is not None:
            row.reason = f"{rec['verdict']}: {rec['reason']}"
        elif rec["active_since"] is not None:
            h = self._health(t.device_id)
            grown = (h["errors"] - rec["errors0"]) if h.get("errors") is not None and rec["errors0"] is not None else 0
            row.reason = (f"watching {max(0.0, now - rec['active_since']):.0f}/{self.plan.promote_after_s:g} s, "
                          f"fps {h.get('fps')}, errors +{grown}")
        return row

    def _header(self) -> str:
        st, plan = self.state, self.plan
        fails = sum(r["verdict"] in ("failed", "unhealthy") for r in st["canary"].values())
        return (f"rollout {st['id']}: {len(st['canaries'])} canar{'y' if len(st['canaries']) == 1 else 'ies'} of "
                f"{len(st['members'])} in group {plan.group}; promote after {plan.promote_after_s:g} s; "
                f"failures {fails} (max {plan.max_failures})")

    # -- promote ----------------------------------------------------------------------------
    def _promote(self) -> None:
        st, plan = self.state, self.plan
        if not st["group_published"]:
            body = desired_message(st["group_job"], plan.sha256, precision=plan.precision, policy=plan.policy)
            self.client.publish(self.topics.group_desired(plan.group), encode(body), retain=True)
            st["group_published"] = True
            self.save()
            print(f"promoted   job {st['group_job']} on {self.topics.group_desired(plan.group)}", file=self.out)
        self._clear_canaries()
        st["phase"], st["outcome"] = "promoted", {"result": "promoted", "reason": st.get("decision", "")}
        self.save()
        if self.wait:
            self._follow_group()

    def _follow_group(self) -> None:
        st = self.state
        watch = DeployWatch(self.topics, {d: st["group_job"] for d in st["members"]})
        watch.subscribe(self.client)
        final = watch.follow(self.display, self.plan.timeout_s, f"rollout {st['id']}: group {self.plan.group}, "
                                                                f"job {st['group_job']}")
        st["outcome"]["devices"] = result_rows(final)
        self.save()

    def _clear_canaries(self) -> None:
        """An empty retained payload clears a canary's own desired state: it follows the group."""
        for c in self.state["canaries"]:
            if c not in self.state["cleared"]:
                self.client.publish(self.topics.desired(c), b"", retain=True)
                self.state["cleared"].append(c)
                self.save()

    # -- halt -------------------------------------------------------------------------------
    def _halt(self) -> None:
        st = self.state
        halt: dict[str, str] = st["halt"]
        todo = []
        for c in st["canaries"]:
            if c in halt:  # decided in an earlier run: never a second rollback (it would swap back)
                continue
            state = st["canary"][c]["state"]
            if state == "active":
                todo.append(c)
                continue
            halt[c] = ("not needed: its probation rolled it back" if state == "rolled_back" else
                       f"not sent: it was {state} (if it still commits: jetfleet rollback --device {c})")
            self.save()
        watch = DeployWatch(self.topics, {c: None for c in todo})
        sent = []
        if todo:
            watch.subscribe(self.client)
            time.sleep(0.3)  # the retained deploy states: the baseline a rollback job is told from
        for c in todo:
            watch.restart(c, None)
            halt[c] = "sending"
            self.save()
            try:
                reply = self.client.command(c, "rollback", {"reason": f"rollout {st['id']} halted"}, timeout=10.0)
                halt[c] = "sent" if reply["ok"] else f"refused: {reply.get('error')}"
            except FleetError as exc:
                halt[c] = f"no reply ({exc}); the broker holds the command for the device's session"
            if halt[c] == "sent":
                sent.append(c)
            self.save()
        self._clear_canaries()
        st["phase"], st["outcome"] = "halted", {"result": "halted", "reason": st.get("decision", "")}
        self.save()
        if sent and self.wait:
            final = watch.follow(self.display, min(120.0, self.plan.timeout_s),
                                 f"rollout {st['id']}: rolling back {', '.join(sent)}")
            st["outcome"]["rollbacks"] = result_rows([t for t in final if t.device_id in sent])
            self.save()

    # -- result -----------------------------------------------------------------------------
    def finish(self) -> int:
        st = self.state
        outcome = st.get("outcome") or {}
        canaries = [{"device_id": c, "job": st["canary_job"], "state": r["state"], "verdict": r["verdict"],
                     "reason": r["reason"], **({"rollback": st["halt"][c]} if c in st["halt"] else {})}
                    for c, r in sorted(st["canary"].items())]
        devices = outcome.get("devices", [])
        code = 1 if outcome.get("result") != "promoted" or any(d["state"] != "active" for d in devices) else 0
        if self.as_json:
            print(json.dumps({"rollout": st["id"], "outcome": outcome.get("result"), "reason": outcome.get("reason"),
                              "group": self.plan.group, "model": self.plan.sha256, "canaries": canaries,
                              "devices": devices, "state_file": str(self.store.path)}, indent=2))
        else:
            print(f"rollout {st['id']} {outcome.get('result')}: {outcome.get('reason')}", file=self.out)
            for c in canaries:
                if "rollback" in c:
                    print(f"  {c['device_id']}: rollback {c['rollback']}", file=self.out)
        return code


def run_rollout(client: FleetClient, args: argparse.Namespace, spec: PushSpec | None) -> int:
    """New, resumed (same arguments, or --resume ID) or finished: each gets what it needs."""
    out = sys.stderr if args.json else sys.stdout
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    model_file: Path | None = None
    if args.resume:
        store = RolloutStore(state_dir, args.resume)
        state = store.load()
        if state is None:
            raise JetagentError(f"no rollout {args.resume} in {state_dir}")
        plan = Plan.from_dict(state["plan"])
    else:
        if not args.model or not args.group or spec is None:
            raise JetagentError("rollout needs MODEL, --group, --repo and --key (or --resume ID)")
        if not valid_id(args.group):
            raise JetagentError(f"--group {args.group!r}: must be 1-64 of A-Z a-z 0-9 _ . -")
        repo = ModelRepo(spec.repo)
        if Path(args.model).is_file():
            model_file, sha = Path(args.model), sha256_file(Path(args.model))
        else:
            sha = repo.resolve(args.model)
        plan = Plan(sha256=sha, group=args.group, canary_pct=args.canary, promote_after_s=args.promote_after,
                    max_failures=args.max_failures, broker=args.broker, prefix=client.topics.prefix,
                    repo=str(Path(spec.repo).resolve()), precision=args.precision or "",
                    policy=policy_from_args(args.probation, args.min_fps), timeout_s=args.timeout, min_fps=args.min_fps,
                    max_errors=args.max_errors, expect=args.expect)
        store = RolloutStore(state_dir, plan.rollout_id)
        state = None if args.restart else store.load()
    with store.locked():
        if state is None:
            state = _start(client, plan, store, spec, model_file, out)
        else:
            state["resumed"] = state.get("resumed", 0) + 1
            store.save(state)
            print(f"resuming   rollout {state['id']} in phase {state['phase']} ({store.path})", file=out)
            if state["phase"] in ("canary", "promoting"):
                entry = ModelRepo(plan.repo).get(plan.sha256)
                client.publish(client.topics.manifest(plan.sha256), entry.envelope, retain=True)
        return Rollout(client, plan, store, state, out=out, as_json=args.json, wait=not args.no_wait).run()


def _start(client: FleetClient, plan: Plan, store: RolloutStore, spec: PushSpec | None, model_file: Path | None,
           out: TextIO) -> dict[str, Any]:
    members = group_members(client, plan.group, expect=plan.expect, wait_s=30.0 if plan.expect else 0.0)
    pinned = own_desired(client, members)
    eligible = [m for m in members if m not in pinned]
    if not eligible:
        raise JetagentError(f"group {plan.group} has no device on this broker to roll out to "
                            f"({len(pinned)} pinned by their own desired state)" if pinned else
                            f"group {plan.group} has no device on this broker (their state lists their groups)")
    if model_file is not None and spec is not None:
        entry = add_to_repo(client, spec, out)
    else:
        entry = ModelRepo(plan.repo).get(plan.sha256)
        client.publish(client.topics.manifest(plan.sha256), entry.envelope, retain=True)
    canaries = pick_canaries(eligible, plan.canary_pct)
    state = new_state(plan, entry.manifest.name, eligible, canaries, pinned)
    store.save(state)
    print(f"rollout    {state['id']}: canaries {', '.join(canaries)} of {len(eligible)} in group {plan.group}"
          + (f"; not in it (own desired state): {', '.join(sorted(pinned))}" if pinned else ""), file=out)
    print(f"state      {store.path} (run the same command again, or --resume {state['id']}, to continue)", file=out)
    return state
