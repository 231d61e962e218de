from __future__ import annotations

import pytest

from agent.wire import deploy as ds


def test_every_state_is_reachable_from_received_and_terminals_are_final() -> None:
    seen, todo = {ds.RECEIVED}, [ds.RECEIVED]
    while todo:
        for nxt in ds.TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(ds.STATES)
    for t in ds.TERMINAL - {ds.ACTIVE}:
        assert ds.TRANSITIONS[t] == frozenset()


def test_checks() -> None:
    ds.check_transition(None, ds.RECEIVED)
    ds.check_transition(ds.PROBATION, ds.ROLLED_BACK)
    with pytest.raises(ds.TransitionError, match="starts in"):
        ds.check_transition(None, ds.ACTIVE)
    with pytest.raises(ds.TransitionError, match="from 'failed' to 'active'"):
        ds.check_transition(ds.FAILED, ds.ACTIVE)
    with pytest.raises(ds.TransitionError, match="unknown"):
        ds.check_transition(ds.RECEIVED, "exploded")
    # after the swap nothing may fail without rolling back
    assert ds.FAILED not in ds.TRANSITIONS[ds.PROBATION]
